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
        # Strings are read as sent: digits whole (a float() would round 2**53 + 1), nothing
        # that float() alone would take (underscores, other scripts' digits, "infinity").
        ("9007199254740993", 9007199254740993),
        (" 1458692752478 ", 1458692752478),
        ("1_458_692_752_478", None),
        ("\uff11\uff14\uff15\uff18\uff16\uff19\uff12\uff17\uff15\uff12", None),
        ("\u0661\u0664\u0665\u0668\u0666\u0669\u0662\u0667\u0665\u0662", None),
        ("infinity", None),
        ("nan", None),
        ("-1", None),
        ("10000000000000000", None),
        ("00000000000000001458692752478", 1458692752478),
        ("9" * 100_000, None),
        ("1458692752.5", 1458692752500),
        ("", None),
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


def test_forward_kinds_no_kind_has_are_named_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from workers import registry
    from workers.__main__ import warn_unclassified_forward_kinds

    settings = Settings.from_env({**BASE, "FORWARD_URL": "http://127.0.0.1:9/hook",
                                  "FORWARD_SECRET": "forward-secret-1234567890",
                                  "FORWARD_KINDS": "message,mesage,feed,message_request"})

    async def handler(ctx: object, event: object) -> None:
        return None

    registry.on("message_request")(handler)
    try:
        with caplog.at_level("WARNING", logger="fbhook.worker"):
            odd = warn_unclassified_forward_kinds(settings)
    finally:
        registry.remove("message_request", handler)
    assert odd == ["feed", "mesage"]
    [record] = [r for r in caplog.records if r.name == "fbhook.worker"]
    assert "feed, mesage" in record.getMessage()
    assert record.forward_kinds == ["feed", "mesage"]  # type: ignore[attr-defined]
    without_url = Settings.from_env({**BASE, "FORWARD_KINDS": "mesage"})
    caplog.clear()
    assert warn_unclassified_forward_kinds(without_url) == ["mesage"]
    assert not caplog.records  # nothing is forwarded: nothing to warn about


@pytest.mark.parametrize(("name", "value"), [
    ("REDIS_URL", "redis:/:S3CRETPW@redis:6379/0"),  # lost a slash: the password reads as a scheme
    ("REDIS_URL", "S3CRETPW@redis:6379"),
    ("REDIS_URL", "redis//:S3CRETPW@redis:6379/0"),
    ("REDIS_URL", "redis://:S3CRETPW@127.0.0.1:notaport/0"),  # was a traceback, at connect
    ("REDIS_URL", "redis://:S3CRETPW@127.0.0.1:99999/0"),
    ("FORWARD_URL", "ftp://bot:S3CRETPW@bot.example/hook?key=S3CRETPW"),
])
def test_a_bad_url_is_named_without_printing_what_it_holds(name: str, value: str) -> None:
    env = {**BASE, name: value}
    if name == "FORWARD_URL":
        env["FORWARD_SECRET"] = "forward-secret-1234567890"
    with pytest.raises(ConfigError, match=name) as raised:
        Settings.from_env(env)
    assert "S3CRETPW" not in str(raised.value)
