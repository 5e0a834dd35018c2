"""All configuration, read from the environment in one place and validated at start-up."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TypeVar
from urllib.parse import urlsplit

from shared.errors import ConfigError
from shared.sentinel import is_sentinel_url
from shared.sentinel import parse as parse_sentinel_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


N = TypeVar("N", int, float)


def _number(cast: Callable[[str], N], what: str, lo: N, hi: N) -> Callable[[str, str], N]:
    def parse(name: str, raw: str) -> N:
        try:
            value = cast(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _int(lo: int, hi: int) -> Callable[[str, str], int]:
    return _number(int, "a whole number", lo, hi)


def _float(lo: float, hi: float) -> Callable[[str, str], float]:
    return _number(float, "a number", lo, hi)


PLACEHOLDER_PREFIX = "change-me"
"""How the values of `.env.example` begin: a copied `.env` left as it is must not start."""

MAX_FORWARD_AGE_S = 30 * 86400
"""The longest FORWARD_MAX_AGE_SECONDS allowed (a replayed delivery's mark lives this long)."""


def _not_placeholder(name: str, value: str) -> None:
    if value.lower().startswith(PLACEHOLDER_PREFIX):
        raise ConfigError(f"{name} still holds a {PLACEHOLDER_PREFIX}-... placeholder from "
                          ".env.example: set your own value")


def _secrets(name: str, raw: str) -> tuple[bytes, ...]:
    secrets = tuple(s.strip() for s in raw.split(",") if s.strip())
    if not secrets:
        raise ConfigError(f"{name} must hold at least one secret (comma-separated for rotation)")
    for secret in secrets:
        _not_placeholder(name, secret)
    return tuple(s.encode() for s in secrets)


def _token(name: str, raw: str) -> str:
    _not_placeholder(name, raw)
    if len(raw) < 8:
        raise ConfigError(f"{name} must be at least 8 characters long")
    return raw


def _http_url(name: str, raw: str) -> str:
    if not raw.startswith(("http://", "https://")) or len(raw) < 10:
        # Not echoed: a bot's URL may carry its credentials (user:password@, ?key=).
        raise ConfigError(f"{name} must be an http:// or https:// URL")
    return raw


def _forward_secret(name: str, raw: str) -> bytes:
    _not_placeholder(name, raw)
    if len(raw) < 8:
        raise ConfigError(f"{name} must be at least 8 characters long")
    return raw.encode()


def _kinds(name: str, raw: str) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in raw.split(",") if k.strip())
    if not kinds:
        raise ConfigError(f"{name} must list kinds, comma-separated (message,postback,...)")
    return kinds


def _redis_url(name: str, raw: str) -> str:
    if is_sentinel_url(raw):
        try:
            parse_sentinel_url(raw)
        except ValueError as exc:
            raise ConfigError(f"{name} is not a valid Sentinel URL: {exc}") from None
    elif not raw.startswith(("redis://", "rediss://", "unix://")):
        # Named only when it is plainly a scheme: a URL that lost its `//` holds its password
        # where a scheme would be (`redis:/:secret@redis`), and none of it may be printed.
        scheme, found, _ = raw.partition("://")
        shown = f", not {scheme!r}" if found and scheme.isalpha() else ""
        raise ConfigError(f"{name} must start with redis://, rediss://, unix://, "
                          f"redis+sentinel:// or rediss+sentinel://{shown}")
    elif not raw.startswith("unix://"):
        try:
            urlsplit(raw).port  # noqa: B018 - raises for a port that is no number in range
        except ValueError:
            raise ConfigError(f"{name} has a port that is not a number from 0 to 65535") from None
    return raw


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _text(name: str, raw: str) -> str:
    if not raw:
        raise ConfigError(f"{name} must not be empty")
    return raw


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting the ingest and the workers read. Build it with `Settings.from_env()`."""

    fb_app_secrets: tuple[bytes, ...]
    fb_verify_token: str
    api_token: str
    redis_url: str = DEFAULT_REDIS_URL
    ingest_host: str = "0.0.0.0"  # noqa: S104 - a container listens on every interface
    ingest_port: int = 8080
    max_body_bytes: int = 1_048_576
    body_timeout_s: float = 10.0
    max_bodies_buffering: int = 8
    ingest_metrics_port: int = 0
    redis_timeout_s: float = 1.5
    ack_replicas: int = 0
    dedupe_ttl_s: int = 172_800
    stream_maxlen: int = 1_000_000
    history_cap: int = 10
    queue_name: str = "fb:queue"
    job_max_events: int = 100
    job_timeout_s: int = 60
    job_max_tries: int = 5
    worker_max_jobs: int = 32
    lanes: int = 128
    worker_lease_s: float = 5.0
    forward_url: str = ""
    forward_secret: bytes = b""
    forward_kinds: frozenset[str] = frozenset()
    """Empty: every kind is forwarded."""
    forward_timeout_s: float = 10.0
    forward_max_age_s: int = 86_400
    forward_concurrency: int = 16
    worker_poll_delay_s: float = 0.05
    worker_metrics_port: int = 0
    watchdog_s: int = 900
    log_format: str = "auto"
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raise ConfigError naming the first bad variable."""
        settings = cls(**_read(os.environ if environ is None else environ))  # type: ignore[arg-type]
        if settings.forward_url and not settings.forward_secret:
            raise ConfigError("FORWARD_SECRET is required when FORWARD_URL is set: the bot checks "
                              "the X-Hub-Signature-256 it signs")
        if settings.forward_url and settings.forward_concurrency >= settings.worker_max_jobs:
            raise ConfigError("FORWARD_CONCURRENCY must be less than WORKER_MAX_JOBS "
                              f"({settings.worker_max_jobs}): forward runs would leave the lanes "
                              f"no job slot, got {settings.forward_concurrency}")
        if settings.forward_url and settings.forward_timeout_s >= settings.job_timeout_s / 2:
            # A forward run sends for up to half the job timeout, then one POST may take this.
            raise ConfigError("FORWARD_TIMEOUT_SECONDS must be less than half of "
                              f"JOB_TIMEOUT_SECONDS ({settings.job_timeout_s}), got "
                              f"{settings.forward_timeout_s:g}")
        return settings

    @classmethod
    def for_tools(
        cls, environ: Mapping[str, str] | None = None, *, redis_url: str | None = None
    ) -> Settings:
        """Settings for a command-line tool that only works on Redis: like `from_env`, but the
        secrets may be unset (they are then empty) and `redis_url`, when given (`--redis-url`),
        takes the place of REDIS_URL."""
        env = dict(os.environ if environ is None else environ)
        if redis_url is not None:
            env["REDIS_URL"] = _redis_url("--redis-url", redis_url)
        return cls(**_no_secrets(_read(env, optional=_SECRETS)))  # type: ignore[arg-type]

    @classmethod
    def best_effort(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Every valid variable's value, the default for the others (secrets empty when unset
        or invalid): what would be in force, for display next to `problems`, never to run."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in _SPEC:
            with contextlib.suppress(ConfigError):
                values.update(_read(env, optional=_SECRETS, only=name))
        return cls(**_no_secrets(values))  # type: ignore[arg-type]

    @staticmethod
    def problems(environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Every bad variable and what is wrong with it; empty when `from_env` would succeed.
        For `fbhook check-config`, which reports them all at once."""
        env = os.environ if environ is None else environ
        out: dict[str, str] = {}
        for name in _SPEC:
            try:
                _read(env, only=name)
            except ConfigError as exc:
                out[name] = str(exc)
        return out

    def redacted(self) -> dict[str, object]:
        """The settings with every secret replaced, fit for a log line or `check-config`."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"fb_app_secrets", "fb_verify_token", "api_token", "forward_secret"}:
                value = "<set>" if value else "<unset>"
            elif f.name == "redis_url":
                value = redact_url(value)
            out[f.name] = value
        return out


def redact_url(url: str) -> str:
    """Hide the passwords of a Redis URL: the one before `@` and any `...password=` option."""
    scheme, sep, rest = url.partition("://")
    rest, question, query = rest.partition("?")
    if question:
        query = re.sub(r"((?:^|&)[^=&]*password=)[^&]*", r"\1***", query, flags=re.IGNORECASE)
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        rest = f"{creds.split(':', 1)[0]}:***@{host}"
    return f"{scheme}{sep}{rest}{question}{query}"


# variable -> (Settings field, parser, required)
_SPEC: dict[str, tuple[str, Callable[[str, str], object], bool]] = {
    "FB_APP_SECRET": ("fb_app_secrets", _secrets, True),
    "FB_VERIFY_TOKEN": ("fb_verify_token", _token, True),
    "API_TOKEN": ("api_token", _token, True),
    "REDIS_URL": ("redis_url", _redis_url, False),
    "INGEST_HOST": ("ingest_host", _text, False),
    "INGEST_PORT": ("ingest_port", _int(1, 65535), False),
    "MAX_BODY_BYTES": ("max_body_bytes", _int(1024, 64 * 1024 * 1024), False),
    "BODY_TIMEOUT_SECONDS": ("body_timeout_s", _float(0.1, 600.0), False),
    "MAX_BODIES_BUFFERING": ("max_bodies_buffering", _int(1, 10_000), False),
    "INGEST_METRICS_PORT": ("ingest_metrics_port", _int(0, 65535), False),
    "REDIS_TIMEOUT_SECONDS": ("redis_timeout_s", _float(0.05, 30.0), False),
    "ACK_REPLICAS": ("ack_replicas", _int(0, 16), False),
    "DEDUPE_TTL_SECONDS": ("dedupe_ttl_s", _int(60, 30 * 86400), False),
    "STREAM_MAXLEN": ("stream_maxlen", _int(100, 1_000_000_000), False),
    "HISTORY_CAP": ("history_cap", _int(1, 1000), False),
    "QUEUE_NAME": ("queue_name", _text, False),
    "JOB_MAX_EVENTS": ("job_max_events", _int(1, 10_000), False),
    "JOB_TIMEOUT_SECONDS": ("job_timeout_s", _int(1, 3600), False),
    "JOB_MAX_TRIES": ("job_max_tries", _int(1, 100), False),
    "WORKER_MAX_JOBS": ("worker_max_jobs", _int(1, 1000), False),
    "LANES": ("lanes", _int(1, 65_536), False),
    "WORKER_LEASE_SECONDS": ("worker_lease_s", _float(1.0, 60.0), False),
    "FORWARD_URL": ("forward_url", _http_url, False),
    "FORWARD_SECRET": ("forward_secret", _forward_secret, False),
    "FORWARD_KINDS": ("forward_kinds", _kinds, False),
    "FORWARD_TIMEOUT_SECONDS": ("forward_timeout_s", _float(0.1, 300.0), False),
    "FORWARD_MAX_AGE_SECONDS": ("forward_max_age_s", _int(60, MAX_FORWARD_AGE_S), False),
    "FORWARD_CONCURRENCY": ("forward_concurrency", _int(1, 1000), False),
    "WORKER_POLL_DELAY_SECONDS": ("worker_poll_delay_s", _float(0.0, 10.0), False),
    "WORKER_METRICS_PORT": ("worker_metrics_port", _int(0, 65535), False),
    "WATCHDOG_SECONDS": ("watchdog_s", _int(0, 7 * 86400), False),
    "LOG_FORMAT": ("log_format", _choice("auto", "json", "text"), False),
    "LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error"), False),
}

_SECRETS = frozenset({"FB_APP_SECRET", "FB_VERIFY_TOKEN", "API_TOKEN"})


def _read(
    env: Mapping[str, str], *, optional: frozenset[str] = frozenset(), only: str | None = None
) -> dict[str, object]:
    """Parse the variables of `_SPEC` (or just `only`) into Settings field values."""
    values: dict[str, object] = {}
    for name, (field_name, parse, required) in _SPEC.items():
        if only is not None and name != only:
            continue
        raw = env.get(name)
        if raw is None or raw == "":
            if required and name not in optional:
                raise ConfigError(f"{name} is required but not set")
            continue
        values[field_name] = parse(name, raw)
    return values


def _no_secrets(values: dict[str, object]) -> dict[str, object]:
    """Empty values for the secrets that `values` lacks."""
    values.setdefault("fb_app_secrets", ())
    values.setdefault("fb_verify_token", "")
    values.setdefault("api_token", "")
    return values


def environ_with_defaults(
    defaults: Mapping[str, str], environ: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """A copy of the environment in which every variable of `defaults` that is unset or empty
    takes its default, and the names that did. For `fbhook dev`, which starts its children with
    local-only defaults."""
    env = dict(os.environ if environ is None else environ)
    applied = [name for name in defaults if not env.get(name)]
    for name in applied:
        env[name] = defaults[name]
    return env, applied
