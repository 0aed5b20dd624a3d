"""Realtime WebSocket load, run inside the worker processes: echo round trips.

``sessions`` WebSockets to ``/v1/realtime`` are opened at once; each makes one
unmeasured round trip, so every session is open and warm before the clock starts.
Then every session sends a 1 KiB TEXT frame and waits for its echo, back to back,
for ``duration`` seconds. Frames are sent as bytes and received undecoded so the
client spends as little CPU as it can (it shares the machine with the servers).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from typing import Any

import aiohttp

from bench.load import Job, _error_name, _session
from bench.procs import rss_bytes

__all__ = ["event_frame", "ws_echo"]

Ws = aiohttp.ClientWebSocketResponse[bool]


def event_frame(size: int) -> bytes:
    """A realtime-shaped TEXT payload of exactly ``size`` bytes (an audio append)."""
    head, tail = b'{"type":"input_audio_buffer.append","audio":"', b'"}'
    fill = max(0, size - len(head) - len(tail))
    audio = base64.b64encode(bytes(range(256)) * (fill // 256 + 1))[:fill]
    return head + audio + tail


def ws_timeout(seconds: float) -> aiohttp.ClientWSTimeout:
    return aiohttp.ClientWSTimeout(ws_receive=seconds, ws_close=5.0)


async def round_trip(ws: Ws, payload: bytes, errors: Counter[str]) -> float | None:
    """Send ``payload`` and wait for its echo; the round-trip time, or None."""
    started = time.perf_counter()
    await ws.send_frame(payload, aiohttp.WSMsgType.TEXT)
    msg = await ws.receive()
    if msg.type is not aiohttp.WSMsgType.TEXT or msg.data != payload:
        errors[f"echo: {msg.type.name}"] += 1
        return None
    return time.perf_counter() - started


async def ws_echo(job: Job) -> dict[str, Any]:
    payload = event_frame(job["frame_bytes"])
    errors: Counter[str] = Counter()
    times: list[float] = []
    async with _session(0, job["timeout"]) as session:

        async def open_one() -> Ws | None:
            try:
                ws = await session.ws_connect(
                    job["url"],
                    headers=job["headers"],
                    decode_text=False,
                    timeout=ws_timeout(job["timeout"]),
                )
                if await round_trip(ws, payload, errors) is None:
                    await ws.close()
                    return None
                return ws
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[f"open: {_error_name(exc)}"] += 1
                return None

        opened = [
            ws
            for ws in await asyncio.gather(*(open_one() for _ in range(job["sessions"])))
            if ws is not None
        ]
        rss_open = rss_bytes(job["rss_pids"])  # every session open and warm

        async def loop(ws: Ws, deadline: float) -> None:
            while time.perf_counter() < deadline:
                try:
                    took = await round_trip(ws, payload, errors)
                except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                    errors[f"echo: {_error_name(exc)}"] += 1
                    return
                if took is None:
                    return
                times.append(took)

        started = time.perf_counter()
        await asyncio.gather(*(loop(ws, started + job["duration"]) for ws in opened))
        elapsed = time.perf_counter() - started
        rss_open = max(rss_open, rss_bytes(job["rss_pids"]))
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    return {
        "latencies": times,
        "elapsed": elapsed,
        "opened": len(opened),
        "rss_open": rss_open,
        "errors": dict(errors),
    }
