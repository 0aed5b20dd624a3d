"""Streaming semantics (docs/streaming.md): no buffering, honest endings, cancellation, timeouts."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient

from tests import rawhttp
from tests.conftest import RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI

STREAM_BODY = {"model": "gpt-5", "input": "hi", "stream": True}


def _events(body: bytes) -> list[str]:
    return [
        line.removeprefix("event: ")
        for line in body.decode().splitlines()
        if line.startswith("event: ")
    ]


async def test_sse_passes_through_byte_for_byte_with_anti_buffering_headers(
    relay: TestClient,
    auth: dict[str, str],
    fake: FakeOpenAI,
    fake_server: aiohttp.test_utils.TestServer,
) -> None:
    async with aiohttp.ClientSession() as direct:
        async with direct.post(
            fake_server.make_url("/v1/responses"),
            json=STREAM_BODY,
            headers={"Authorization": f"Bearer {fake.key}"},
        ) as answer:
            expected = await answer.read()
    async with relay.post("/v1/responses", json=STREAM_BODY, headers=auth) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        body = await response.read()
    # Same events; ids differ per request, so compare the event sequence and framing.
    assert _events(body) == _events(expected)
    assert body.count(b"\n\n") == expected.count(b"\n\n")
    assert _events(body)[-1] == "response.completed"


async def test_events_reach_the_client_as_upstream_sends_them(
    relay: TestClient, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    fake.pace = 0.3
    loop = asyncio.get_running_loop()
    arrivals = []
    async with asyncio.timeout(10):
        async with relay.post(
            "/v1/responses", json={**STREAM_BODY, "model": "slow"}, headers=auth
        ) as response:
            async for line in response.content:
                if line.startswith(b"event: "):
                    arrivals.append(loop.time())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(arrivals) == fake.events + 2
    # Paced upstream events arrive paced: nothing held back and released in a burst.
    assert min(gaps) > fake.pace * 0.5


async def test_keepalive_comments_only_between_events(
    relay_factory: RelayFactory, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    fake.pace = 0.35
    relay = await relay_factory(upstream={"sse_keepalive_s": 0.1})
    async with asyncio.timeout(10):
        async with relay.post(
            "/v1/responses", json={**STREAM_BODY, "model": "slow"}, headers=auth
        ) as response:
            body = await response.read()
    text = body.decode()
    assert ": keepalive" in text
    blocks = text.split("\n\n")
    for block in blocks:
        lines = block.splitlines()
        # A keepalive is a block of its own, never a line inside an event.
        if any(line.startswith(":") for line in lines):
            assert lines == [": keepalive"]
    assert _events(body)[-1] == "response.completed"


async def test_sdk_stream_survives_keepalives(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    fake.pace = 0.25
    relay = await relay_factory(upstream={"sse_keepalive_s": 0.1})
    async with openai.AsyncOpenAI(
        base_url=str(relay.make_url("/v1")), api_key=RELAY_KEY, max_retries=0
    ) as sdk:
        stream = await sdk.responses.create(model="slow", input="hi", stream=True)
        kinds = [event.type async for event in stream]
    assert kinds.count("response.output_text.delta") == fake.events
    assert kinds[-1] == "response.completed"


async def test_upstream_break_mid_stream_reaches_client_as_broken_stream(
    relay: TestClient, auth: dict[str, str]
) -> None:
    async with asyncio.timeout(5):
        async with relay.post(
            "/v1/responses", json={**STREAM_BODY, "model": "break"}, headers=auth
        ) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_sdk_sees_an_error_not_a_clean_end_when_upstream_breaks(
    sdk: openai.AsyncOpenAI,
) -> None:
    stream = await sdk.responses.create(model="break", input="hi", stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


@pytest.mark.parametrize(
    "body", [STREAM_BODY, {"model": "silent", "input": "hi"}], ids=["slow-stream", "silent"]
)
async def test_client_hangup_cancels_upstream_within_a_second(
    relay: TestClient, fake: FakeOpenAI, body: dict[str, object]
) -> None:
    fake.pace = 5.0
    payload = json.dumps({**body, "model": "silent" if "stream" not in body else "slow"}).encode()
    reader, writer = await rawhttp.open_raw(relay)
    async with asyncio.timeout(5):
        writer.write(
            rawhttp.head(
                "POST",
                "/v1/responses",
                {
                    "Authorization": f"Bearer {RELAY_KEY}",
                    "Content-Type": "application/json",
                    "Content-Length": str(len(payload)),
                },
            )
            + payload
        )
        await writer.drain()
        await fake.wait_for(lambda: bool(fake.seen), timeout=2)
        if "stream" in body:
            await rawhttp.read_head(reader)  # the stream is open and flowing
        writer.close()
        seen = await fake.wait_cancelled("/v1/responses", timeout=1.0)
    assert seen.cancelled and not seen.finished


async def test_first_byte_timeout_answers_504(
    relay_factory: RelayFactory, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    relay = await relay_factory(upstream={"first_byte_timeout_s": 0.3})
    async with asyncio.timeout(5):
        response = await relay.post(
            "/v1/responses", json={"model": "silent", "input": "hi"}, headers=auth
        )
    assert response.status == 504
    error = (await response.json())["error"]
    assert error["code"] == "upstream_timeout" and error["type"] == "upstream_error"
    await fake.wait_cancelled("/v1/responses", timeout=1.0)


async def test_idle_timeout_breaks_a_stalled_stream(
    relay_factory: RelayFactory, auth: dict[str, str]
) -> None:
    relay = await relay_factory(
        upstream={"idle_timeout_s": 0.3, "first_byte_timeout_s": 5},
    )
    async with asyncio.timeout(5):
        async with relay.post(
            "/v1/responses", json={**STREAM_BODY, "model": "stall"}, headers=auth
        ) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_stream_longer_than_any_timeout_is_not_cut(
    relay_factory: RelayFactory, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    # Idle and first-byte limits bound gaps, not the whole stream (aiohttp#4770).
    fake.pace = 0.15
    relay = await relay_factory(
        upstream={"idle_timeout_s": 0.5, "first_byte_timeout_s": 0.5},
    )
    async with asyncio.timeout(10):
        async with relay.post(
            "/v1/responses", json={**STREAM_BODY, "model": "slow"}, headers=auth
        ) as response:
            body = await response.read()
    assert _events(body)[-1] == "response.completed"


async def test_unreachable_upstream_is_a_502(
    relay_factory: RelayFactory, auth: dict[str, str], unused_tcp_port: int
) -> None:
    relay = await relay_factory(upstream={"url": f"http://127.0.0.1:{unused_tcp_port}"})
    response = await relay.get("/v1/models", headers=auth)
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_unreachable"


async def test_saturated_pool_fails_fast_with_503(
    relay_factory: RelayFactory, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    relay = await relay_factory(upstream={"max_connections": 1})
    hanging = asyncio.ensure_future(
        relay.post("/v1/responses", json={"model": "silent", "input": "x"}, headers=auth)
    )
    try:
        await fake.wait_for(lambda: bool(fake.seen), timeout=2)
        async with asyncio.timeout(1):
            response = await relay.get("/v1/models", headers=auth)
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
    finally:
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging


async def test_large_download_streams_with_its_length(
    relay: TestClient, auth: dict[str, str]
) -> None:
    size = 48 * 1024 * 1024
    received = 0
    async with relay.get(f"/v1/files/gen-{size}/content", headers=auth) as response:
        # relayd asks for the metadata first (user_data guard); the fake answers
        # for gen- ids with content, which is not a file object: no purpose, no refusal.
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        async for chunk in response.content.iter_any():
            received += len(chunk)
    assert received == size


async def test_chunked_upload_past_the_cap_is_refused_with_413(
    relay_factory: RelayFactory, auth: dict[str, str]
) -> None:
    relay = await relay_factory(limits={"max_body_bytes": 64 * 1024})

    async def body():  # no Content-Length: the cap must be counted while streaming
        for _ in range(16):
            yield b"x" * 8192

    response = await relay.post(
        "/v1/audio/speech",
        data=body(),
        headers={**auth, "Content-Type": "application/json"},
    )
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "request_too_large"


async def test_an_unasked_upgrade_from_upstream_is_a_prompt_502(
    relay_factory: RelayFactory, auth: dict[str, str]
) -> None:
    # An upstream (or something in front of it) that answers a plain GET with 101
    # would leave relayd waiting for a body on a connection that is no longer HTTP.
    closed = asyncio.Event()

    async def switch_protocols(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        await writer.drain()
        await reader.read()  # until relayd drops the connection
        closed.set()
        writer.close()

    server = await asyncio.start_server(switch_protocols, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        relay = await relay_factory(upstream={"url": f"http://127.0.0.1:{port}"})
        async with asyncio.timeout(3):
            response = await relay.get("/v1/models", headers=auth)
            assert response.status == 502
            assert "upgrade" in (await response.json())["error"]["message"].lower()
            await closed.wait()
