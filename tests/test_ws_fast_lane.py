"""The realtime bridge's fast lane: data frames passed through as bytes.

A raw client writes frames byte for byte (fragments, headers split across reads,
pings), and a scripted upstream sends what the fake does not (floods, fragments,
oversize frames), so each test pins what a peer sees, not how relayd got there.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from relayd.streams import wsframes
from tests.conftest import RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI
from tests.rawhttp import head, open_raw, read_head, websocket_upgrade

BOUND = 5.0
URL = "/v1/realtime?model=gpt-realtime"
AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """One RFC 6455 frame; clients mask (§5.3)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        header = struct.pack("!BB", first, bit | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, bit | 127, size)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: Reader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    assert not second & 0x80, "a server frame must not be masked"
    return first & 0x0F, await reader.readexactly(size)


async def raw_session(relay: TestClient) -> tuple[Reader, Writer]:
    reader, writer = await open_raw(relay)
    writer.write(head("GET", URL, {**AUTH, **websocket_upgrade()}))
    status, _ = await read_head(reader)
    assert status == 101
    return reader, writer


async def echo(reader: Reader, writer: Writer, payload: bytes, opcode: int = 0x1) -> None:
    writer.write(frame(opcode, payload))
    assert await read_frame(reader) == (opcode, payload)


async def bye(reader: Reader, writer: Writer) -> None:
    """Close as a client should: CLOSE, wait for relayd's answer, then hang up."""
    writer.write(frame(0x8, struct.pack("!H", 1000)))
    while (await read_frame(reader))[0] != 0x8:
        pass
    writer.close()


Script = Callable[[web.WebSocketResponse], Awaitable[None]]


@pytest.fixture
async def scripted(aiohttp_server: Any) -> Callable[[Script], Awaitable[TestServer]]:
    """An upstream WebSocket that echoes, then runs ``script`` on the text ``go``."""

    async def start(script: Script) -> TestServer:
        async def handle(request: web.Request) -> web.StreamResponse:
            ws = web.WebSocketResponse(protocols=("realtime",), autoclose=False)
            await ws.prepare(request)
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT and msg.data == "go":
                    await script(ws)
                elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await ws.send_frame(
                        msg.data.encode() if isinstance(msg.data, str) else msg.data, msg.type
                    )
                elif msg.type is WSMsgType.CLOSE:
                    await ws.close(code=msg.data or 1000)
                    return ws
                else:
                    return ws

        app = web.Application()
        app.router.add_get("/v1/realtime", handle)
        server: TestServer = await aiohttp_server(app)
        return server

    return start


# --------------------------------------------------------------------------- client to upstream


async def test_many_frames_in_one_read_and_one_frame_in_many(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    payloads = [f"frame {i} ".encode() * (i * 40 + 1) for i in range(12)]
    async with asyncio.timeout(BOUND):
        reader, writer = await raw_session(relay)
        await echo(reader, writer, b"warm-up")
        writer.write(b"".join(frame(0x1, p) for p in payloads))  # one write, twelve frames
        for payload in payloads:
            assert await read_frame(reader) == (0x1, payload)
        big = frame(0x2, bytes(range(256)) * 40)
        for at in (1, 2, 3, 5, 9, 100, len(big)):  # header and payload split across reads
            writer.write(big[:at])
            await writer.drain()
            await asyncio.sleep(0.01)
            big = big[at:]
        assert await read_frame(reader) == (0x2, bytes(range(256)) * 40)
        await bye(reader, writer)
    assert len(fake.realtime.last().frames) == 14


async def test_a_fragmented_message_reaches_upstream_whole(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(BOUND):
        reader, writer = await raw_session(relay)
        await echo(reader, writer, b"warm-up")
        writer.write(frame(0x1, b"hel", fin=False) + frame(0x9, b"mid") + frame(0x0, b"lo"))
        assert await read_frame(reader) == (0xA, b"mid")  # the ping is answered in between
        assert await read_frame(reader) == (0x1, b"hello")
        await echo(reader, writer, b"after")  # and the lane takes over again
        await bye(reader, writer)
    assert [data for _, data in fake.realtime.last().frames] == ["warm-up", "hello", "after"]


async def test_ping_is_answered_with_its_payload_between_data_frames(relay: TestClient) -> None:
    async with asyncio.timeout(BOUND):
        reader, writer = await raw_session(relay)
        await echo(reader, writer, b"one")
        writer.write(frame(0x1, b"two") + frame(0x9, b"are you there") + frame(0x1, b"three"))
        received = [await read_frame(reader) for _ in range(3)]
        await bye(reader, writer)
    assert (0xA, b"are you there") in received
    assert [r for r in received if r[0] == 0x1] == [(0x1, b"two"), (0x1, b"three")]


async def test_an_unmasked_client_frame_is_masked_on_its_way_upstream(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    # aiohttp's server accepts unmasked client frames; passed on as they came they
    # would break the upstream leg (RFC 6455 §5.1), so they take the message path.
    async with asyncio.timeout(BOUND):
        reader, writer = await raw_session(relay)
        await echo(reader, writer, b"warm-up")
        writer.write(frame(0x1, b"naked", mask=False))
        assert await read_frame(reader) == (0x1, b"naked")
        await echo(reader, writer, b"after")
        await bye(reader, writer)
    assert [data for _, data in fake.realtime.last().frames] == ["warm-up", "naked", "after"]


async def test_oversize_client_frame_after_fast_frames_closes_1009(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(realtime={"max_message_bytes": 1024})
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            for _ in range(3):
                await ws.send_bytes(b"\x00" * 1024)  # the limit itself is allowed
                assert (await ws.receive()).data == b"\x00" * 1024
            await ws.send_bytes(b"\x00" * 1025)
            msg = await ws.receive()
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    async with asyncio.timeout(BOUND):
        while fake.realtime.last().close_code is None:
            await asyncio.sleep(0.01)
    assert fake.realtime.last().close_code == 1011


# --------------------------------------------------------------------------- upstream to client


async def test_fragmented_upstream_message_reaches_the_client_whole(
    relay_factory: RelayFactory, scripted: Callable[[Script], Awaitable[TestServer]]
) -> None:
    async def fragments(ws: web.WebSocketResponse) -> None:
        transport = ws._writer.transport  # type: ignore[union-attr]
        transport.write(
            frame(0x1, b'{"a":', fin=False, mask=False)
            + frame(0x0, b"1}", mask=False)
            + frame(0x1, b"next", mask=False)
        )

    upstream = await scripted(fragments)
    relay = await relay_factory(upstream={"url": str(upstream.make_url(""))})
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            await ws.send_str("warm-up")
            assert (await ws.receive()).data == "warm-up"
            await ws.send_str("go")
            assert (await ws.receive()).data == '{"a":1}'
            assert (await ws.receive()).data == "next"


async def test_oversize_upstream_frame_after_fast_frames_closes_the_client_1011(
    relay_factory: RelayFactory, scripted: Callable[[Script], Awaitable[TestServer]]
) -> None:
    async def oversize(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(b"\x01" * 2048)

    upstream = await scripted(oversize)
    relay = await relay_factory(
        upstream={"url": str(upstream.make_url(""))},
        realtime={"max_message_bytes": 1024},
    )
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            for _ in range(3):
                await ws.send_str("small")
                assert (await ws.receive()).data == "small"
            await ws.send_str("go")
            msg = await ws.receive()
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)


async def test_a_client_that_stops_reading_stops_relayd_reading_upstream(
    relay_factory: RelayFactory, scripted: Callable[[Script], Awaitable[TestServer]]
) -> None:
    chunk, total = 64 * 1024, 256 * 1024 * 1024
    sent = 0

    async def flood(ws: web.WebSocketResponse) -> None:
        nonlocal sent
        for index in range(total // chunk):
            await ws.send_bytes(index.to_bytes(4, "big") * (chunk // 4))
            sent += chunk

    upstream = await scripted(flood)
    relay = await relay_factory(upstream={"url": str(upstream.make_url(""))})
    async with asyncio.timeout(4 * BOUND):
        reader, writer = await raw_session(relay)
        await echo(reader, writer, b"warm-up")
        writer.write(frame(0x1, b"go"))
        await asyncio.sleep(1.0)  # the client reads nothing meanwhile
        stalled = sent
        await asyncio.sleep(0.5)
        assert sent == stalled, "upstream kept being read while the client read nothing"
        # What is held is socket buffers and at most one frame, not the flood.
        assert stalled < 64 * 1024 * 1024
        for index in range(stalled // chunk + 8):  # and nothing was lost or reordered
            opcode, payload = await read_frame(reader)
            assert (opcode, payload[:4]) == (0x2, index.to_bytes(4, "big"))
        await bye(reader, writer)


# --------------------------------------------------------------------------- the lane itself


async def test_the_lane_takes_over_only_after_a_proven_boundary(relay: TestClient) -> None:
    lanes: list[wsframes.FrameLane] = []
    attach = wsframes.attach

    def spy(*args: Any, **kwargs: Any) -> wsframes.FrameLane | None:
        lane = attach(*args, **kwargs)
        if lane is not None:
            lanes.append(lane)
        return lane

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wsframes, "attach", spy)
        async with asyncio.timeout(BOUND):
            async with relay.ws_connect(URL, headers=AUTH) as ws:
                assert len(lanes) == 2 and not any(lane._fast for lane in lanes)
                for _ in range(3):
                    await ws.send_str("tick")
                    assert (await ws.receive()).data == "tick"
                assert all(lane._fast for lane in lanes)
