"""The ingest's edges: no request of any shape gets a 500, the read API's answers are neither
cached nor sniffed, malformed HTTP is one quiet counted line, /metrics can move to its own port.

Requests that a client library would refuse to send go over raw sockets (tests/rawhttp.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from ingest.app import create_app
from ingest.signature import sign
from shared.report import ReportRangeError, parse_range
from shared.settings import Settings
from tests.conftest import API_TOKEN, SECRET, VERIFY_TOKEN, Post
from tests.rawhttp import Answer, exchange, request
from tests.redis_server import free_port

EXAMPLES = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

BEARER = b"Bearer " + API_TOKEN.encode()
ITEM = {"sender": {"id": "u-edge"}, "recipient": {"id": "p1"}, "timestamp": 1_700_000_000_000,
        "referral": {"source": "SHORTLINK", "type": "OPEN_THREAD", "ref": "edge"}}
ENVELOPE = {"object": "page", "entry": [{"id": "p1", "time": 1, "messaging": [ITEM]}]}


async def send(client: TestClient[Any, Any], method: bytes, target: bytes,
               headers: list[tuple[bytes, bytes]] = [], body: bytes = b"") -> Answer:  # noqa: B006
    assert client.server.port is not None
    return await exchange(client.server.port, request(method, target, headers, body),
                          head=method == b"HEAD")


# --------------------------------------------------------------------------- tokens and dates


NOT_UTF8 = [b"Bearer \xff\xfe\xfd", b"\xc3\x28 \xa0\xa1", b"Bearer " + API_TOKEN.encode() + b"\xff",
            b"Bearer \xed\xa0\x80"]


@pytest.mark.parametrize("value", NOT_UTF8,
                         ids=["ff-fe", "bad-scheme", "token-and-ff", "surrogate"])
@pytest.mark.parametrize("path", [b"/attribution/u1", b"/report", b"/report.json"])
async def test_an_authorization_header_that_is_not_utf8_gets_401(
    value: bytes, path: bytes, client: TestClient[Any, Any]
) -> None:
    answer = await send(client, b"GET", path, [(b"Authorization", value)])
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("target", "status"), [
    (b"/report?token=%FF%FE", 401), (b"/report?token=%ED%A0%80", 401),
    (b"/report.json?token=\xff", 400),  # raw, not %-encoded: aiohttp's parser refuses the line
    (b"/webhook?hub.mode=subscribe&hub.verify_token=%FF&hub.challenge=1", 403),
    (b"/webhook?hub.mode=subscribe&hub.verify_token=%ED%A0%80&hub.challenge=1", 403),
])
async def test_a_query_token_that_is_not_utf8_is_refused(
    target: bytes, status: int, client: TestClient[Any, Any]
) -> None:
    answer = await send(client, b"GET", target)
    assert answer.status == status


async def test_the_handshake_echoes_a_challenge_that_is_not_utf8_without_failing(
    client: TestClient[Any, Any]
) -> None:
    target = b"/webhook?hub.mode=subscribe&hub.verify_token=" + VERIFY_TOKEN.encode() + \
        b"&hub.challenge=%FF%ED%A0%80"
    answer = await send(client, b"GET", target)
    assert answer.status == 200
    assert answer.headers["x-content-type-options"] == "nosniff"


BAD_RANGES = {
    "to-in-the-first-days-of-year-1": "to=0001-01-05",
    "to-on-year-1-day-1": "to=0001-01-01",
    "year-10000": "to=10000-01-01",
    "no-such-day": "from=2024-02-30&to=2024-03-01",
    "not-a-date": "from=yesterday",
    "reversed": "from=2024-03-02&to=2024-03-01",
    "too-long": "from=2020-01-01&to=2024-01-01",
    "nul-byte": "to=2024-01-01%00",
}


@pytest.mark.parametrize("query", BAD_RANGES.values(), ids=BAD_RANGES.keys())
@pytest.mark.parametrize("path", ["/report", "/report.json"])
async def test_a_bad_report_range_gets_400_with_a_reason(
    query: str, path: str, client: TestClient[Any, Any]
) -> None:
    answer = await send(client, b"GET", f"{path}?{query}".encode(), [(b"Authorization", BEARER)])
    assert answer.status == 400
    assert "error" in json.loads(answer.body)


def test_parse_range_raises_only_report_range_errors_for_the_first_and_last_days() -> None:
    with pytest.raises(ReportRangeError, match="0001-01-01"):
        parse_range(None, "0001-01-05")
    assert parse_range(None, "0001-01-30") == (dt.date(1, 1, 1), dt.date(1, 1, 30))
    assert parse_range("9999-12-01", "9999-12-31") == (dt.date(9999, 12, 1), dt.date(9999, 12, 31))
    assert parse_range(None, None, today=dt.date(2024, 3, 30)) == (
        dt.date(2024, 3, 1), dt.date(2024, 3, 30))


dates_or_text = st.none() | st.text(max_size=12) | st.dates().map(dt.date.isoformat)


@given(start=dates_or_text, end=dates_or_text)
@example(start=None, end="0001-01-05")
@settings(max_examples=300)
def test_parse_range_never_raises_anything_but_a_report_range_error(
    start: str | None, end: str | None
) -> None:
    try:
        first, last = parse_range(start, end)
    except ReportRangeError:
        return
    assert first <= last


# --------------------------------------------------------------------------- no-store, nosniff


NO_STORE = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


@pytest.mark.parametrize(("target", "auth", "status"), [
    (b"/healthz", False, 200),
    (b"/readyz", False, 200),
    (b"/attribution/u-edge", True, 200),
    (b"/attribution/nobody", True, 404),
    (b"/attribution/u-edge", False, 401),
    (b"/report.json", True, 200),
    (b"/report.json", False, 401),
    (b"/report.json?to=nope", True, 400),
    (b"/report.json?limit=-1", True, 400),
    (b"/report?format=json", True, 200),
    # Only what the error messages say is taken: dates YYYY-MM-DD, a limit of ASCII digits.
    (b"/report.json?from=2026-W48-1", True, 400),
    (b"/report.json?to=20261201", True, 400),
    (b"/report.json?limit=1_0", True, 400),
    (b"/report.json?limit=%EF%BC%91", True, 400),
    (b"/report.json?limit=%201%20", True, 400),
    (b"/report.json?limit=" + b"0" * 5000 + b"7", True, 200),
    (b"/report.json?limit=" + b"9" * 5000, True, 400),
])
async def test_json_answers_are_never_cached_nor_sniffed(
    target: bytes, auth: bool, status: int, client: TestClient[Any, Any], post: Post,
    drain: Any,
) -> None:
    assert (await post(ENVELOPE)).status == 200
    await drain()
    answer = await send(client, b"GET", target, [(b"Authorization", BEARER)] if auth else [])
    assert answer.status == status, answer.body
    assert answer.headers["content-type"].startswith("application/json")
    assert {k: answer.headers.get(k) for k in NO_STORE} == NO_STORE
    json.loads(answer.body)


# --------------------------------------------------------------------------- any request at all


ENDPOINTS = [b"/webhook", b"/healthz", b"/readyz", b"/attribution/u-edge", b"/attribution/",
             b"/report", b"/report.json", b"/metrics", b"/", b"/nowhere"]
HEADER_NAMES = [b"Authorization", b"Content-Type", b"X-Hub-Signature-256", b"Accept",
                b"Accept-Encoding", b"Content-Encoding", b"Cookie", b"Range", b"If-None-Match",
                b"Origin", b"X-Forwarded-For", b"Upgrade", b"Connection", b"Expect",
                b"X-Odd"]
QUERY_NAMES = ["from", "to", "limit", "format", "token", "hub.mode", "hub.verify_token",
               "hub.challenge", "x"]

raw_header_values = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
field_values = st.binary(max_size=40).map(  # what RFC 9110 allows in a field value
    lambda b: bytes(c for c in b if c == 0x20 or 0x21 <= c <= 0x7E or c >= 0x80).strip())
header_values = (raw_header_values | field_values
                 | st.builds(lambda scheme, v: scheme + v,
                             st.sampled_from([b"Bearer ", b"bearer  ", b"Basic ", b""]),
                             field_values))
query_values = (st.binary(max_size=16).map(lambda b: quote_from_bytes(b, safe=b"").encode())
                | st.dates().map(lambda d: d.isoformat().encode())
                | st.integers().map(lambda n: str(n).encode()))
raw_query_values = st.binary(max_size=12).filter(
    lambda b: not set(b) & set(b" \r\n#"))


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    path = draw(st.sampled_from(ENDPOINTS))
    if draw(st.booleans()):  # more path: %-encoded bytes, or raw ones
        path += draw(st.binary(max_size=10).map(lambda b: quote_from_bytes(b).encode())
                     | raw_query_values.map(lambda b: b.replace(b"?", b"")))
    pairs = draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES).map(str.encode),
                                    query_values | raw_query_values), max_size=4))
    if not pairs:
        return path
    return path + b"?" + b"&".join(name + b"=" + value for name, value in pairs)


headers_lists = st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values), max_size=5)


@given(method=st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS"]),
       target=targets(), headers=headers_lists, body=st.binary(max_size=64))
@EXAMPLES
async def test_no_request_to_any_endpoint_gets_a_5xx(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
    client: TestClient[Any, Any],
) -> None:
    answer = await send(client, method, target, headers, body)
    assert 200 <= answer.status < 500, (answer.status, answer.body)


@given(path=st.sampled_from([b"/attribution/u-edge", b"/report", b"/report.json"]),
       target=targets(), headers=headers_lists)
@EXAMPLES
async def test_no_authorised_read_gets_a_5xx(
    path: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
    client: TestClient[Any, Any],
) -> None:
    """With the token, requests get past the check into the handlers' own parsing."""
    query = target.partition(b"?")[2]
    sent = [(b"Authorization", BEARER), *[h for h in headers if h[0] != b"Authorization"]]
    answer = await send(client, b"GET", path + (b"?" + query if query else b""), sent)
    assert answer.status in (200, 400, 404, 417), (answer.status, answer.body)


@given(headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), field_values), max_size=5),
       signed=st.booleans())
@EXAMPLES
async def test_a_signed_webhook_is_accepted_whatever_other_headers_come_with_it(
    headers: list[tuple[bytes, bytes]], signed: bool, client: TestClient[Any, Any],
) -> None:
    body = json.dumps(ENVELOPE).encode()
    odd = [h for h in headers
           if h[0] not in (b"Content-Type", b"X-Hub-Signature-256", b"Content-Encoding",
                           b"Upgrade", b"Connection", b"Expect")]
    signature = sign(SECRET, body).encode() if signed else b"sha256=" + b"0" * 64
    sent = [(b"Content-Type", b"application/json"), (b"X-Hub-Signature-256", signature), *odd]
    answer = await send(client, b"POST", b"/webhook", sent, body)
    assert answer.status == (200 if signed else 403), answer.body


@pytest.mark.parametrize(("method", "target", "expect", "status"), [
    (b"GET", b"/healthz", b"\x80", 417),
    (b"GET", b"/nowhere", b"\xff\xfe", 417),
    (b"PUT", b"/webhook", b"\xed\xa0\x80", 417),
    (b"GET", b"/healthz", b"100-continue", 200),
    (b"GET", b"/nowhere", b"100-continue", 404),
    (b"PUT", b"/webhook", b"100-continue", 405),
])
async def test_an_expect_header_gets_its_answer_whatever_its_bytes(
    method: bytes, target: bytes, expect: bytes, status: int, client: TestClient[Any, Any],
) -> None:
    """aiohttp's own Expect handler answered 500 to a value that is not UTF-8."""
    answer = await send(client, method, target, [(b"Expect", expect)])
    assert answer.status == status


async def test_a_signed_webhook_sent_with_expect_100_continue_is_accepted(
    client: TestClient[Any, Any],
) -> None:
    body = json.dumps(ENVELOPE).encode()
    assert client.server.port is not None
    raw = request(b"POST", b"/webhook", [(b"Content-Type", b"application/json"),
                                         (b"X-Hub-Signature-256", sign(SECRET, body).encode()),
                                         (b"Expect", b"100-continue")], body)
    head, _, rest = raw.partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head + b"\r\n\r\n")
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(rest)
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()


@pytest.mark.parametrize(("method", "target", "status", "allow"), [
    (b"PUT", b"/webhook", 405, "GET,HEAD,POST"),
    (b"POST", b"/healthz", 405, "GET,HEAD"),
    (b"DELETE", b"/attribution/u1", 405, "GET,HEAD"),
    (b"GET", b"/nowhere", 404, None),
    (b"POST", b"/", 404, None),
])
async def test_paths_and_methods_no_route_takes_get_404_or_405(
    method: bytes, target: bytes, status: int, allow: str | None, client: TestClient[Any, Any],
) -> None:
    answer = await send(client, method, target)
    assert answer.status == status
    assert (",".join(sorted(answer.headers["allow"].split(","))) if allow else None) == allow


async def test_a_signed_webhook_sent_in_chunks_is_accepted(client: TestClient[Any, Any]) -> None:
    """No Content-Length: the body takes a slot, as a large one does, and is read whole."""
    items = [dict(ITEM, sender={"id": f"u-{n}"}) for n in range(400)]
    body = json.dumps({"object": "page", "entry": [{"id": "p1", "messaging": items}]}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 10_000):
            yield body[start:start + 10_000]
            await asyncio.sleep(0)

    response = await client.post("/webhook", data=chunks(), headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)})
    assert response.status == 200, await response.text()
    assert response.request_info.headers.get("Transfer-Encoding") == "chunked"


# --------------------------------------------------------------------------- malformed HTTP


def malformed_count() -> float:
    return REGISTRY.get_sample_value("fbhook_malformed_requests_total") or 0.0


MALFORMED = {
    "duplicated-content-type": request(
        b"POST", b"/webhook", [(b"Content-Type", b"application/json"),
                               (b"Content-Type", b"text/plain")], b"{}"),
    "bad-request-line": b"GET /webhook HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
    "bad-content-length": b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
    "two-content-lengths": request(b"POST", b"/webhook", [(b"Content-Length", b"3")], b"{}"),
    "header-without-colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "line-too-long": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_request_gets_400_one_quiet_line_and_is_counted(
    raw: bytes, client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    before = malformed_count()
    assert client.server.port is not None
    answer = await exchange(client.server.port, raw)
    assert answer.status == 400
    assert malformed_count() == before + 1
    lines = [r for r in caplog.records  # the test server's access log is off in production
             if r.name.startswith(("fbhook", "aiohttp")) and r.name != "aiohttp.access"]
    assert [(r.name, r.levelno, r.getMessage().split(":")[0]) for r in lines] == [
        ("fbhook.ingest", lines[0].levelno, "malformed HTTP request")]
    assert lines[0].levelno <= logging.INFO
    assert lines[0].exc_info is None
    assert all(r.exc_info is None and r.levelno < logging.WARNING for r in caplog.records)


async def test_a_handler_error_still_logs_its_traceback(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only parse errors are quietened: a bug in a handler stays loud."""
    import ingest.app

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ingest.app, "parse_range", broken)
    answer = await send(client, b"GET", b"/report.json", [(b"Authorization", BEARER)])
    assert answer.status == 500
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


# --------------------------------------------------------------------------- metrics port


async def test_metrics_move_to_their_own_port_when_one_is_set(
    aiohttp_client: Any, settings: Settings
) -> None:
    port = free_port()
    app = create_app(dataclasses.replace(settings, ingest_host="127.0.0.1",
                                         ingest_metrics_port=port))
    client: TestClient[Any, Any] = await aiohttp_client(app)
    assert (await client.get("/metrics")).status == 404
    assert (await client.get("/healthz")).status == 200
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert "fbhook_webhook_requests_total" in await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/webhook") as response:
        assert response.status == 404
    await client.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/metrics")


async def test_metrics_stay_on_the_public_port_when_no_port_is_set(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert "fbhook_malformed_requests_total" in await response.text()


@pytest.mark.parametrize(("headers", "first"), [
    ([(b"Content-Length", b"50000000"), (b"X-Hub-Signature-256", b"sha256=" + b"0" * 64)],
     b"HTTP/1.1 413"),
    ([(b"Content-Type", b"text/html"), (b"X-Hub-Signature-256", b"sha256=" + b"0" * 64)],
     b"HTTP/1.1 415"),
    ([], b"HTTP/1.1 403"),
    ([(b"X-Hub-Signature-256", b"sha256=" + b"0" * 64)], b"HTTP/1.1 100 Continue"),
], ids=["too-large", "not-json", "no-signature", "fine"])
async def test_expect_100_continue_is_not_granted_to_a_webhook_its_headers_refuse(
    headers: list[tuple[bytes, bytes]], first: bytes, client: TestClient[Any, Any]
) -> None:
    """The refusal comes instead of `100 Continue`: the client is never invited to send the body
    that its headers already refuse (it was: 100, then 413)."""
    sent = {b"Content-Type": b"application/json", b"Content-Length": b"100", **dict(headers)}
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + b"".join(
            name + b": " + value + b"\r\n" for name, value in sent.items()) + b"\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert line.startswith(first), line
