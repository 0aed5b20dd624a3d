"""One key holder cannot exhaust relayd's memory (issue 11, item 5).

Each test attacks a real ``relayd serve`` process and reads its memory from
``/proc/<pid>/status``: ``VmHWM`` (the peak resident set) and ``VmRSS`` (now).
The shipped unit runs under ``MemoryMax=512M``; before the fix, six concurrent
31 MiB base64 uploads peaked near 480 MB, 1 MB of gzip inflated to 270 MB, and
unfinished 15 MiB realtime messages stayed resident after their sessions ended.
The bounds here are loose enough for a busy 2-core machine and far below those
figures. ``RELAYD_MEMORY_FIGURES=1`` prints what each test measured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpServer

from relayd.config import ConfigError, load_settings, parse_keys_env
from relayd.state import BUDGET, UPSTREAM
from tests.conftest import OTHER_KEY, RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI
from tests.filehost import PNG, fetch_settings, start_file_host
from tests.rawhttp import head, open_raw, read_head, websocket_upgrade
from tests.test_daemon import Relayd, Start, _env, start  # noqa: F401 (fixture)
from tests.test_ws_fast_lane import read_frame

pytestmark = pytest.mark.process

MiB = 1024 * 1024
BOUND = 30.0  # seconds, for any one attack


def memory(pid: int) -> tuple[float, float]:
    """(peak, current) resident set of ``pid`` in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def report(name: str, **figures: float) -> None:
    if os.environ.get("RELAYD_MEMORY_FIGURES"):
        shown = ", ".join(f"{k}={v:.0f} MiB" for k, v in figures.items())
        print(f"\n[memory] {name}: {shown}")


async def settled_rss(pid: int, below: float, timeout: float = 10.0) -> float:
    """The resident set once it fell below ``below`` MiB, or after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        current = memory(pid)[1]
        if current < below or loop.time() > deadline:
            return current
        await asyncio.sleep(0.1)


@pytest.fixture
async def relayd(start: Start, fake_server: TestServer) -> AsyncIterator[Relayd]:  # noqa: F811
    env = _env(
        str(fake_server.make_url("")).rstrip("/"),
        RELAYD_KEYS=f"team:{RELAY_KEY},other:{OTHER_KEY}",
    )
    yield await start(env=env)


# ------------------------------------------------------------------ buffered bodies


def upload_body(size: int) -> bytes:
    """An Actions upload whose JSON body is ``size`` bytes (base64 of random bytes)."""
    raw = os.urandom(size * 3 // 4 - 256)
    return json.dumps(
        {
            "purpose": "assistants",
            "filename": "big.bin",
            "mime_type": "application/octet-stream",
            "data_base64": base64.b64encode(raw).decode(),
        }
    ).encode()


async def test_concurrent_base64_uploads_stay_within_the_key_budget(
    relayd: Relayd, fake: FakeOpenAI
) -> None:
    body = upload_body(31 * MiB)
    before = memory(relayd.process.pid)[1]
    headers = {"Authorization": f"Bearer {RELAY_KEY}", "Content-Type": "application/json"}

    async def upload(session: aiohttp.ClientSession) -> tuple[int, dict[str, Any], str]:
        async with session.post(
            relayd.url("/v1/actions/files/upload"), data=io.BytesIO(body), headers=headers
        ) as response:
            return response.status, await response.json(), response.headers.get("Retry-After", "")

    async with asyncio.timeout(BOUND), aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(upload(session) for _ in range(6)))
    peak, _ = memory(relayd.process.pid)
    after = await settled_rss(relayd.process.pid, below=before + 40)
    report("6 x 31 MiB uploads, one key", before=before, peak=peak, after=after)
    statuses = sorted(status for status, _, _ in answers)
    # 64 MiB per key: two 31 MiB bodies fit at once, the others are told to retry.
    assert statuses.count(200) >= 2, answers
    refused = [(body, retry) for status, body, retry in answers if status != 200]
    assert all(
        b["error"]["code"] == "relay_rate_limit_exceeded" and retry for b, retry in refused
    ), refused
    assert peak < 330, f"peak resident set {peak:.0f} MiB (was ~480 MB before issue 11)"
    assert after < before + 40, f"{after - before:.0f} MiB stayed after the uploads"


def gzip_bomb(size: int) -> bytes:
    """A gzip member holding a JSON object ``size`` bytes long, built in slices."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(b'{"model": "gpt-5", "input": "')]
    block = b"0" * MiB
    parts += [packer.compress(block) for _ in range(size // MiB)]
    parts.append(packer.compress(b'"}') + packer.flush())
    return b"".join(parts)


async def test_a_gzip_bomb_is_refused_before_it_inflates(relayd: Relayd) -> None:
    bomb = gzip_bomb(512 * MiB)
    assert len(bomb) < 1 * MiB
    before = memory(relayd.process.pid)[1]
    headers = {
        "Authorization": f"Bearer {RELAY_KEY}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    async with asyncio.timeout(BOUND), aiohttp.ClientSession() as session:
        answers = []
        for _ in range(3):
            async with session.post(
                relayd.url("/v1/responses:stream"), data=io.BytesIO(bomb), headers=headers
            ) as response:
                answers.append((response.status, await response.json()))
    peak, _ = memory(relayd.process.pid)
    report("gzip bomb (512 MiB in under 1 MB) x 3", before=before, peak=peak)
    assert all(status == 413 for status, _ in answers), answers
    assert peak < before + 80, f"peak {peak:.0f} MiB from {len(bomb)} bytes on the wire"


# ------------------------------------------------------------------ realtime


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame (RFC 6455 §5.2); masked with a zero key, so the payload is as given."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    return header + b"\0\0\0\0" + payload


async def realtime_session(
    relayd: Relayd,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert relayd.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", relayd.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: relay.test\r\n"
            f"Authorization: Bearer {RELAY_KEY}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def unfinished_message(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> tuple[int, bytes]:
    """Send the first fragment of a message, then a ping; return what answers the
    ping: a PONG (relayd holds the fragment) or a CLOSE (it refused to)."""
    # Not drained: a session relayd refuses stops reading, and its CLOSE is read below.
    writer.write(frame(0x1, payload, fin=False))
    writer.write(frame(0x9, b"held?"))
    while True:
        opcode, data = await read_frame(reader)
        if opcode in (0x8, 0xA):
            return opcode, data


async def test_unfinished_realtime_messages_are_bounded_and_freed(relayd: Relayd) -> None:
    fragment = b"x" * (15 * MiB)
    before = memory(relayd.process.pid)[1]
    async with asyncio.timeout(BOUND):
        sessions = [await realtime_session(relayd) for _ in range(12)]
        answers = [await unfinished_message(r, w, fragment) for r, w in sessions]
        peak, held = memory(relayd.process.pid)
        for _, writer in sessions:
            writer.close()
    after = await settled_rss(relayd.process.pid, below=before + 40)
    report("12 sessions x unfinished 15 MiB", before=before, peak=peak, held=held, after=after)
    closes = [data for opcode, data in answers if opcode == 0x8]
    # 64 MiB per key: four unfinished messages fit; the rest are told to come back.
    assert len(closes) >= 6, [opcode for opcode, _ in answers]
    assert all(struct.unpack("!H", data[:2])[0] == 1013 and data[2:] for data in closes)
    assert peak < before + 160, f"peak {peak:.0f} MiB (before: {before:.0f})"
    assert after < before + 40, f"{after - before:.0f} MiB stayed after the sessions ended"


# ------------------------------------------------------------------ the rules behind them


async def _holding(relay: TestClient, key: str, declared: int) -> asyncio.StreamWriter:
    """A request that declares ``declared`` body bytes and sends only the first few:
    relayd reserves the whole length before it reads, and keeps it while it waits."""
    reader, writer = await open_raw(relay)
    writer.write(
        head(
            "POST",
            "/v1/responses:stream",
            {
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "Content-Length": str(declared),
            },
        )
        + b'{"model": "gpt-5", "input": "'
    )
    await writer.drain()
    return writer


async def _held(relay: TestClient, size: int) -> None:
    budget = relay.server.app[BUDGET]
    async with asyncio.timeout(5):
        while budget.held != size:
            await asyncio.sleep(0.01)


async def test_a_key_over_its_share_gets_429_and_the_relay_over_its_budget_503(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(
        limits={
            "max_json_bytes": MiB,
            "max_buffered_bytes": 3 * MiB,
            "max_buffered_bytes_per_key": 2 * MiB,
        },
        realtime={"max_message_bytes": MiB},
    )
    holds = [await _holding(relay, RELAY_KEY, MiB), await _holding(relay, RELAY_KEY, MiB)]
    await _held(relay, 2 * MiB)
    body = {"model": "gpt-5", "input": "hi"}
    answer = await relay.post(
        "/v1/responses:stream", json=body, headers={"Authorization": f"Bearer {RELAY_KEY}"}
    )
    assert answer.status == 429
    assert answer.headers["Retry-After"] == "1"
    error = (await answer.json())["error"]
    assert (error["type"], error["code"]) == ("requests", "relay_rate_limit_exceeded")
    # Another key is served meanwhile, until the relay as a whole is full.
    holds.append(await _holding(relay, OTHER_KEY, MiB))
    await _held(relay, 3 * MiB)
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    answer = await relay.post("/v1/responses:stream", json=body, headers=other)
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "1"
    assert (await answer.json())["error"]["code"] == "relay_overloaded"
    for writer in holds:
        writer.close()
    await _held(relay, 0)  # every reservation is given back when its request ends
    # Within the budget nothing is refused: a body as large as the JSON cap passes.
    big = {"model": "gpt-5", "input": "x" * (MiB - 100)}
    answer = await relay.post("/v1/responses:stream", json=big, headers=other)
    assert answer.status == 200
    await answer.read()
    assert relay.server.app[BUDGET].held == 0


def _gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("encoding", "body", "status", "code"),
    [
        ("gzip", _gzip(b'{"model": "gpt-5", "input": "hi"}'), 200, None),
        ("deflate", zlib.compress(b'{"model": "gpt-5", "input": "hi"}'), 200, None),
        ("gzip", b"\x1f\x8b\x08\x00not gzip at all", 400, "invalid_encoding"),
        ("gzip", _gzip(b'{"model": "gpt-5", "input": "hi"}')[:-6], 400, "invalid_encoding"),
        ("br", b"\x0b\x02\x80{}\x03", 415, "unsupported_content_encoding"),
        ("gzip, gzip", _gzip(_gzip(b"{}")), 415, "unsupported_content_encoding"),
    ],
    ids=["gzip", "deflate", "corrupt", "truncated", "brotli", "two-codings"],
)
async def test_a_compressed_json_body_is_decoded_or_refused_plainly(
    relay: TestClient,
    fake: FakeOpenAI,
    auth: dict[str, str],
    encoding: str,
    body: bytes,
    status: int,
    code: str | None,
) -> None:
    headers = {**auth, "Content-Type": "application/json", "Content-Encoding": encoding}
    answer = await relay.post("/v1/responses:stream", data=body, headers=headers)
    assert answer.status == status, await answer.text()
    if code is None:
        await answer.read()
        sent = fake.last("/v1/responses")
        assert json.loads(sent.body) == {"model": "gpt-5", "input": "hi", "stream": True}
        assert "Content-Encoding" not in sent.headers  # relayd re-encoded it
    else:
        assert (await answer.json())["error"]["code"] == code


async def test_a_compressed_pass_through_body_goes_upstream_as_sent(
    relay: TestClient, fake: FakeOpenAI, auth: dict[str, str]
) -> None:
    body = _gzip(b'{"model": "text-embedding-3-small", "input": "hi"}')
    headers = {**auth, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    answer = await relay.post("/v1/embeddings", data=body, headers=headers)
    assert answer.status == 200
    seen = fake.last("/v1/embeddings")
    assert seen.headers.get("Content-Encoding") == "gzip"
    assert seen.headers.get("Content-Length") == str(len(body))


async def test_one_key_holds_at_most_its_share_of_upstream_slots(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(upstream={"max_connections": 4})  # a key's share: 3
    team = {"Authorization": f"Bearer {RELAY_KEY}"}
    silent = {"model": "silent", "input": "hi"}
    waiting = [
        asyncio.ensure_future(relay.post("/v1/responses", json=silent, headers=team))
        for _ in range(3)
    ]
    try:
        upstream = relay.server.app[UPSTREAM]
        async with asyncio.timeout(5):
            while upstream.in_flight < 3:
                await asyncio.sleep(0.01)
        answer = await relay.post("/v1/responses", json=silent, headers=team)
        assert answer.status == 429
        assert answer.headers["Retry-After"] == "1"
        assert (await answer.json())["error"]["code"] == "relay_rate_limit_exceeded"
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        answer = await relay.post("/v1/responses", json={"model": "gpt-5"}, headers=other)
        assert answer.status == 200
    finally:
        for request in waiting:
            request.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


def test_the_budgets_come_from_limits_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text(
        "[limits]\nmax_buffered_bytes = 200000000\n"
        "[upstream]\nmax_connections = 100\nmax_connections_per_key = 10\n"
    )
    env = {"OPENAI_API_KEY": "sk-test", "RELAYD_MAX_BUFFERED_BYTES_PER_KEY": "100000000"}
    settings = load_settings(config, env)
    assert settings.limits.max_buffered_bytes == 200_000_000
    assert settings.limits.max_buffered_bytes_per_key == 100_000_000
    assert settings.upstream.connections_per_key == 10
    defaults = load_settings(None, {"OPENAI_API_KEY": "sk-test"})
    assert defaults.limits.max_buffered_bytes == 96 * MiB
    assert defaults.limits.max_buffered_bytes_per_key == 64 * MiB
    assert defaults.upstream.connections_per_key == 768  # three quarters of 1024
    with pytest.raises(ConfigError, match="max_json_bytes"):
        load_settings(None, {"OPENAI_API_KEY": "sk-test", "RELAYD_MAX_BUFFERED_BYTES": "1000"})


async def test_files_fetched_from_links_count_and_one_request_may_not_exceed_a_share(
    relay_factory: RelayFactory, aiohttp_server: AiohttpServer, tmp_path: Path, fake: FakeOpenAI
) -> None:
    host = await start_file_host(aiohttp_server, tmp_path)
    relay = await relay_factory(
        fetch_settings(host),
        limits={
            "max_json_bytes": MiB,
            "max_buffered_bytes": 4 * MiB,
            "max_buffered_bytes_per_key": 2 * MiB,
        },
        realtime={"max_message_bytes": MiB},
    )
    refs = [
        {"name": f"{i}.png", "download_link": host.put(f"{i}.png", PNG + bytes(MiB))}
        for i in range(2)
    ]
    body = {"prompt": "make it blue", "openaiFileIdRefs": refs, "mask_index": 1}
    answer = await relay.post(
        "/v1/actions/images/edits", json=body, headers={"Authorization": f"Bearer {RELAY_KEY}"}
    )
    # Two fetched files of just over 1 MiB: more than the key's whole share, which no
    # retry can change (413, not 429), and nothing went upstream.
    assert answer.status == 413, await answer.text()
    assert (await answer.json())["error"]["code"] == "request_too_large"
    assert not fake.seen
    assert relay.server.app[BUDGET].held == 0


async def test_a_lone_key_has_the_whole_pool_and_budget(relay_factory: RelayFactory) -> None:
    # Shares protect the other keys; with none, they would only hold the one key back.
    relay = await relay_factory(
        upstream={"max_connections": 4},
        auth={"keys": parse_keys_env(f"team:{RELAY_KEY}")},
    )
    team = {"Authorization": f"Bearer {RELAY_KEY}"}
    silent = {"model": "silent", "input": "hi"}
    waiting = [
        asyncio.ensure_future(relay.post("/v1/responses", json=silent, headers=team))
        for _ in range(4)
    ]
    try:
        upstream = relay.server.app[UPSTREAM]
        async with asyncio.timeout(5):
            while upstream.in_flight < 4:
                await asyncio.sleep(0.01)
        answer = await relay.post("/v1/responses", json=silent, headers=team)
        assert answer.status == 503  # the pool is full, not the key's share
    finally:
        for request in waiting:
            request.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_unfinished_messages_count_until_whole_and_past_the_share_close_1013(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(
        limits={
            "max_json_bytes": MiB // 2,
            "max_buffered_bytes": 3 * MiB,
            "max_buffered_bytes_per_key": 2 * MiB,
        },
        realtime={"max_message_bytes": MiB},
    )
    part = b"a" * (450 * 1024)
    async with asyncio.timeout(BOUND):
        first = await _raw_realtime(relay)
        reader, writer = first
        # An unfinished message (two fragments) is held: it counts.
        writer.write(frame(0x1, part, fin=False) + frame(0x0, part, fin=False))
        await _held(relay, 2 * len(part))
        # A frame arriving in pieces on the fast lane counts too, until it is whole.
        second = await _raw_realtime(relay)
        writer2 = second[1]
        writer2.write(frame(0x1, b"proof of a boundary"))
        assert await read_frame(second[0]) == (0x1, b"proof of a boundary")
        whole = frame(0x2, part)
        writer2.write(whole[: len(whole) // 2])
        await _held(relay, 2 * len(part) + len(whole) // 2)
        # This key's share (2 MiB) cannot take another 1000 KiB: 1013, with a reason.
        third = await _raw_realtime(relay)
        answer = await unfinished_message(*third, b"c" * (1000 * 1024))
        assert answer[0] == 0x8
        assert struct.unpack("!H", answer[1][:2])[0] == 1013
        assert b"retry later" in answer[1][2:]
        # Finished messages arrive whole and are no longer held.
        writer.write(frame(0x0, b"!"))
        assert await read_frame(reader) == (0x1, part + part + b"!")
        writer2.write(whole[len(whole) // 2 :])
        assert await read_frame(second[0]) == (0x2, part)
        await _held(relay, 0)
        for session in (first, second):
            await _bye(*session)
        third[1].close()
        with contextlib.suppress(ConnectionError):  # relayd dropped it after its CLOSE
            await third[1].wait_closed()


async def _bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(frame(0x8, struct.pack("!H", 1000)))
    while (await read_frame(reader))[0] != 0x8:
        pass
    writer.close()
    await writer.wait_closed()


async def _raw_realtime(relay: TestClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await open_raw(relay)
    writer.write(
        head(
            "GET",
            "/v1/realtime?model=gpt-realtime",
            {"Authorization": f"Bearer {RELAY_KEY}", **websocket_upgrade()},
        )
    )
    status, _ = await read_head(reader)
    assert status == 101
    return reader, writer
