"""The soak's load, run inside a worker process: a bounded mix against relayd.

Lanes run side by side until ``duration`` is over, each also capped in count (see
``LANES``): small JSON, whole SSE streams, streams the client hangs up on after
the first event, upstream faults (``error-500`` plain and streamed, ``break``: an
SSE stream upstream cuts mid-event), downloads (one in three hung up after 8 MiB),
uploads (each file deleted after), realtime sessions ending four ways (client
close, client hang-up, upstream vanishing, upstream closing with 4000) and
sessions held open for 30 s. Outcomes are tallied by name; a fault provoked on
purpose counts as expected when relayd answers it the way it should, anything
else as unexpected.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.load import Job, _error_name, _file_bytes, _session
from bench.wsload import Ws, event_frame, round_trip, ws_timeout

__all__ = ["soak"]

MiB = 1024 * 1024
DOWNLOAD = 64 * MiB
UPLOAD = 32 * MiB
HANG_UP_AFTER = 8 * MiB
HELD = 16  # sessions a "held" lane keeps open
HOLD_S = 30.0


class Unexpected(Exception):
    """relayd answered a step in a way it should not have."""


@dataclass
class Ctx:
    session: aiohttp.ClientSession
    base: str
    headers: dict[str, str]
    deadline: float
    stop_file: str | None = None  # the parent creates it to end the load early
    frame: bytes = field(default_factory=lambda: event_frame(1024))

    def url(self, path: str) -> str:
        return self.base + path

    def post(self, model: str, stream: bool) -> Any:
        body = json.dumps({"model": model, "input": "hi", "stream": stream}).encode()
        headers = {**self.headers, "Content-Type": "application/json"}
        return self.session.post(self.url("/v1/responses"), data=body, headers=headers)


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise Unexpected(what)


async def _json(ctx: Ctx, i: int) -> str:
    async with ctx.post("gpt-5", False) as response:
        await response.read()
        _expect(response.status == 200, f"status {response.status}")
    return "json 200"


async def _sse(ctx: Ctx, i: int) -> str:
    async with ctx.post("gpt-5", True) as response:
        body = await response.read()
        _expect(response.status == 200, f"status {response.status}")
    _expect(b"event: response.completed" in body, "stream incomplete")
    return "sse complete"


async def _hang_up(ctx: Ctx, i: int) -> str:
    response = await ctx.post("slow", True)
    try:
        _expect(response.status == 200, f"status {response.status}")
        seen = b""
        while b"\n\n" not in seen:
            chunk = await response.content.readany()
            _expect(bool(chunk), "stream ended before its first event")
            seen += chunk
    finally:
        response.close()  # drops the connection mid-stream
    return "sse hung up after 1st event"


async def _fault(ctx: Ctx, i: int) -> str:
    if i % 3 < 2:
        stream = i % 3 == 1
        async with ctx.post("error-500", stream) as response:
            await response.read()
            _expect(response.status == 500, f"error-500 answered {response.status}")
        return f"error-500 {'stream' if stream else 'json'}: 500"
    try:
        async with ctx.post("break", True) as response:
            body = await response.read()
    except aiohttp.ClientPayloadError:
        return "break: cut off (payload error)"
    _expect(b"event: response.completed" not in body, "break stream completed")
    return f"break: {response.status}, incomplete"


async def _transfer(ctx: Ctx, i: int) -> str:
    if i % 3 == 1:
        with aiohttp.MultipartWriter("form-data") as form:
            form.append("batch").set_content_disposition("form-data", name="purpose")
            part = form.append(_file_bytes(UPLOAD), {"Content-Type": "application/jsonl"})
            part.set_content_disposition("form-data", name="file", filename="soak.jsonl")
        async with ctx.session.post(ctx.url("/v1/files"), data=form, headers=ctx.headers) as r:
            answer = await r.json(content_type=None)
            _expect(r.status == 200, f"upload status {r.status}")
        async with ctx.session.delete(
            ctx.url(f"/v1/files/{answer['id']}"), headers=ctx.headers
        ) as r:
            await r.read()
            _expect(r.status == 200, f"delete status {r.status}")
        return "upload 32 MiB + delete"
    hang_up = i % 3 == 2
    received = 0
    url = ctx.url(f"/v1/files/gen-{DOWNLOAD}/content")
    async with ctx.session.get(url, headers=ctx.headers) as response:
        _expect(response.status == 200, f"download status {response.status}")
        while chunk := await response.content.readany():
            received += len(chunk)
            if hang_up and received >= HANG_UP_AFTER:
                response.close()
                return "download hung up at 8 MiB"
    _expect(received == DOWNLOAD, f"download got {received} bytes")
    return "download 64 MiB"


async def _open(ctx: Ctx) -> Ws:
    return await ctx.session.ws_connect(
        ctx.url("/v1/realtime?model=gpt-realtime"),
        headers=ctx.headers,
        decode_text=False,
        timeout=ws_timeout(30.0),
    )


async def _echo(ws: Ws, ctx: Ctx) -> None:
    errors: Counter[str] = Counter()
    _expect(await round_trip(ws, ctx.frame, errors) is not None, ", ".join(errors))


async def _realtime(ctx: Ctx, i: int) -> str:
    ws = await _open(ctx)
    try:
        for _ in range(20):
            await _echo(ws, ctx)
        if i % 4 == 0:
            await ws.close()
            return "realtime: client closed"
        if i % 4 == 1:
            ws._response.close()  # hang up: no CLOSE frame, the TCP connection just ends
            return "realtime: client hung up"
        command = (
            {"type": "test.vanish"}
            if i % 4 == 2
            else {"type": "test.close", "code": 4000, "reason": "soak"}
        )
        await ws.send_str(json.dumps(command))
        msg = await ws.receive()
        want = 1011 if i % 4 == 2 else 4000
        _expect(
            msg.type is aiohttp.WSMsgType.CLOSE and msg.data == want,
            f"{command['type']} gave {msg.type.name} {msg.data}",
        )
        return f"realtime: upstream {command['type']} -> {want}"
    finally:
        if not ws.closed and i % 4 != 1:
            await ws.close()


async def _held(ctx: Ctx, i: int) -> str:
    opened = await asyncio.gather(*(_open(ctx) for _ in range(HELD)), return_exceptions=True)
    sockets = [ws for ws in opened if not isinstance(ws, BaseException)]
    try:
        for failed in opened:
            if isinstance(failed, BaseException):
                raise failed
        until = time.monotonic() + HOLD_S
        while time.monotonic() < min(until, ctx.deadline):
            await asyncio.gather(*(_echo(ws, ctx) for ws in sockets))
            await asyncio.sleep(min(5.0, max(0.0, min(until, ctx.deadline) - time.monotonic())))
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return f"realtime: {HELD} held open"


Step = Callable[[Ctx, int], Awaitable[str]]
# name, step, parallel lanes, pause between steps (s). Rates stay well below what
# relayd can serve: a soak looks for leaks, not for the throughput ceiling.
LANES: list[tuple[str, Step, int, float]] = [
    ("json", _json, 4, 0.01),
    ("sse", _sse, 2, 0.02),
    ("hang-up", _hang_up, 1, 0.1),
    ("fault", _fault, 1, 0.1),
    ("transfer", _transfer, 1, 2.0),
    ("realtime", _realtime, 3, 0.05),
    ("held", _held, 1, 0.0),
]


async def _lane(
    name: str,
    step: Step,
    ctx: Ctx,
    pause: float,
    limit: int,
    tally: Counter[str],
    unexpected: Counter[str],
) -> None:
    for index in range(limit):
        if time.monotonic() >= ctx.deadline:
            return
        try:
            tally[await step(ctx, index)] += 1
        except Unexpected as exc:
            unexpected[f"{name}: {exc}"] += 1
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            unexpected[f"{name}: {_error_name(exc)}"] += 1
        await asyncio.sleep(pause)


async def _watch_stop(ctx: Ctx) -> None:
    while ctx.stop_file is not None and time.monotonic() < ctx.deadline:
        if os.path.exists(ctx.stop_file):
            ctx.deadline = time.monotonic()  # every lane stops after its current step
            return
        await asyncio.sleep(0.5)


async def soak(job: Job) -> dict[str, Any]:
    tally: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    async with _session(0, 60.0) as session:
        deadline = time.monotonic() + job["duration"]
        ctx = Ctx(session, job["base"], job["headers"], deadline, job.get("stop_file"))
        lanes = [_watch_stop(ctx)]
        for name, step, parallel, pause in LANES:
            if job.get("lanes") and name not in job["lanes"]:
                continue
            limit = int(job["duration"] / max(pause, 0.01)) + 1  # bounded in count too
            lanes += [
                _lane(name, step, ctx, pause, limit, tally, unexpected) for _ in range(parallel)
            ]
        await asyncio.gather(*lanes)
    return {"tally": dict(tally), "unexpected": dict(unexpected), "errors": {}}
