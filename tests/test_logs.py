"""The access log: one line per request with what an operator needs, never a body or a secret."""

from __future__ import annotations

import io
import json
import logging
import sys

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from relayd.app import create_app
from relayd.observe import _Formatter
from relayd.routes import TABLE
from relayd.routing import Exposure, Route, RouteTable
from tests.conftest import RELAY_KEY, make_settings

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
        "relayd.errors", logging.INFO, __file__, 1, "unhandled error on %s %s", ("GET", FORGERY),
        None,
    )
    record.fields = {"model": FORGERY, "ke\ny": "v", "note": "a b=c"}
    line = _console(record)
    assert len(line.splitlines()) == 1, line
    assert line.isprintable()
    assert "x\\ninfo    relayd.access: access status=200\\r\\x1b[2K\\u2028\\u202e\\x85" in line
    assert 'ke\\ny=v' in line
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
    assert lines[0] == "error   relayd.errors: unhandled error"
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
    settings = make_settings(upstream_url=str(fake_server.make_url("")))
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
