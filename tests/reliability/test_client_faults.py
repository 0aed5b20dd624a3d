"""Client faults: hang-ups at every phase, slow readers, slow writers, crowds.

The upstream is the raw fault server, which notes when relayd closes its end of
each connection: that is how "the upstream work was cancelled" is observed, for
every route kind alike.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from relayd.app import create_app
from relayd.handlers import realtime as realtime_handler
from tests import rawhttp
from tests.conftest import CANARY, RelayFactory, make_settings
from tests.reliability.conftest import AUTH, assert_settles, client_session, footprint
from tests.reliability.faults import Exchange, FaultServer, scripts

CANCEL_WITHIN_S = 1.0
MULTIPART = "multipart/form-data; boundary=relaydtestboundary"


async def _hang_up_when(
    relay: TestClient,
    server: FaultServer,
    opening: bytes,
    ready: Callable[[asyncio.StreamReader], Awaitable[None]],
) -> Exchange:
    """Send ``opening``, wait until ``ready``, hang up; return the upstream exchange."""
    reader, writer = await rawhttp.open_raw(relay)
    try:
        writer.write(opening)
        await writer.drain()
        await server.wait_for(lambda: bool(server.faulted()))
        await ready(reader)
    finally:
        writer.transport.abort()  # no FIN handshake: the peer simply vanishes
    return server.faulted()[0]


async def _upstream_has_body(server: FaultServer) -> None:
    await server.wait_for(lambda: server.faulted()[0].body_bytes > 0)


PHASES = {
    # name: (method, path, headers, body sent, upstream script, when to hang up)
    "sending-the-body": (
        "POST",
        "/v1/files",
        {"Content-Type": MULTIPART, "Content-Length": str(64 << 20)},
        b"x" * (256 * 1024),
        scripts.silent(),
        "body-upstream",
    ),
    "before-the-head-json": (
        "POST",
        "/v1/responses",
        {"Content-Type": "application/json"},
        b'{"model": "m", "input": "hi"}',
        scripts.silent(),
        "now",
    ),
    "before-the-head-upload": (
        "POST",
        "/v1/files",
        {"Content-Type": MULTIPART},
        b"x" * (128 * 1024),
        scripts.silent(),
        "now",
    ),
    "before-the-head-download": (
        "GET",
        "/v1/videos/v/content",
        {},
        b"",
        scripts.silent(),
        "now",
    ),
    "before-the-head-wrapper": (
        "POST",
        "/v1/responses:stream",
        {"Content-Type": "application/json"},
        b'{"model": "m", "input": "hi"}',
        scripts.silent(),
        "now",
    ),
    "before-the-head-proxy": (
        "POST",
        "/v1/proxy",
        {"Content-Type": "application/json"},
        b'{"method": "GET", "path": "/v1/batches"}',
        scripts.silent(),
        "now",
    ),
    "mid-stream-sse": (
        "POST",
        "/v1/responses",
        {"Content-Type": "application/json"},
        b'{"model": "m", "stream": true}',
        scripts.head_then(
            "stall", content_type="text/event-stream", body=b"event: x\ndata: {}\n\n" * 8, upto=40
        ),
        "head",
    ),
    "mid-stream-download": (
        "GET",
        "/v1/videos/v/content",
        {},
        b"",
        scripts.head_then(
            "stall",
            content_type="video/mp4",
            body=b"v" * 1_000_000,
            announce=1_000_000,
            upto=300_000,
        ),
        "head",
    ),
    "during-the-websocket-handshake": (
        "GET",
        "/v1/realtime?model=gpt-realtime",
        {},
        b"",
        scripts.silent(),
        "now",
    ),
    "mid-websocket": (
        "GET",
        "/v1/realtime?model=gpt-realtime",
        {},
        b"",
        scripts.websocket("stall"),
        "head",
    ),
}


@pytest.mark.parametrize("phase", PHASES)
async def test_client_hangup_cancels_upstream_work_within_a_second(
    monkeypatch: pytest.MonkeyPatch,
    relay_factory: RelayFactory,
    fault_server: FaultServer,
    phase: str,
) -> None:
    # The stalled upstream WebSocket never answers relayd's CLOSE; the bridge gives
    # it CLOSE_TIMEOUT_S before dropping the TCP connection. Shortened here.
    monkeypatch.setattr(realtime_handler, "CLOSE_TIMEOUT_S", 0.5)
    method, path, headers, body, script, when = PHASES[phase]
    fault_server.script = script
    relay = await relay_factory(upstream={"url": fault_server.url})
    baseline = footprint(relay)
    all_headers = {**AUTH, **headers}
    if "realtime" in path:
        all_headers.update(rawhttp.websocket_upgrade())
    elif body and "Content-Length" not in headers:
        all_headers["Content-Length"] = str(len(body))
    opening = rawhttp.head(method, path, all_headers) + body

    async def ready(reader: asyncio.StreamReader) -> None:
        if when == "body-upstream":  # relayd is streaming the body upstream right now
            await _upstream_has_body(fault_server)
        elif when == "head":  # the answer is flowing to the client
            status, _ = await rawhttp.read_head(reader)
            assert status in (200, 101)
            assert await reader.read(1)

    async with asyncio.timeout(5):
        exchange = await _hang_up_when(relay, fault_server, opening, ready)
        hung_up = time.monotonic()
        # Cancelled: relayd closed the connection, or (WebSocket) sent its CLOSE.
        await fault_server.wait_for(lambda: exchange.cancelled is not None, CANCEL_WITHIN_S)
    assert exchange.cancelled is not None and exchange.cancelled - hung_up < CANCEL_WITHIN_S
    await assert_settles(relay, baseline, fault_server)


# --------------------------------------------------------------------------- backpressure

MiB = 1 << 20


async def test_slow_reader_holds_relay_memory_flat(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    # A client that stops reading a 128 MiB download: relayd must stop pulling from
    # upstream (await write() is its only flow control), not buffer the rest.
    total = 128 * MiB
    fault_server.script = scripts.firehose(total)
    relay = await relay_factory(upstream={"url": fault_server.url})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    assert relay.server.port is not None
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    received = 0
    try:
        async with asyncio.timeout(30):
            writer.write(
                rawhttp.head("GET", "/v1/videos/v/content", {**AUTH, "Connection": "close"})
            )
            await writer.drain()
            status, _ = await rawhttp.read_head(reader)
            assert status == 200
            await asyncio.sleep(1.0)  # not reading at all
            stalled_at = fault_server.faulted()[0].sent
            await asyncio.sleep(0.5)
            # Upstream is held back, and by no more than the socket buffers on the way.
            assert fault_server.faulted()[0].sent - stalled_at < MiB
            assert stalled_at < 32 * MiB, f"relayd pulled {stalled_at / MiB:.0f} MiB ahead"
            while chunk := await reader.read(MiB):  # reading again: the flow resumes
                received += len(chunk)
    finally:
        writer.close()
    assert received >= total  # (plus nothing: Connection: close, Content-Length body)


async def test_slow_upstream_reader_holds_relay_memory_flat(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    # The other direction: upstream stops reading a 256 MiB upload after 1 MiB.
    # relayd must stop reading the client rather than soak the body up, and the
    # request must end (504) once upstream has taken nothing for idle_timeout_s
    # (aiohttp itself arms no timer until the whole body is written).
    fault_server.script = scripts.stop_reading(after=MiB, hold=30)
    relay = await relay_factory(upstream={"url": fault_server.url, "idle_timeout_s": 1.0})
    baseline = footprint(relay)
    total = 256 * MiB
    reader, writer = await rawhttp.open_raw(relay)
    writer.write(
        rawhttp.head(
            "POST", "/v1/files", {**AUTH, "Content-Type": MULTIPART, "Content-Length": str(total)}
        )
    )
    sent = 0
    block = b"x" * MiB
    try:
        try:
            async with asyncio.timeout(0.8):
                while sent < total:
                    writer.write(block)
                    await writer.drain()
                    sent += len(block)
        except TimeoutError:
            pass  # the client is blocked: good
        assert sent < 48 * MiB, f"relayd accepted {sent / MiB:.0f} MiB it could not pass on"
        async with asyncio.timeout(3):
            status, _ = await rawhttp.read_head(reader)
        assert status == 504
    finally:
        writer.transport.abort()
    # relayd drops its upstream connection at once (aborted: the queued bytes were
    # going nowhere, and a graceful close would wait for them forever); the fault
    # server, reading nothing, holds its end.
    await assert_settles(relay, baseline, held=1)


@pytest.mark.xfail(
    strict=True,
    reason="a hang-up is not seen while relayd is not reading the client: asyncio stops "
    "watching a socket whose reading is paused (backpressure from an upstream that "
    "reads nothing); the send deadline (idle_timeout_s, 300 s by default) ends it",
)
async def test_hangup_while_upstream_reads_nothing_cancels_within_a_second(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    fault_server.script = scripts.stop_reading(after=MiB)
    relay = await relay_factory(upstream={"url": fault_server.url, "idle_timeout_s": 30})
    reader, writer = await rawhttp.open_raw(relay)
    writer.write(
        rawhttp.head(
            "POST",
            "/v1/files",
            {**AUTH, "Content-Type": MULTIPART, "Content-Length": str(256 * MiB)},
        )
    )
    try:
        async with asyncio.timeout(0.8):
            while True:
                writer.write(b"x" * MiB)
                await writer.drain()
    except TimeoutError:
        pass
    writer.transport.abort()
    exchange = fault_server.faulted()[0]
    await fault_server.wait_for(lambda: exchange.cancelled is not None, CANCEL_WITHIN_S)


# --------------------------------------------------------------------------- slow clients


async def test_trickled_head_and_idle_keepalive_are_closed_by_the_keepalive_timeout(
    aiohttp_client: AiohttpClient, fault_server: FaultServer
) -> None:
    # Slowloris: one byte of the head every 100 ms keeps every gap short; aiohttp's
    # keep-alive deadline is not pushed back by data, so the head-time bound holds.
    # (test_daemon covers the same limit in the real process with its config.)
    settings = make_settings(
        upstream={"url": fault_server.url},
        limits={"keepalive_timeout_s": 1.0},
    )
    server = TestServer(create_app(settings))
    # The runner options relayd serve uses (relayd/server.py); TestServer drops
    # options given to its constructor, start_server() passes them on.
    await server.start_server(keepalive_timeout=settings.limits.keepalive_timeout_s)
    relay: TestClient = await aiohttp_client(server, trace_configs=[CANARY.trace()])
    loop = asyncio.get_running_loop()
    head = rawhttp.head("GET", "/v1/models", {**AUTH, "X-Pad": "p" * 200})
    reader, writer = await rawhttp.open_raw(relay)
    started = loop.time()
    try:
        async with asyncio.timeout(5):
            for byte in head[:-2]:  # never the final CRLF
                if writer.is_closing() or reader.at_eof():
                    break
                writer.write(bytes([byte]))
                try:
                    await writer.drain()
                except ConnectionError:
                    break
                await asyncio.sleep(0.1)
                if reader.at_eof():
                    break
            assert await reader.read() == b""  # closed, without an answer
    finally:
        writer.close()
    assert loop.time() - started < settings.limits.keepalive_timeout_s + 1.5

    # Keep-alive: one answered request, then silence: closed after the timeout.
    reader, writer = await rawhttp.open_raw(relay)
    try:
        async with asyncio.timeout(5):
            writer.write(rawhttp.head("GET", "/health"))
            await writer.drain()
            status, headers = await rawhttp.read_head(reader)
            await reader.readexactly(int(headers["content-length"]))
            idle_from = loop.time()
            assert await reader.read() == b""
    finally:
        writer.close()
    assert status == 200
    assert loop.time() - idle_from < settings.limits.keepalive_timeout_s + 1.0


async def test_a_crowd_beyond_the_pool_gets_fast_503s_not_hangs(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    fault_server.script = scripts.silent()
    # One key may fill the whole pool here: this is about the pool, not a key's share.
    relay = await relay_factory(
        upstream={"url": fault_server.url, "max_connections": 8, "max_connections_per_key": 8},
    )
    baseline = footprint(relay)
    url = str(relay.make_url("/v1/responses"))

    async with client_session() as session:

        async def one() -> tuple[int, float]:
            started = time.monotonic()
            async with session.post(url, json={"model": "m"}, headers=AUTH) as response:
                await response.read()
                return response.status, time.monotonic() - started

        hanging = [asyncio.ensure_future(one()) for _ in range(8)]
        try:
            await fault_server.wait_for(lambda: len(fault_server.faulted()) == 8)
            async with asyncio.timeout(5):
                crowd = await asyncio.gather(*(one() for _ in range(60)))
        finally:
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)
    assert [status for status, _ in crowd] == [503] * 60
    assert max(took for _, took in crowd) < 1.0
    assert len(fault_server.faulted()) == 8  # the crowd never reached upstream
    await assert_settles(relay, baseline, fault_server)
