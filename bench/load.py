"""Load generation, run inside the worker processes (never in a server's process).

Each job is a plain dict (it crosses a process boundary) naming a ``kind`` and its
parameters; the answer is a plain dict of raw observations (latency lists, byte
counts) that the parent turns into figures, so several workers' answers merge by
concatenation.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp

__all__ = ["run_job"]

Job = dict[str, Any]

# One reused block: the upload generator never holds more than this.
_BLOCK = bytes(range(256)) * 4096  # 1 MiB


def _session(limit: int, timeout: float) -> aiohttp.ClientSession:
    # ssl=False: https targets (python -m bench tls) use a throwaway CA; TLS is
    # measured, trust is not.
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False, ssl=False)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


async def _post_json(session: aiohttp.ClientSession, job: Job) -> bool:
    """One request (a JSON POST unless the job names another ``method``, bodiless)."""
    method = job.get("method", "POST")
    headers = dict(job["headers"])
    if method == "POST":
        headers["Content-Type"] = "application/json"
    body = job["body"] if method == "POST" else None
    async with session.request(method, job["url"], data=body, headers=headers) as response:
        await response.read()
        return response.status == 200


async def latency(job: Job) -> dict[str, Any]:
    """Sequential requests on one kept-alive connection. With ``other_headers`` or
    ``other_url`` (a second connection, to another server) they alternate with
    the first way of asking, request by request, and the other's times are
    ``other_latencies``: a difference between two ways of asking, or two servers,
    measured with whatever else the machine does spread evenly over both."""
    times: list[float] = []
    other_times: list[float] = []
    errors: Counter[str] = Counter()
    jobs = [job]
    if "other_headers" in job or "other_url" in job:
        jobs.append(
            {
                **job,
                "headers": job.get("other_headers", job["headers"]),
                "url": job.get("other_url", job["url"]),
            }
        )
    async with _session(len(jobs), job["timeout"]) as session:
        for index in range(job["warmup"] + job["n"]):
            this = jobs[index % len(jobs)]
            started = time.perf_counter()
            try:
                ok = await _post_json(session, this)
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[_error_name(exc)] += 1
                continue
            if not ok:
                errors["status"] += 1
            elif index >= job["warmup"]:
                elapsed = time.perf_counter() - started
                (times if this is job else other_times).append(elapsed)
    return {"latencies": times, "other_latencies": other_times, "errors": dict(errors)}


async def throughput(job: Job) -> dict[str, Any]:
    """``concurrency`` loops sending back to back for ``duration`` seconds."""
    times: list[float] = []
    errors: Counter[str] = Counter()
    async with _session(job["concurrency"], job["timeout"]) as session:

        async def loop(deadline: float, record: bool) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    ok = await _post_json(session, job)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[_error_name(exc)] += 1
                    continue
                if not record:
                    continue
                if ok:
                    times.append(time.perf_counter() - started)
                else:
                    errors["status"] += 1

        # Warm-up opens every connection before the clock starts.
        warm = time.perf_counter() + job["warmup_s"]
        await asyncio.gather(*(loop(warm, False) for _ in range(job["concurrency"])))
        errors.clear()
        started = time.perf_counter()
        deadline = started + job["duration"]
        await asyncio.gather(*(loop(deadline, True) for _ in range(job["concurrency"])))
        elapsed = time.perf_counter() - started
    return {"latencies": times, "elapsed": elapsed, "errors": dict(errors)}


async def sse(job: Job) -> dict[str, Any]:
    """``streams`` SSE requests opened at once; time to the first whole event."""
    ttfe: list[float] = []
    errors: Counter[str] = Counter()
    complete = 0
    headers = {**job["headers"], "Content-Type": "application/json", "Accept": "text/event-stream"}

    async def stream(session: aiohttp.ClientSession) -> None:
        nonlocal complete
        started = time.perf_counter()
        first: float | None = None
        body = bytearray()
        try:
            async with session.post(job["url"], data=job["body"], headers=headers) as response:
                while chunk := await response.content.readany():
                    body += chunk
                    if first is None and b"\n\n" in body:
                        first = time.perf_counter() - started
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors[_error_name(exc)] += 1
            return
        if status != 200:
            errors[f"status {status}"] += 1
            return
        if first is not None:
            ttfe.append(first)
        if b"event: response.completed" in body:
            complete += 1
        else:
            errors["incomplete"] += 1

    async with _session(0, job["timeout"]) as session:
        started = time.perf_counter()
        await asyncio.gather(*(stream(session) for _ in range(job["streams"])))
        wall = time.perf_counter() - started
    return {
        "ttfe": ttfe,
        "complete": complete,
        "streams": job["streams"],
        "wall": wall,
        "errors": dict(errors),
    }


async def download(job: Job) -> dict[str, Any]:
    received = 0
    async with _session(1, job["timeout"]) as session:
        started = time.perf_counter()
        async with session.get(job["url"], headers=job["headers"]) as response:
            status = response.status
            while chunk := await response.content.readany():
                received += len(chunk)
        elapsed = time.perf_counter() - started
    ok = status == 200 and received == job["size"]
    errors = {} if ok else {f"status {status}, {received} of {job['size']} bytes": 1}
    return {"bytes": received, "elapsed": elapsed, "errors": errors}


async def _file_bytes(size: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < size:
        chunk = _BLOCK[: min(len(_BLOCK), size - sent)]
        sent += len(chunk)
        yield chunk


async def upload(job: Job) -> dict[str, Any]:
    """A streamed multipart ``POST /v1/files``: chunked, never held whole."""
    with aiohttp.MultipartWriter("form-data") as form:
        purpose = form.append("batch")
        purpose.set_content_disposition("form-data", name="purpose")
        file = form.append(_file_bytes(job["size"]), {"Content-Type": "application/jsonl"})
        file.set_content_disposition("form-data", name="file", filename="bench.jsonl")
    async with _session(1, job["timeout"]) as session:
        started = time.perf_counter()
        async with session.post(job["url"], data=form, headers=job["headers"]) as response:
            status = response.status
            answer = await response.read()
        elapsed = time.perf_counter() - started
    errors = {} if status == 200 else {f"status {status}: {answer[:200]!r}": 1}
    return {"bytes": job["size"], "elapsed": elapsed, "errors": errors}


_KINDS: dict[str, Callable[[Job], Coroutine[Any, Any, dict[str, Any]]]] = {
    "latency": latency,
    "throughput": throughput,
    "sse": sse,
    "download": download,
    "upload": upload,
}


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    # The fastest client loop there is, so the load side is not what we measure.
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _kind(name: str) -> Callable[[Job], Coroutine[Any, Any, dict[str, Any]]]:
    # The realtime and soak loads build on this module, so they are looked up late.
    if name == "ws_echo":
        from bench.wsload import ws_echo

        return ws_echo
    if name == "soak":
        from bench.soakload import soak

        return soak
    return _KINDS[name]


def run_job(job: Job) -> dict[str, Any]:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_kind(job["kind"])(job))
