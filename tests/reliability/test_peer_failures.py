"""Bugs users hit in other relays, proven absent here.

Each test names the issue it answers. Cases already covered by another suite are
listed in the closing note's table with the test that covers them; this file holds
the ones that needed a test of their own.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import io
import json
import logging
import os
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from relayd.handlers import realtime as realtime_handler
from relayd.state import UPSTREAM
from tests import rawhttp
from tests.conftest import OTHER_KEY, RELAY_KEY, SECRETS, RelayFactory
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI
from tests.reliability.conftest import AUTH, assert_settles, client_session, footprint
from tests.reliability.faults import Exchange, FaultServer, Script, scripts

STREAM = {"model": "gpt-5", "input": "hi", "stream": True}


def _events(body: bytes) -> list[str]:
    return [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]


# --------------------------------------------------------------------------- SSE


async def test_one_api_546_two_hundred_concurrent_streams_all_complete(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    # one-api #546: of 200 concurrent streams "only 64 succeeded; 136 timed out".
    async def one() -> list[str]:
        async with relay.post("/v1/responses", json=STREAM, headers=AUTH) as response:
            assert response.status == 200
            return _events(await response.read())

    async with asyncio.timeout(30):
        results = await asyncio.gather(*(one() for _ in range(200)))
    assert all(events[-1] == "response.completed" for events in results)
    assert all(len(events) == fake.events + 2 for events in results)


def _chopped_sse(events: int) -> Script:
    """SSE written in pieces that cut events (and lines) at arbitrary places."""

    async def run(x: Exchange) -> None:
        await x.read_body()
        body = b"".join(
            b'event: response.output_text.delta\ndata: {"n": %d, "delta": "%s"}\n\n'
            % (n, b"x" * (n % 37))
            for n in range(events)
        )
        x.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        offset, step = 0, 1
        while offset < len(body):
            piece = body[offset : offset + step]
            x.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            offset += len(piece)
            step = (step * 7 + 3) % 997 + 1  # 1..997 bytes, never aligned to events
            if offset % 5 == 0:
                await x.writer.drain()
                await asyncio.sleep(0)
        x.write(b"0\r\n\r\n")
        await x.writer.drain()

    return run


async def test_helicone_no_chunk_is_lost_whatever_the_chunk_boundaries(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    # ruby-openai #251 (Helicone): "every 3rd or 4th chunk is gone".
    fault_server.script = _chopped_sse(2000)
    relay = await relay_factory(upstream={"url": fault_server.url})
    async with asyncio.timeout(20):
        async with relay.post("/v1/responses", json=STREAM, headers=AUTH) as response:
            body = await response.read()
    numbers = [
        json.loads(line[6:])["n"]
        for line in body.decode().splitlines()
        if line.startswith("data: ")
    ]
    assert numbers == list(range(2000))


async def test_envoy_494_a_large_streamed_answer_is_not_too_large(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    # Envoy AI GW #494: response_payload_too_large on a streaming response.
    body = b"".join(b"event: d\ndata: %s\n\n" % (b"y" * 1000) for _ in range(12_000))  # 12 MB
    fault_server.script = scripts.head_then("finish", content_type="text/event-stream", body=body)
    relay = await relay_factory(upstream={"url": fault_server.url})
    async with asyncio.timeout(20):
        async with relay.post("/v1/responses", json=STREAM, headers=AUTH) as response:
            assert response.status == 200
            assert await response.read() == body


async def test_envoy_1894_an_empty_stream_ends_at_once_instead_of_hanging(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    # Envoy AI GW #1894: "0 bytes to client", and the client hangs.
    fault_server.script = scripts.head_then("finish", content_type="text/event-stream", body=b"")
    relay = await relay_factory(upstream={"url": fault_server.url})
    async with asyncio.timeout(2):
        async with relay.post("/v1/responses", json=STREAM, headers=AUTH) as response:
            assert response.status == 200
            assert await response.read() == b""


async def test_envoy_2227_a_one_mebibyte_json_body_is_not_refused(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    # Envoy PR #2227: a 413 for bodies over 32 KiB because of filter order.
    big = json.dumps({"model": "gpt-5", "input": "x" * (1024 * 1024)}).encode()
    for path in ("/v1/responses", "/v1/responses:stream", "/v1/embeddings"):
        async with asyncio.timeout(10):
            response = await relay.post(
                path, data=io.BytesIO(big), headers={**AUTH, "Content-Type": "application/json"}
            )
            await response.read()
        assert response.status == 200, path
    assert fake.last("/v1/responses").body_size > 1024 * 1024


def _silent_head_then_events(silence: float) -> Script:
    async def run(x: Exchange) -> None:
        await x.read_body()
        x.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await x.writer.drain()
        await asyncio.sleep(silence)
        event = b"event: response.completed\ndata: {}\n\n"
        x.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
        await x.writer.drain()

    return run


async def test_litellm_37322_keepalives_flow_while_upstream_is_silent_before_any_event(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    # LiteLLM PR #37322: ALB and nginx drop healthy streams silent for 60 s.
    fault_server.script = _silent_head_then_events(0.6)
    relay = await relay_factory(
        upstream={"url": fault_server.url, "sse_keepalive_s": 0.1},
    )
    async with asyncio.timeout(5):
        async with relay.post("/v1/responses", json=STREAM, headers=AUTH) as response:
            first = await response.content.readuntil(b"\n\n")
            rest = await response.read()
    assert first == b": keepalive\n\n"
    assert rest.endswith(b"event: response.completed\ndata: {}\n\n")


# --------------------------------------------------------------------------- timeouts


def _slow_answer(delay: float) -> Script:
    async def run(x: Exchange) -> None:
        await x.read_body()
        await asyncio.sleep(delay)
        body = b'{"object": "response", "status": "completed"}'
        x.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
            b"\r\n\r\n%s" % (len(body), body)
        )
        await x.writer.drain()

    return run


async def test_litellm_9551_a_slow_non_stream_answer_is_not_cut_by_the_idle_timeout(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    # LiteLLM #9551 and openai-forward #119: 504 on long non-streaming requests.
    # The wait for the head is bounded by first_byte_timeout, not by the idle gap.
    fault_server.script = _slow_answer(1.0)
    relay = await relay_factory(
        upstream={"url": fault_server.url, "idle_timeout_s": 0.3, "first_byte_timeout_s": 5},
    )
    async with asyncio.timeout(5):
        response = await relay.post("/v1/responses", json={"model": "m"}, headers=AUTH)
        assert response.status == 200
        assert (await response.json())["status"] == "completed"


def _answer_then_hang_up(idle: float) -> Script:
    answer = scripts.answer()

    async def run(x: Exchange) -> None:
        await answer(x)
        await asyncio.sleep(idle)  # keep-alive as far as relayd knows, then gone
        x.writer.close()

    return run


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_openai_forward_40_a_pooled_connection_upstream_closed_is_not_an_error(
    relay_factory: RelayFactory, fault_server: FaultServer, method: str
) -> None:
    # openai-forward #40: "connection closed before message completed".
    fault_server.script = _answer_then_hang_up(0.1)
    relay = await relay_factory(upstream={"url": fault_server.url})
    for _ in range(3):
        async with asyncio.timeout(5):
            response = await relay.request(
                method, "/v1/batches", headers=AUTH, json={"a": 1} if method == "POST" else None
            )
            await response.read()
        assert response.status == 200
        await asyncio.sleep(0.3)  # upstream has closed the idle connection by now
    assert len(fault_server.faulted()) == 3


# --------------------------------------------------------------------------- credentials


async def test_litellm_36794_credentials_in_the_body_never_replace_the_upstream_key(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    # LiteLLM #36794: a body "api_key" overrode the deployment key, and a later
    # request "can still go out with the previous caller's token".
    attacker = "sk-attacker-key-0000000000000000"
    for body in ({"model": "gpt-5", "api_key": attacker}, {"model": "gpt-5"}):
        headers = {**AUTH, "api-key": attacker, "OpenAI-Organization": "org-attacker"}
        response = await relay.post("/v1/responses", json=body, headers=headers)
        assert response.status == 200
        seen = fake.last("/v1/responses").headers
        assert seen["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "OpenAI-Organization" not in seen


async def test_litellm_36794_an_ephemeral_secret_is_never_reused_for_the_next_session(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    ephemeral = "ek_canary_ephemeral_previous_caller"
    url = "/v1/realtime?model=gpt-realtime"
    async with asyncio.timeout(5):
        async with relay.ws_connect(
            url, headers=AUTH, protocols=("realtime", f"openai-insecure-api-key.{ephemeral}")
        ):
            pass
        async with relay.ws_connect(url, headers=AUTH):
            pass
    first, second = fake.realtime.sessions[-2:]
    assert first.headers["Authorization"] == f"Bearer {ephemeral}"
    assert second.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("presented", ["", "rk-wrong-0000000000", f"{RELAY_KEY}x"])
async def test_litellm_39757_a_wrong_key_401_reveals_nothing(
    relay: TestClient, presented: str
) -> None:
    # LiteLLM #39757: the 401 leaked backend identity, a DB table name and the
    # SHA-256 of the submitted key.
    headers = {"Authorization": f"Bearer {presented}"} if presented else {}
    response = await relay.post("/v1/responses", json={"model": "m"}, headers=headers)
    assert response.status == 401
    text = await response.text()
    assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    forbidden = [
        hashlib.sha256(presented.encode()).hexdigest(),
        "team",
        "other",
        "Traceback",
        "aiohttp",
        "127.0.0.1",
        "sha256",
        *SECRETS,
    ]
    if presented:
        forbidden.append(presented)
    for needle in forbidden:
        assert needle not in text, needle
    assert "Server" not in response.headers or "relayd" not in response.headers["Server"]


async def test_bifrost_3954_key_bearing_upstream_headers_never_reach_the_client(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    # Bifrost #3954: the upstream key came back in an x-goog-api-key header.
    leaky = {
        name: UPSTREAM_KEY
        for name in (
            "x-goog-api-key",
            "x-api-key",
            "api-key",
            "Authorization",
            "Proxy-Authorization",
            "WWW-Authenticate",
            "Set-Cookie",
            "OpenAI-Organization",
            "X-Upstream-Key",
        )
    }
    fault_server.script = scripts.answer(extra=leaky)
    relay = await relay_factory(upstream={"url": fault_server.url})
    response = await relay.post("/v1/responses", json={"model": "m"}, headers=AUTH)
    assert response.status == 200
    assert UPSTREAM_KEY not in str(response.raw_headers)


@pytest.mark.parametrize(
    ("status", "encoding"),
    [(401, "gzip"), (401, "deflate"), (400, "identity"), (500, "gzip")],
)
async def test_nyro_67_echoed_keys_are_redacted_even_in_compressed_error_bodies(
    relay_factory: RelayFactory, fault_server: FaultServer, status: int, encoding: str
) -> None:
    # nyro #67: OpenAI's 401 echoes the key; notes §6: the body may be compressed.
    masked = UPSTREAM_KEY[:8] + "*" * 20 + UPSTREAM_KEY[-4:]
    text = json.dumps(
        {
            "error": {
                "message": f"Incorrect API key provided: {masked}; also {UPSTREAM_KEY}",
                "type": "x",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    ).encode()
    import zlib

    body = {"gzip": gzip.compress(text), "deflate": zlib.compress(text), "identity": text}[encoding]
    fault_server.script = scripts.answer(status, body, extra={"Content-Encoding": encoding})
    relay = await relay_factory(upstream={"url": fault_server.url})
    response = await relay.get("/v1/models/x", headers={**AUTH, "Accept-Encoding": "gzip"})
    raw = await response.read()
    assert response.status == status
    assert UPSTREAM_KEY not in raw.decode() and UPSTREAM_KEY[-4:] not in raw.decode()
    assert "Incorrect API key provided" in raw.decode()
    assert int(response.headers["Content-Length"]) == len(raw)


async def test_litellm_11264_no_log_line_holds_a_key_even_at_debug(
    relay_factory: RelayFactory, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    # LiteLLM #11264, #2114, #31620, #7603: keys in logs. Everything at DEBUG, and
    # the two aiohttp lines that quote client bytes (notes §6) provoked on purpose.
    caplog.set_level(logging.DEBUG)
    relay = await relay_factory()
    await relay.get("/v1/models", headers=AUTH)
    await relay.post("/v1/responses", json=STREAM, headers={"X-Relay-Key": OTHER_KEY})
    await relay.get("/v1/models", headers={"Authorization": "Bearer rk-wrong"})
    # A malformed head whose offending line is the Authorization header.
    reader, writer = await rawhttp.open_raw(relay)
    writer.write(
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + RELAY_KEY.encode()
        + b"\rX: y\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(2):
        await reader.read()
    writer.close()
    # A browser offering only its key as a subprotocol (none is selected: aiohttp warns).
    async with relay.ws_connect(
        "/v1/realtime?model=gpt-realtime", protocols=(f"openai-insecure-api-key.{RELAY_KEY}",)
    ):
        pass
    lines = [
        r.getMessage() + str(getattr(r, "fields", "")) + str(r.exc_text or "")
        for r in caplog.records
    ]
    assert any("malformed request" in line for line in lines)
    for secret in SECRETS:
        assert not any(secret in line for line in lines), secret


# --------------------------------------------------------------------------- realtime


async def test_litellm_39851_a_refused_realtime_session_is_an_error_not_a_hang_or_a_success(
    relay_factory: RelayFactory, fault_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    # LiteLLM PR #39851: upstream refused or closed, the client hung forever, and
    # the session was "logged as a $0 success".
    caplog.set_level(logging.INFO)
    fault_server.script = scripts.answer(503, b'{"error": {"message": "down"}}')
    relay = await relay_factory(upstream={"url": fault_server.url})
    async with asyncio.timeout(3):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await relay.ws_connect("/v1/realtime?model=gpt-realtime", headers=AUTH)
    assert refused.value.status == 502
    access = [r.fields for r in caplog.records if r.name == "relayd.access"]  # type: ignore[attr-defined]
    assert [line["status"] for line in access] == [502]
    assert not [r for r in caplog.records if r.getMessage() == "realtime session"]


# --------------------------------------------------------------------------- TCP_NODELAY


async def test_tcp_nodelay_on_both_legs(relay: TestClient, fake: FakeOpenAI) -> None:
    # peer-failures (vii): Nagle's ~40 ms artefacts, on the client and upstream legs.
    fake.pace = 0.3  # a stream still flowing while the sockets are inspected
    async with client_session() as session:
        async with session.post(
            relay.make_url("/v1/responses"), json={**STREAM, "model": "slow"}, headers=AUTH
        ) as response:
            await response.content.readuntil(b"\n\n")
            assert relay.server.runner is not None
            server = relay.server.runner.server
            assert server is not None
            downstream = [h.transport for h in server.connections if h.transport]
            connector: Any = relay.app[UPSTREAM]._session
            connector = connector.connector
            upstream = [p.transport for p in connector._acquired if p.transport]
            assert downstream, server.connections
            assert upstream, connector._acquired
            for transport in downstream + upstream:
                sock = transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            await response.read()


# --------------------------------------------------------------------------- memory


async def _mixed_round(relay: TestClient, rounds: int) -> None:
    for n in range(rounds):
        await _single(relay, n % 6)


async def _single(relay: TestClient, kind: int) -> None:
    async with client_session() as session:
        base = str(relay.make_url("")).rstrip("/")
        if True:
            if kind == 0:
                async with session.get(f"{base}/v1/models", headers=AUTH) as r:
                    await r.read()
            elif kind == 1:
                async with session.post(f"{base}/v1/responses", json=STREAM, headers=AUTH) as r:
                    await r.read()
            elif kind == 2:  # a stream that breaks mid-way
                async with session.post(
                    f"{base}/v1/responses", json={**STREAM, "model": "break"}, headers=AUTH
                ) as r:
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await r.read()
            elif kind == 3:
                async with session.get(f"{base}/v1/files/gen-300000/content", headers=AUTH) as r:
                    await r.read()
            elif kind == 4:  # a client that leaves mid-stream
                reader, writer = await rawhttp.open_raw(relay)
                payload = json.dumps({**STREAM, "model": "slow"}).encode()
                writer.write(
                    rawhttp.head(
                        "POST",
                        "/v1/responses",
                        {
                            **AUTH,
                            "Content-Type": "application/json",
                            "Content-Length": str(len(payload)),
                        },
                    )
                    + payload
                )
                await rawhttp.read_head(reader)
                writer.transport.abort()
            else:
                async with session.ws_connect(
                    f"{base}/v1/realtime?model=gpt-realtime", headers=AUTH
                ) as ws:
                    await ws.send_str('{"type": "response.create"}')
                    while (await ws.receive()).type is WSMsgType.TEXT:
                        if ws.closed:
                            break
                        break


async def test_litellm_12685_mixed_traffic_leaves_no_growth_behind(
    monkeypatch: pytest.MonkeyPatch, relay: TestClient, fake: FakeOpenAI
) -> None:
    # LiteLLM #12685, #27954, #38193, PR #17784 (references kept by fire-and-forget
    # tasks): after a warm-up round, further rounds of mixed traffic, broken
    # streams and hang-ups included, leave no objects, tasks or descriptors behind.
    fake.record = False  # the fake's own request log would grow by design
    fake.pace = 0.05
    # aiohttp's client WebSocket can re-arm its heartbeat timer while closing, which
    # keeps a closed upstream leg alive until that timer fires once (up to
    # HEARTBEAT_S). Bounded, not a leak; shortened so the census sees the end state.
    monkeypatch.setattr(realtime_handler, "HEARTBEAT_S", 0.2)
    logging.disable(logging.CRITICAL)  # captured log records would be the growth measured
    try:
        async with asyncio.timeout(60):
            await _mixed_round(relay, 60)
            baseline = footprint(relay)
            await assert_settles(relay, baseline)
            await asyncio.sleep(0.5)
            gc.collect()
            before = _census()
            for _ in range(2):
                await _mixed_round(relay, 60)
            await assert_settles(relay, baseline)
            await asyncio.sleep(0.5)
        gc.collect()
        after = _census()
    finally:
        logging.disable(logging.NOTSET)
    grown = {
        kind: after[kind] - before.get(kind, 0)
        for kind in after
        if after[kind] - before.get(kind, 0) > 20
    }
    assert sum(after.values()) - sum(before.values()) < 500, grown
    assert len(os.listdir("/proc/self/fd")) <= baseline.fds


def _census() -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] = counts.get(name, 0) + 1
    return counts
