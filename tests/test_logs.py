"""The access log: one line per request with what an operator needs, never a body or a secret."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relayd import logs
from relayd.app import create_app
from relayd.config import parse_keys_file
from relayd.logs import Access, _Formatter, setup_logging
from relayd.routes import TABLE
from relayd.routing import Exposure, Route, RouteTable
from relayd.upstream import failure_cause
from tests.conftest import RELAY_KEY, RelayFactory, make_settings
from tests.fakes.openai import FakeOpenAI

BODY_CANARY = "body-canary-7d1f0a"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.fields for r in caplog.records if r.name == "relayd.access"]  # type: ignore[attr-defined]


async def test_access_line_names_key_route_status_and_upstream_id(
    relay: TestClient, sdk: openai.AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    raw = await sdk.models.with_raw_response.list()
    [line] = [f for f in access_lines(caplog) if f["route"] == "/v1/models"]
    assert line["key"] == "team"
    assert line["method"] == "GET" and line["status"] == 200 and line["group"] == "models"
    assert line["upstream_request_id"] == raw.headers["x-request-id"]
    assert line["request_id"] == raw.headers["x-relay-request-id"]
    assert isinstance(line["overhead_ms"], float) and line["overhead_ms"] >= 0
    assert isinstance(line["bytes_out"], int) and line["bytes_out"] > 0


async def test_no_body_reaches_the_log_whatever_the_route(
    relay: TestClient, sdk: openai.AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    await sdk.responses.create(model="gpt-5", input=BODY_CANARY)
    stream = await sdk.responses.create(model="break", input=BODY_CANARY, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    with pytest.raises(openai.RateLimitError):
        await sdk.responses.create(model="error-429", input=BODY_CANARY)
    await sdk.files.create(file=("x.txt", BODY_CANARY.encode()), purpose="assistants")
    response = await relay.post(
        "/v1/responses:stream",
        data=b"{" + BODY_CANARY.encode(),
        headers={"Authorization": f"Bearer {RELAY_KEY}", "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert len(access_lines(caplog)) == 5
    for record in caplog.records:
        if not record.name.startswith(("relayd", "aiohttp")):
            continue  # the SDK's own debug log shows what it sent; that is not relayd's
        text = record.getMessage() + json.dumps(getattr(record, "fields", {}), default=str)
        assert BODY_CANARY not in text, record.name


def _record(level: int) -> logging.LogRecord:
    record = logging.LogRecord("relayd.access", level, __file__, 1, "access", None, None)
    record.fields = {"route": "/v1/models", "status": 200}
    return record


def test_json_lines_for_log_shippers() -> None:
    line = _Formatter(json_lines=True, journald=False).format(_record(logging.INFO))
    entry = json.loads(line)
    assert entry["route"] == "/v1/models" and entry["level"] == "info"


def test_journald_priority_prefixes() -> None:
    formatter = _Formatter(json_lines=False, journald=True)
    assert formatter.format(_record(logging.INFO)).startswith("<6>")
    assert formatter.format(_record(logging.ERROR)).startswith("<3>")
    assert formatter.format(_record(logging.WARNING)).startswith("<4>")


# ------------------------------------------------------------ issue 11: forged lines

FORGERY = "x\ninfo    relayd.access: access status=200\r\x1b[2K\u2028\u202e\x85"


def _console(record: logging.LogRecord) -> str:
    return _Formatter(json_lines=False, journald=False).format(record)


def test_a_console_record_stays_one_line_whatever_a_client_sent() -> None:
    record = logging.LogRecord(
        "relayd.errors",
        logging.INFO,
        __file__,
        1,
        "unhandled error on %s %s",
        ("GET", FORGERY),
        None,
    )
    record.fields = {"model": FORGERY, "ke\ny": "v", "note": "a b=c"}
    line = _console(record)
    assert len(line.splitlines()) == 1, line
    assert line.isprintable()
    assert "x\\ninfo    relayd.access: access status=200\\r\\x1b[2K\\u2028\\u202e\\x85" in line
    assert "ke\\ny=v" in line
    assert 'note="a b=c"' in line  # a value with spaces cannot pose as more fields
    assert 'model="x\\\\ninfo' in line


def test_a_traceback_keeps_its_lines_but_no_forged_line_starts_at_the_margin() -> None:
    try:
        raise RuntimeError(FORGERY)
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "relayd.errors", logging.ERROR, __file__, 1, "unhandled error", None, exc_info
    )
    lines = _console(record).split("\n")
    assert lines[0].endswith(f"error   [{os.getpid()}] relayd.errors: unhandled error")
    assert len(lines) > 2 and all(line.startswith("    ") for line in lines[1:])
    assert all(line.isprintable() for line in lines)


def test_json_lines_escape_what_a_client_sent() -> None:
    record = logging.LogRecord(
        "relayd.errors", logging.INFO, __file__, 1, "path %s", (FORGERY,), None
    )
    record.fields = {"model": FORGERY}
    line = _Formatter(json_lines=True, journald=False).format(record)
    assert len(line.splitlines()) == 1 and line.isprintable()
    entry = json.loads(line)
    assert entry["msg"] == "path " + FORGERY and entry["model"] == FORGERY


async def test_a_decoded_path_in_an_error_log_is_one_escaped_line(
    aiohttp_client: AiohttpClient, fake_server: TestServer
) -> None:
    async def boom(request: web.Request) -> web.StreamResponse:
        raise RuntimeError(f"cannot handle {request.path}")

    table = RouteTable(
        [Route("GET", "/boom/{x}", boom, "meta", Exposure.PUBLIC, "boom", "Fail"), *TABLE]
    )
    settings = make_settings(upstream={"url": str(fake_server.make_url(""))})
    client = await aiohttp_client(create_app(settings, table))
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(_Formatter(json_lines=False, journald=False))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        # U+2028 and U+0085 end a line for many readers; U+202E reverses the text after it.
        response = await client.get("/boom/a%E2%80%A8info%20relayd.access:%20forged%C2%85%E2%80%AE")
    finally:
        root.removeHandler(handler)
    assert response.status == 500
    [first] = [line for line in out.getvalue().splitlines() if "unhandled error" in line]
    assert "/boom/a\\u2028info relayd.access: forged\\x85\\u202e" in first
    assert not [line for line in out.getvalue().splitlines() if line.startswith("info relayd")]
    assert all(line.isprintable() for line in out.getvalue().splitlines())


# --------------------------------------------------------------------------- diagnosis


def warnings_from_relayd(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("relayd") and r.levelno >= logging.WARNING
    ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_upstream_logs_one_warning_with_request_id_key_and_cause(
    relay_factory: RelayFactory, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = await relay_factory(upstream={"url": f"http://127.0.0.1:{_closed_port()}"})
    response = await relay.get("/v1/models", headers=auth)
    assert response.status == 502
    [record] = warnings_from_relayd(caplog)
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["request_id"] == response.headers["X-Relay-Request-Id"]
    assert fields["key"] == "team" and fields["status"] == 502
    assert "refused" in fields["upstream_error"]
    assert record.exc_info is None  # one line, not a traceback


async def test_upstream_timeout_logs_one_warning_naming_the_timeout(
    relay_factory: RelayFactory, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = await relay_factory(upstream={"first_byte_timeout_s": 0.3})
    response = await relay.post("/v1/responses", json={"model": "silent"}, headers=auth)
    assert response.status == 504
    [record] = warnings_from_relayd(caplog)
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["key"] == "team" and "timed out" in fields["upstream_error"]


async def test_broken_stream_logs_one_warning_with_request_id_key_and_cause(
    relay: TestClient, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "break", "input": "hi", "stream": True}
    async with relay.post("/v1/responses", json=body, headers=auth) as response:
        request_id = response.headers["X-Relay-Request-Id"]
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await _access_line(caplog, request_id)
    [record] = warnings_from_relayd(caplog)
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["request_id"] == request_id and fields["key"] == "team"
    assert fields["upstream_error"].startswith("stream broke after ")
    assert fields["upstream_error"].endswith("closed the connection before the chunked body ended")


async def test_upstream_5xx_answer_logs_a_warning(
    relay: TestClient, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    response = await relay.post("/v1/responses", json={"model": "error-503"}, headers=auth)
    assert response.status == 503
    await _access_line(caplog, response.headers["X-Relay-Request-Id"])
    [record] = warnings_from_relayd(caplog)
    assert record.fields["upstream_error"] == "upstream answered HTTP 503"  # type: ignore[attr-defined]


def test_failure_causes_name_dns_and_tls_without_tracebacks() -> None:
    key = mock.Mock(host="api.example.com", port=443, ssl=True)
    dns = aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
    assert failure_cause(dns) == "DNS lookup failed for api.example.com: Name or service not known"
    cert = aiohttp.ClientConnectorCertificateError(key, ssl.SSLCertVerificationError("bad"))
    assert failure_cause(cert).startswith("TLS certificate of api.example.com:443 not accepted")
    reset = aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer")
    assert failure_cause(reset) == "connection reset by upstream"


async def _access_line(
    caplog: pytest.LogCaptureFixture, request_id: str | None = None, timeout: float = 5
) -> dict[str, Any]:
    """The access line for ``request_id`` (or the first), once it is written."""
    async with asyncio.timeout(timeout):
        while True:
            for fields in access_lines(caplog):
                if request_id is None or fields["request_id"] == request_id:
                    return fields
            await asyncio.sleep(0.01)


async def test_broken_stream_bytes_out_counts_what_reached_the_client(
    relay: TestClient, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "break", "input": "hi", "stream": True}
    received = 0
    async with relay.post("/v1/responses", json=body, headers=auth) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += len(chunk)
    line = await _access_line(caplog)
    assert received > 0
    assert received <= line["bytes_out"] <= received + 64  # at most a chunk's framing short


async def test_client_hangup_bytes_out_counts_what_was_sent(
    relay: TestClient, fake: FakeOpenAI, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake.pace = 2  # the client leaves during the first pause
    body = {"model": "slow", "input": "hi", "stream": True}
    response = await relay.post("/v1/responses", json=body, headers=auth)
    received = len(await response.content.readuntil(b"\n\n"))
    response.close()
    await fake.wait_cancelled("/v1/responses")
    line = await _access_line(caplog)
    assert line["status"] == 499
    assert line["bytes_out"] >= received > 0


def _stalling_upstream(stall: float, ending: str) -> web.Application:
    """SSE: one event, ``stall`` seconds of silence, then another event and ``ending``
    ("end" a clean end, "break" a dropped connection), for the relay-overhead tests."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        await asyncio.sleep(stall)
        await response.write(b'data: {"n": 2}\n\n')
        if ending == "break":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/responses", handler)
    return app


@pytest.mark.parametrize("ending", ["end", "break", "client_hangup"])
async def test_overhead_excludes_an_upstream_stall_mid_stream(
    ending: str,
    relay_factory: RelayFactory,
    aiohttp_server: AiohttpServer,
    auth: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    # A client that hangs up does so 0.5 s into a longer stall.
    stall = 30 if ending == "client_hangup" else 0.5
    upstream = await aiohttp_server(_stalling_upstream(stall, ending))
    relay = await relay_factory(upstream={"url": str(upstream.make_url(""))})
    body = {"model": "gpt-5", "input": "hi", "stream": True}
    async with relay.post("/v1/responses", json=body, headers=auth) as response:
        if ending == "client_hangup":
            await response.content.readuntil(b"\n\n")
            await asyncio.sleep(0.5)  # upstream is silent meanwhile
            response.close()
        else:
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await response.read()
    line = await _access_line(caplog)
    assert line["status"] == (499 if ending == "client_hangup" else 200)
    assert line["duration_ms"] >= 500
    assert line["overhead_ms"] < 150, line


async def test_overhead_excludes_time_blocked_on_a_slow_client(
    relay: TestClient, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    file_id = f"gen-{32 * 1024 * 1024}"  # the fake makes it up as it streams
    async with relay.get(f"/v1/files/{file_id}/content", headers=auth) as response:
        assert response.status == 200
        await asyncio.sleep(0.5)  # not reading: relayd's writes wait for the socket to drain
        size = len(await response.read())
    assert size == 32 * 1024 * 1024
    line = await _access_line(caplog)
    assert line["duration_ms"] >= 500 and line["bytes_out"] == size
    assert line["overhead_ms"] < 150, line


# --------------------------------------------------------------------------- the console line


def test_console_lines_carry_time_pid_and_client() -> None:
    record = _record(logging.INFO)
    record.fields["client"] = "192.0.2.7"  # type: ignore[attr-defined]
    line = _Formatter(json_lines=False, journald=False).format(record)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info +\[\d+\] relayd\.access:", line)
    assert f"[{os.getpid()}]" in line and "client=192.0.2.7" in line
    # The journal stamps each line itself; the pid still tells workers apart.
    journal = _Formatter(json_lines=False, journald=True).format(record)
    assert journal.startswith(f"<6>info    [{os.getpid()}] relayd.access:")
    entry = json.loads(_Formatter(json_lines=True, journald=False).format(record))
    assert entry["pid"] == os.getpid() and entry["client"] == "192.0.2.7"


async def test_access_line_names_the_client_address(
    relay: TestClient, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    await relay.get("/v1/models", headers=auth)
    assert (await _access_line(caplog))["client"] == "127.0.0.1"


# --------------------------------------------------------------------------- refusals


async def test_scope_refusal_logs_the_key_name(
    relay_factory: RelayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    keys = tmp_path / "keys"
    keys.write_text(f"scraper:{RELAY_KEY} scopes=metrics\n")
    relay = await relay_factory(auth={"keys": parse_keys_file(str(keys))})
    response = await relay.get("/v1/models", headers={"Authorization": f"Bearer {RELAY_KEY}"})
    assert response.status == 403
    line = await _access_line(caplog)
    assert line["key"] == "scraper" and line["status"] == 403


async def test_overhead_excludes_waiting_for_a_background_answer(
    relay_factory: RelayFactory, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = await relay_factory(actions={"answer_budget_s": 2, "poll_interval_s": 0.1})
    response = await relay.post(
        "/v1/actions/responses", json={"model": "wait-0.5", "input": "think"}, headers=auth
    )
    assert (await response.json())["status"] == "completed"
    line = await _access_line(caplog)
    assert line["duration_ms"] >= 500
    assert line["overhead_ms"] < 150, line


async def test_lines_of_one_loop_turn_leave_in_one_write_and_in_order() -> None:
    from relayd.logs import _TurnWriter

    out = io.StringIO()
    writer = _TurnWriter(_Formatter(json_lines=False, journald=False))
    writer.setStream(out)
    log = logging.getLogger("relayd.test_turn")
    log.addHandler(writer)
    log.propagate = False
    try:
        log.info("first")
        log.info("second")
        assert out.getvalue() == ""  # written at the end of the turn, not per line
        await asyncio.sleep(0)
        assert [line.split(": ", 1)[1] for line in out.getvalue().splitlines()] == [
            "first",
            "second",
        ]
        log.info("third")
        log.warning("fourth")  # a warning goes out at once, after what waited
        lines = out.getvalue().splitlines()
        assert [line.split(": ", 1)[1] for line in lines[2:]] == ["third", "fourth"]
    finally:
        log.removeHandler(writer)
        log.propagate = True


# --------------------------------------------------------------------------- whole lines


@contextlib.contextmanager
def production_logging(fmt: str) -> Iterator[io.StringIO]:
    """relayd's own logging (``setup_logging``, as ``relayd serve`` sets it up) writing
    into a buffer instead of stderr; the test's own handlers are set aside meanwhile."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    switches = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    setup_logging(fmt, "info")
    out = io.StringIO()
    root.handlers[0].setStream(out)  # type: ignore[attr-defined]
    try:
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = switches


async def _written(out: io.StringIO, count: int) -> list[str]:
    async with asyncio.timeout(5):
        while len(lines := out.getvalue().splitlines()) < count:
            await asyncio.sleep(0.01)
    return lines


_STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
_MS = r"\d+\.\d+"


def _pattern(line: str) -> str:
    """``line`` as a regular expression: ``{ms}`` stands for a duration, ``{stamp} `` for
    the time the console form starts with."""
    literal = re.escape(line).replace(re.escape("{ms}"), _MS)
    return literal.replace(re.escape("{stamp} "), _STAMP)


def _console_value(value: object) -> str:
    return f'"{value}"' if " " in str(value) else str(value)


@pytest.mark.parametrize("form", ["console", "journald", "json"])
async def test_access_lines_are_whole_and_exact_in_every_form(
    form: str, relay: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if form == "journald":
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    record_path = mock.patch.object(logs.access_log, "log", wraps=logs.access_log.log)
    with production_logging("json" if form == "json" else "console") as out, record_path as log:
        listed = await relay.get("/v1/models", headers={**auth, "X-Request-Id": "trace:7.a-b_c"})
        listed_bytes = len(await listed.read())
        failed = await relay.post("/v1/responses", json={"model": "error-503"}, headers=auth)
        failed_bytes = len(await failed.read())
        lost = await relay.get("/nowhere", headers=auth)
        lost_bytes = len(await lost.read())
        refused = await relay.get("/v1/models")
        refused_bytes = len(await refused.read())
        lines = await _written(out, 4)
    assert RELAY_KEY not in out.getvalue()
    assert not log.called  # relayd's own writer alone: the lines went out without a record
    pid = os.getpid()
    ids = [r.headers["X-Relay-Request-Id"] for r in (listed, failed, lost, refused)]
    assert ids[0] == "trace:7.a-b_c"
    upstream_ids = [listed.headers["X-Request-Id"], failed.headers["X-Request-Id"]]
    # level, then the fields in their order (None: left out of the console form).
    expected: list[tuple[str, dict[str, object]]] = [
        (
            "info",
            {
                "request_id": ids[0],
                "client": "127.0.0.1",
                "key": "team",
                "method": "GET",
                "route": "/v1/models",
                "group": "models",
                "status": 200,
                "bytes_in": None,
                "bytes_out": listed_bytes,
                "duration_ms": "{ms}",
                "overhead_ms": "{ms}",
                "upstream_request_id": upstream_ids[0],
            },
        ),
        (
            "warning",
            {
                "request_id": ids[1],
                "client": "127.0.0.1",
                "key": "team",
                "method": "POST",
                "route": "/v1/responses",
                "group": "responses",
                "status": 503,
                "bytes_in": len(b'{"model": "error-503"}'),
                "bytes_out": failed_bytes,
                "duration_ms": "{ms}",
                "overhead_ms": "{ms}",
                "upstream_request_id": upstream_ids[1],
                "upstream_error": "upstream answered HTTP 503",
            },
        ),
        (
            "info",
            {
                "request_id": ids[2],
                "client": "127.0.0.1",
                "key": None,
                "method": "GET",
                "route": None,
                "group": "unmatched",
                "status": 404,
                "bytes_in": None,
                "bytes_out": lost_bytes,
                "duration_ms": "{ms}",
                "overhead_ms": None,
                "upstream_request_id": None,
            },
        ),
        (
            "info",
            {
                "request_id": ids[3],
                "client": "127.0.0.1",
                "key": None,
                "method": "GET",
                "route": "/v1/models",
                "group": "models",
                "status": 401,
                "bytes_in": None,
                "bytes_out": refused_bytes,
                "duration_ms": "{ms}",
                "overhead_ms": None,
                "upstream_request_id": None,
            },
        ),
    ]
    assert len(lines) == len(expected)
    for line, (level, fields) in zip(lines, expected, strict=True):
        if form == "json":
            entry = json.loads(line)
            assert abs(entry["ts"] - time.time()) < 60 and round(entry["ts"], 3) == entry["ts"]
            head = {"ts": entry["ts"], "level": level, "pid": pid}
            head |= {"logger": "relayd.access", "msg": "access"}
            measured = {k: entry.get(k) if v == "{ms}" else v for k, v in fields.items()}
            assert all(type(entry[k]) is float for k, v in fields.items() if v == "{ms}")
            assert line == json.dumps(head | measured), line  # the very bytes, in order
            continue
        text = " ".join(f"{k}={_console_value(v)}" for k, v in fields.items() if v is not None)
        whole = f"{level:<7} [{pid}] relayd.access: access {text}"
        if form == "journald":  # the journal's priority, and no time stamp of relayd's
            whole = f"<{4 if level == 'warning' else 6}>{whole}"
        else:
            whole = "{stamp} " + whole
        assert re.fullmatch(_pattern(whole), line), (line, whole)


_ACCESS_VALUES: list[dict[str, Any]] = [
    {
        "request_id": "0f3a",
        "client": "127.0.0.1",
        "key": "team",
        "method": "GET",
        "route": "/v1/models",
        "group": "models",
        "status": 200,
        "bytes_in": None,
        "bytes_out": 266,
        "duration_ms": 7.04,
        "overhead_ms": 0.0,
        "upstream_request_id": "req_1",
        "failure": None,
        "operation": None,
    },
    {
        "request_id": "trace:7.a-b_c",  # a sane token, always (logs._request_id)
        "client": 'a b="c"',
        "key": "",
        "method": "PO\nST",
        "route": None,
        "group": "unmatched",
        "status": 499,
        "bytes_in": 0,
        "bytes_out": 0,
        "duration_ms": 1e-05,
        "overhead_ms": None,
        "upstream_request_id": FORGERY,
        "failure": 'stream broke after 3 bytes: x=y \\ "z"',
        "operation": "getRelayInfo",
    },
]


@pytest.mark.parametrize("values", _ACCESS_VALUES, ids=["plain", "hostile"])
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
@pytest.mark.parametrize("journald", [False, True], ids=["console", "journald"])
def test_an_access_line_written_without_a_record_is_the_records_line(
    values: dict[str, Any], level: int, journald: bool
) -> None:
    fields = {k: v for k, v in values.items() if k not in ("failure", "operation")}
    if values["failure"] is not None:
        fields["upstream_error"] = values["failure"]
    if values["operation"] is not None:
        fields["operation"] = values["operation"]
    record = logging.LogRecord("relayd.access", level, __file__, 1, "access", None, None)
    record.created = 1796315906.0405
    record.fields = fields
    form = _Formatter(json_lines=False, journald=journald)
    line = form.access_line(record.created, level, Access(**values))
    assert line == form.format(record)
    assert len(line.splitlines()) == 1 and line.isprintable()
