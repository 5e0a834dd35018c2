"""Settings, timestamps and signatures: the small pieces everything else relies on."""

from __future__ import annotations

import pytest

from ingest.signature import SignatureVerifier, sign
from shared.errors import ConfigError
from shared.settings import Settings
from shared.timestamps import to_millis

BASE = {"FB_APP_SECRET": "s1,s2", "FB_VERIFY_TOKEN": "verify-token", "API_TOKEN": "api-token-x"}


def test_settings_defaults_and_secret_list() -> None:
    settings = Settings.from_env(BASE)
    assert settings.fb_app_secrets == (b"s1", b"s2")
    assert settings.ingest_port == 8080
    assert settings.dedupe_ttl_s >= 86400


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FB_APP_SECRET": ""}, "FB_APP_SECRET"),
        ({"FB_APP_SECRET": " , "}, "FB_APP_SECRET"),
        ({"FB_VERIFY_TOKEN": None}, "FB_VERIFY_TOKEN"),
        ({"API_TOKEN": "short"}, "API_TOKEN"),
        ({"INGEST_PORT": "eighty"}, "INGEST_PORT"),
        ({"INGEST_PORT": "70000"}, "INGEST_PORT"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"DEDUPE_TTL_SECONDS": "1"}, "DEDUPE_TTL_SECONDS"),
    ],
)
def test_a_bad_setting_is_named(env: dict[str, str | None], named: str) -> None:
    merged = {k: v for k, v in {**BASE, **env}.items() if v is not None}
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(merged)


def test_redacted_settings_hide_secrets() -> None:
    settings = Settings.from_env({**BASE, "REDIS_URL": "redis://user:hunter22@redis:6379/0"})
    shown = str(settings.redacted())
    for secret in ("s1", "verify-token", "api-token-x", "hunter22"):
        assert f"'{secret}'" not in shown and secret not in shown.replace("redis:6379", "")


@pytest.mark.parametrize(
    ("raw", "ms"),
    [
        (1458692752478, 1458692752478),
        (1701599111, 1701599111000),
        ("1527459824", 1527459824000),
        ("1458692752478", 1458692752478),
        (1458692752478.9, 1458692752479),
        (1.458692752478e12, 1458692752478),
        (None, None),
        ("soon", None),
        (True, None),
        (-5, None),
        ({}, None),
    ],
)
def test_timestamps_normalise_to_milliseconds(raw: object, ms: int | None) -> None:
    assert to_millis(raw) == ms


def test_signature_accepts_every_listed_secret_and_nothing_else() -> None:
    verifier = SignatureVerifier((b"new", b"old"))
    body = '{"entry":[]} é'.encode()
    assert verifier.verify(sign(b"new", body), body)
    assert verifier.verify(sign(b"old", body), body)
    assert not verifier.verify(sign(b"other", body), body)
    assert not verifier.verify(sign(b"new", body + b" "), body)
    assert not verifier.verify(None, body)
    assert not verifier.verify("sha1=" + sign(b"new", body)[7:], body)
    assert verifier.verify(sign(b"new", body).upper().replace("SHA256=", "sha256="), body)
