"""The access log: one line per request with what an operator needs, never a body or a secret."""

from __future__ import annotations

import json
import logging

import openai
import pytest
from aiohttp.test_utils import TestClient

from relayd.observe import _Formatter
from tests.conftest import RELAY_KEY

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
