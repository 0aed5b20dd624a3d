"""Tool calls against the clock, repeats that join the first call, and ChatGPT's traffic.

- A call answers within ``[mcp] answer_budget`` (small here) or hands back what
  checks the work later; the work goes on upstream.
- An identical call within ``[mcp] repeat_window`` (ChatGPT re-calls after its
  ~60 s ceiling) joins the first one: the fake upstream records one paid job.
- ChatGPT's observed request sequence, replayed: discover probe, initialize with
  its capabilities, initialized, tools/list, tools/call with its ``_meta`` and
  ``x-openai-*`` headers; the user's location and ids never reach a log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import OTHER_KEY, RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI
from tests.filehost import PNG

ACCEPT = "application/json, text/event-stream"


def headers(key: str = RELAY_KEY, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Accept": ACCEPT, **more}


async def call(
    relay: TestClient, name: str, arguments: dict[str, Any], key: str = RELAY_KEY
) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    response = await relay.post("/mcp", json=body, headers=headers(key))
    assert response.status == 200
    answer = await response.json()
    result: dict[str, Any] = answer["result"]
    return result


def posts(fake: FakeOpenAI, path: str) -> int:
    return sum(1 for s in fake.seen if (s.method, s.path) == ("POST", path))


@pytest.fixture
async def quick(relay_factory: RelayFactory) -> TestClient:
    return await relay_factory(
        mcp={"answer_budget_s": 0.6, "repeat_window_s": 30.0},
        actions={"poll_interval_s": 0.05},
        server={"public_url": "https://relay.example.com"},
    )


def slow_images(fake: FakeOpenAI, delay: float) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(delay)
        return web.json_response(
            {"created": 1, "data": [{"b64_json": base64.b64encode(PNG).decode()}]}
        )

    fake.script("POST", "/v1/images/generations", answer)


# ------------------------------------------------------------------ the budget


async def test_a_slow_model_answers_within_the_budget_with_the_tool_that_checks_it(
    quick: TestClient, fake: FakeOpenAI
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        result = await call(quick, "createActionResponse", {"input": "think", "model": "wait-1.5"})
    assert loop.time() - started < 0.6 + 0.3
    handle = result["structuredContent"]
    assert handle["status"] == "in_progress" and handle["id"].startswith("resp_")
    assert "getActionResponse" in result["content"][0]["text"]
    async with asyncio.timeout(5):  # each check waits up to the budget for the model
        done = await call(quick, "getActionResponse", {"response_id": handle["id"]})
        while done["structuredContent"].get("status") == "in_progress":
            done = await call(quick, "getActionResponse", {"response_id": handle["id"]})
    assert done["content"][0]["text"] == "answer to: think"
    assert posts(fake, "/v1/responses") == 1


async def test_past_the_budget_a_paid_call_hands_back_a_handle_and_goes_on(
    quick: TestClient, fake: FakeOpenAI
) -> None:
    slow_images(fake, 1.0)
    async with asyncio.timeout(5):
        first = await call(quick, "generateImageAction", {"prompt": "a dot"})
    assert first["isError"] is False
    assert first["structuredContent"]["status"] == "in_progress"
    assert "Call generateImageAction again with the same arguments" in first["content"][0]["text"]
    async with asyncio.timeout(5):
        again = await call(quick, "generateImageAction", {"prompt": "a dot"})  # joins, then done
    kinds = [block["type"] for block in again["content"]]
    assert kinds == ["text", "image", "resource_link"]
    assert posts(fake, "/v1/images/generations") == 1  # one paid job for both calls
    assert not any(s.cancelled for s in fake.seen)


async def test_a_read_past_the_budget_is_cancelled_and_says_so(
    quick: TestClient, fake: FakeOpenAI
) -> None:
    async def stuck(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.json_response({})

    fake.script("GET", "/v1/files/file-slow", stuck)
    async with asyncio.timeout(5):
        result = await call(quick, "getFileContentAction", {"file_id": "file-slow"})
    assert result["isError"] is True
    assert "did not answer within 0.6 s" in result["content"][0]["text"]
    await fake.wait_cancelled("/v1/files/file-slow", timeout=2)  # nothing left running upstream


# ------------------------------------------------------------------ repeats


async def test_an_identical_repeat_returns_the_same_handle_not_a_second_job(
    quick: TestClient, fake: FakeOpenAI
) -> None:
    arguments = {"input": "long job", "model": "wait-5"}
    async with asyncio.timeout(5):
        first, second = await asyncio.gather(
            call(quick, "createActionResponse", arguments),
            call(quick, "createActionResponse", arguments),
        )
        third = await call(quick, "createActionResponse", arguments)
    ids = {r["structuredContent"]["id"] for r in (first, second, third)}
    assert len(ids) == 1
    assert posts(fake, "/v1/responses") == 1


async def test_other_arguments_or_another_key_start_their_own_job(
    quick: TestClient, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(5):
        await call(quick, "createActionResponse", {"input": "a"})
        await call(quick, "createActionResponse", {"input": "b"})
        await call(quick, "createActionResponse", {"input": "a"}, key=OTHER_KEY)
        await call(quick, "createActionResponse", {"input": "a"})  # the first one's answer
    assert posts(fake, "/v1/responses") == 3


async def test_reads_are_never_joined(quick: TestClient, fake: FakeOpenAI) -> None:
    async with asyncio.timeout(5):
        for _ in range(2):
            await call(quick, "getActionResponse", {"response_id": "resp_x"})
            await call(quick, "proxyRequest", {"method": "GET", "path": "/v1/models"})
    assert sum(1 for s in fake.seen if s.path == "/v1/responses/resp_x") == 2
    assert sum(1 for s in fake.seen if s.path == "/v1/models") == 2  # a GET through the proxy


async def test_a_hang_up_does_not_throw_away_a_paid_job(
    quick: TestClient, fake: FakeOpenAI
) -> None:
    slow_images(fake, 0.4)
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "generateImageAction", "arguments": {"prompt": "kept"}},
    }
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.15):
            await quick.post("/mcp", json=body, headers=headers())
    await fake.wait_for(lambda: any(s.finished for s in fake.seen), timeout=3)
    async with asyncio.timeout(5):
        again = await call(quick, "generateImageAction", {"prompt": "kept"})
    assert [b["type"] for b in again["content"]] == ["text", "image", "resource_link"]
    assert posts(fake, "/v1/images/generations") == 1 and not any(s.cancelled for s in fake.seen)


# ------------------------------------------------------------------ ChatGPT, replayed

LOCATION = {
    "city": "Canarytown",
    "region": "Canary Region",
    "country": "PT",
    "latitude": 38.7223,
    "longitude": -9.1393,
}
SUBJECT = "v1/canary-subject-0f1e2d"
SESSION = "canary-session-77aa"
ORGANIZATION = "org-canary-55bb"
CHATGPT_HEADERS = {
    "User-Agent": "openai-mcp/1.0.0",
    "x-openai-session": SESSION,
    "x-openai-subject": SUBJECT,
    "Origin": "https://chatgpt.com",
}
CHATGPT_META = {
    "openai/userAgent": "Mozilla/5.0",
    "openai/locale": "pt-PT",
    "openai/userLocation": LOCATION,
    "openai/subject": SUBJECT,
    "openai/session": SESSION,
    "openai/organization": ORGANIZATION,
}
# The sequence a ChatGPT app sent (captured 2026-08/09): the 2026-07-28 probe, its
# fallback handshake, then the tools.
CHATGPT_SEQUENCE: list[tuple[dict[str, Any], dict[str, str], int]] = [
    (
        {
            "jsonrpc": "2.0",
            "id": "openai-mcp-discover",
            "method": "server/discover",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}},
        },
        {"MCP-Protocol-Version": "2025-11-25"},
        200,
    ),
    (
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {
                    "experimental": {"openai/visibility": {"enabled": True}},
                    "extensions": {
                        "io.modelcontextprotocol/ui": {"mimeTypes": ["text/html;profile=mcp-app"]}
                    },
                },
                "clientInfo": {"name": "openai-mcp", "version": "1.0.0"},
            },
        },
        {},
        200,
    ),
    (
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"MCP-Protocol-Version": "2025-11-25"},
        202,
    ),
    (
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
        {"MCP-Protocol-Version": "2025-11-25"},
        200,
    ),
    (
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {
                "name": "createActionResponse",
                "arguments": {"input": "Where is the nearest bakery?"},
                "_meta": CHATGPT_META,
            },
        },
        {"MCP-Protocol-Version": "2025-11-25"},
        200,
    ),
]


async def test_chatgpts_request_sequence_works_and_its_user_fields_are_never_logged(
    relay_factory: RelayFactory, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    relay = await relay_factory(actions={"poll_interval_s": 0.05})
    answers = []
    async with asyncio.timeout(10):
        for message, extra, status in CHATGPT_SEQUENCE:
            response = await relay.post(
                "/mcp", json=message, headers={**headers(), **CHATGPT_HEADERS, **extra}
            )
            assert response.status == status, message["method"]
            assert "Mcp-Session-Id" not in response.headers
            text = await response.text()
            answers.append(json.loads(text) if text else None)
    discover, initialize, _, listed, called = answers
    assert discover["error"]["code"] == -32601 and discover["id"] == "openai-mcp-discover"
    assert initialize["result"]["protocolVersion"] == "2025-11-25"
    assert "createActionResponse" in [t["name"] for t in listed["result"]["tools"]]
    assert called["result"]["content"][0]["text"] == "answer to: Where is the nearest bakery?"
    # Nothing of the user reaches upstream or a log line.
    assert fake.seen  # the call went upstream: what went there is checked
    for seen in fake.seen:
        sent = seen.body.decode() + json.dumps(seen.headers) + json.dumps(seen.query)
        for secret in ("Canarytown", SUBJECT, SESSION, ORGANIZATION, "x-openai"):
            assert secret not in sent, (seen.path, secret)
    access = [getattr(r, "fields", {}) for r in caplog.records if r.name == "relayd.access"]
    assert [f.get("operation") for f in access if f.get("operation")] == ["createActionResponse"]
    assert all(f["key"] == "team" for f in access)
    logged = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    for secret in ("Canarytown", "38.7223", SUBJECT, SESSION, ORGANIZATION, "userLocation"):
        assert secret not in logged, secret


async def test_the_book_of_answered_calls_stays_bounded(
    quick: TestClient, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relayd.mcp import calls
    from relayd.state import MCP_CALLS

    monkeypatch.setattr(calls, "MAX_ANSWERED", 2)
    async with asyncio.timeout(5):
        for number in range(5):
            await call(quick, "createActionResponse", {"input": f"q{number}"})
    assert len(quick.app[MCP_CALLS]) <= 3  # two answered, plus the newest


async def test_a_failed_call_is_tried_again_not_repeated(
    quick: TestClient, fake: FakeOpenAI
) -> None:
    arguments = {"input": "x", "model": "error-429"}
    async with asyncio.timeout(5):
        first = await call(quick, "createActionResponse", arguments)
        second = await call(quick, "createActionResponse", arguments)
    assert first["isError"] and second["isError"]
    assert "429" in first["content"][0]["text"]
    assert posts(fake, "/v1/responses") == 2  # the repeat went upstream again


async def test_tool_calls_are_counted_by_tool_and_outcome(
    quick: TestClient, fake: FakeOpenAI
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    slow_images(fake, 1.0)
    async with asyncio.timeout(5):
        await call(quick, "getRelayInfo", {})
        await call(quick, "createActionResponse", {})  # no input: a tool error
        await call(quick, "generateImageAction", {"prompt": "slow"})  # past the budget
    response = await quick.get("/metrics", headers=headers())
    counted = {
        (sample.labels["tool"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(await response.text())
        if family.name == "relayd_mcp_tool_calls"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted == {
        ("getRelayInfo", "ok"): 1,
        ("createActionResponse", "error"): 1,
        ("generateImageAction", "in_progress"): 1,
    }
