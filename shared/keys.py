"""Every Redis key name the project writes or reads, defined once."""

from __future__ import annotations

SEEN_PREFIX = "fb:seen:"
"""`fb:seen:<event id>`: the dedupe marker; "q" once queued, "x" if dead."""

LANE_PREFIX = "fb:lane:"
"""`fb:lane:<n>`: a list of queued events (codec QueuedEvent JSON), oldest first. A user's events
all go to one lane (shared/lanes.py), and one job at a time drains a lane, in order."""

LANE_JOB_PREFIX = "fb:lanejob:"
"""`fb:lanejob:<n>`: the id of the arq job that owns lane n (queued, running, or waiting to
retry its head event); absent when the lane is idle. Ingest sets it when it queues a job."""

FORWARD_PREFIX = "fb:fwd:"
"""`fb:fwd:<n>`: events waiting to be forwarded to FORWARD_URL, oldest first, one list per lane
(so a user's events are delivered in order); written with their outputs (workers/effects.lua)."""

FORWARD_JOB_PREFIX = "fb:fwdjob:"
"""`fb:fwdjob:<n>`: the id of the arq job that delivers forward lane n, as `fb:lanejob:<n>`."""

FORWARD_DEAD = "fb:fwd:dead"
"""Deliveries that failed for good: the event, the last answer, the error (`fbhook forward`)."""

FORWARD_TRIES = "fb:fwd:tries"
"""A hash of event id -> failed delivery tries, for the forward lanes' head events."""

FORWARD_REPLAYED_PREFIX = "fb:fwdreplay:"
"""`fb:fwdreplay:<event id>`: when `fbhook forward dead replay` sent the event again (ms); its
age against FORWARD_MAX_AGE_SECONDS counts from then, not from when Facebook sent it. Expires
after the longest FORWARD_MAX_AGE_SECONDS allowed."""

LANE_TRIES = "fb:lane:tries"
"""A hash of event id -> failed tries, for the head events being retried (small)."""

STEPS = "fb:steps"
"""A hash, list key -> the id and reply of that lane's (or forward list's) last step call, so
that a call sent twice (a client retrying after the reply was lost) does not run twice."""

STREAM_PREFIX = "fb:events:"
"""`fb:events:<kind>`: a Redis Stream per event kind, the interface for downstream consumers."""

ATTR_PREFIX = "fb:attr:"
"""`fb:attr:<user>`: a user's referral touches, one MessagePack string (shared/attribution.py)."""

REFERRALS_STREAM = "fb:referrals"
"""Every new referral touch, published for bots that greet users as they arrive."""

DEAD_LETTERS = "fb:dead"
"""A stream of events whose job function kept failing: raw payload, error, tries."""

ARQ_JOB_PREFIX = "arq:job:"
"""arq's job key prefix (arq.constants.job_key_prefix): ingest writes arq jobs directly."""

REPORT_PREFIX = "fb:report:"
"""`fb:report:<YYYY-MM-DD>:<part>`: the report's counters of one UTC day, the day taken from the
touch's timestamp (`report_day`; the parts are listed in shared/report.py, written by
workers/effects.lua)."""

REPORT_SCRATCH = "fb:report:scratch:"
"""`fb:report:scratch:<random>`: a report's union of the days' HyperLogLogs, built a few days at
a time and deleted once read (it expires after a minute if the report is cut short)."""

REPORT_ADS = "fb:report:ads"
"""A hash of ad id -> ad title, from the `ads_context_data` of ad touches."""

READY_PROBE = "fb:ready"
"""Written with a short TTL by the ingest's `/readyz`: ready means Redis takes writes."""


def stream(kind: str) -> str:
    return STREAM_PREFIX + kind


def attribution(user: str) -> str:
    return ATTR_PREFIX + user


def lane(n: int) -> str:
    return f"{LANE_PREFIX}{n}"


def lane_job(n: int) -> str:
    return f"{LANE_JOB_PREFIX}{n}"


def forward_lane(n: int) -> str:
    return f"{FORWARD_PREFIX}{n}"


def forward_job(n: int) -> str:
    return f"{FORWARD_JOB_PREFIX}{n}"


def forward_replayed(event_id: str) -> str:
    return f"{FORWARD_REPLAYED_PREFIX}{event_id}"


def seen(event_id: str) -> str:
    return SEEN_PREFIX + event_id


def report_day(day: str, part: str) -> str:
    """One of the report's keys of a UTC day, `day` written YYYY-MM-DD: `n`, `new`, `ret`,
    `<dimension>` or `<dimension>:new` (see shared/report.py)."""
    return f"{REPORT_PREFIX}{day}:{part}"


def health_check(queue: str, host: str) -> str:
    """`<queue>:health-check:<host>`: written by the worker on `host` every few seconds (arq's
    health check, one key per worker host so that each container can be checked on its own)."""
    return f"{queue}:health-check:{host}"
