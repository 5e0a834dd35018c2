"""arq's Worker with a short claim: the one place fbhook adapts arq, by a public attribute.

arq claims a job with `arq:in-progress:<id>` for the job timeout plus 10 s (70 s by default), and
nothing renews it, so a killed worker's jobs wait that long. A lane job renews its claim as a
lease while it runs (workers/lanes.py `lease`); this worker makes the claim that short from the
start too (`in_progress_timeout_s`, the value arq's claim uses), so that a worker killed between
claiming a job and starting it costs no more than the lease either.
tests/test_lanes.py::test_a_claim_lasts_the_lease_not_the_job_timeout fails if arq stops
reading it.
"""

from __future__ import annotations

from typing import Any

from arq.worker import Worker


class LeasedWorker(Worker):
    def __init__(self, *args: Any, lease_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_progress_timeout_s = lease_s
