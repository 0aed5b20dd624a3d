"""One measurement of one target: build the load jobs, run them, reduce to figures.

Figures are flat ``{key: float}`` dicts; ``bench.report.FIGURES`` says what each key
means. Raw latency lists stay here: only percentiles leave.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.memory import RssSampler
from bench.procs import listen_overflows, rss_bytes, tree_pids
from bench.stack import Target
from bench.workers import LoadPool

__all__ = ["SCENARIOS", "Plan", "in_turn", "percentile"]

MiB = 1024 * 1024
SMALL_BODY = json.dumps({"model": "gpt-5", "input": "hi"}).encode()


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``quick()`` is a smoke run of the same shape."""

    rounds: int = 3
    workers: int = 1
    latency_n: int = 2000
    concurrency: int = 64
    throughput_s: float = 5.0
    sse_streams: int = 1000
    paced_streams: int = 1000
    download_bytes: int = 1024 * MiB
    upload_bytes: int = 512 * MiB
    realtime_sessions: int = 200
    realtime_s: float = 5.0
    frame_bytes: int = 1024
    paced: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> Plan:
        values: dict[str, Any] = dict(
            rounds=1,
            latency_n=300,
            throughput_s=1.5,
            sse_streams=200,
            paced_streams=200,
            download_bytes=128 * MiB,
            upload_bytes=64 * MiB,
            realtime_s=1.5,
        )
        values.update(overrides)
        return cls(**values)


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


def added_ms(answer: dict[str, Any]) -> tuple[float, float]:
    """(p50, p99) of ``other_latencies`` minus ``latencies`` in ms, from a latency
    job that alternated two ways of asking (``other_headers`` or ``other_url``)."""
    first, other = answer["latencies"], answer["other_latencies"]
    if not first or not other:
        raise RuntimeError(f"no answered requests to compare: {answer['errors']}")
    p50 = (percentile(other, 50) or 0.0) - (percentile(first, 50) or 0.0)
    p99 = (percentile(other, 99) or 0.0) - (percentile(first, 99) or 0.0)
    return p50 * 1000, p99 * 1000


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def _split(total: int, parts: int) -> list[int]:
    shares = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    return [s for s in shares if s > 0]


def _errors(answers: list[dict[str, Any]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for answer in answers:
        for name, count in answer["errors"].items():
            merged[name] = merged.get(name, 0) + count
    return merged


Figures = dict[str, Any]


def latency(pool: LoadPool, target: Target, plan: Plan) -> Figures:
    job = {
        "kind": "latency",
        "url": target.url("/v1/responses"),
        "headers": target.headers,
        "body": SMALL_BODY,
        "n": plan.latency_n,
        "warmup": 100,
        "timeout": 30.0,
    }
    [answer] = pool.run([job], timeout=60 + plan.latency_n * 0.05)
    times = answer["latencies"]
    return {
        "lat_p50_ms": _ms(percentile(times, 50)),
        "lat_p99_ms": _ms(percentile(times, 99)),
        "errors": _errors([answer]),
    }


def throughput(pool: LoadPool, target: Target, plan: Plan) -> Figures:
    jobs = [
        {
            "kind": "throughput",
            "url": target.url("/v1/responses"),
            "headers": target.headers,
            "body": SMALL_BODY,
            "concurrency": share,
            "duration": plan.throughput_s,
            "warmup_s": 0.5,
            "timeout": 30.0,
        }
        for share in _split(plan.concurrency, pool.size)
    ]
    answers = pool.run(jobs, timeout=90 + plan.throughput_s)
    times = [t for answer in answers for t in answer["latencies"]]
    elapsed = max(answer["elapsed"] for answer in answers)
    return {
        "rps": len(times) / elapsed if elapsed else None,
        "rps_p50_ms": _ms(percentile(times, 50)),
        "rps_p99_ms": _ms(percentile(times, 99)),
        "errors": _errors(answers),
    }


def _sse(pool: LoadPool, target: Target, streams: int, model: str, prefix: str) -> Figures:
    body = json.dumps({"model": model, "input": "hi", "stream": True}).encode()
    jobs = [
        {
            "kind": "sse",
            "url": target.url("/v1/responses"),
            "headers": target.headers,
            "body": body,
            "streams": share,
            "timeout": 120.0,
        }
        for share in _split(streams, pool.size)
    ]
    overflows = listen_overflows()
    answers = pool.run(jobs, timeout=180)
    overflows = listen_overflows() - overflows
    ttfe = [t for answer in answers for t in answer["ttfe"]]
    return {
        f"{prefix}_ttfe_p50_ms": _ms(percentile(ttfe, 50)),
        f"{prefix}_ttfe_p99_ms": _ms(percentile(ttfe, 99)),
        f"{prefix}_complete": sum(answer["complete"] for answer in answers),
        f"{prefix}_wall_s": max(answer["wall"] for answer in answers),
        f"{prefix}_overflows": overflows,
        "errors": _errors(answers),
    }


def sse_burst(pool: LoadPool, target: Target, plan: Plan) -> Figures:
    return _sse(pool, target, plan.sse_streams, "gpt-5", "burst")


def sse_paced(pool: LoadPool, target: Target, plan: Plan) -> Figures:
    return _sse(pool, target, plan.paced_streams, "slow", "paced")


def _transfer(pool: LoadPool, target: Target, job: dict[str, Any], prefix: str) -> Figures:
    # Budget: 20 MiB/s would be a failure anyway; the limit only bounds the wait.
    timeout = 60 + job["size"] / (20 * MiB)
    job["timeout"] = timeout
    if target.server is None:
        [answer] = pool.run([job], timeout=timeout + 10)
        memory: dict[str, float] = {}
    else:
        with RssSampler(tree_pids(target.server.pid)) as sampler:
            [answer] = pool.run([job], timeout=timeout + 10)
        memory = {
            f"{prefix}_peak_rss_mib": sampler.peak / MiB,
            f"{prefix}_rss_growth_mib": sampler.growth / MiB,
        }
    mib_s = answer["bytes"] / MiB / answer["elapsed"] if not answer["errors"] else None
    return {f"{prefix}_mib_s": mib_s, **memory, "errors": _errors([answer])}


def download(pool: LoadPool, target: Target, plan: Plan) -> Figures:
    size = plan.download_bytes
    job = {
        "kind": "download",
        "url": target.url(f"/v1/files/gen-{size}/content"),
        "headers": target.headers,
        "size": size,
    }
    return _transfer(pool, target, job, "down")


def upload(pool: LoadPool, target: Target, plan: Plan) -> Figures:
    job = {
        "kind": "upload",
        "url": target.url("/v1/files"),
        "headers": target.headers,
        "size": plan.upload_bytes,
    }
    return _transfer(pool, target, job, "up")


def realtime(pool: LoadPool, target: Target, plan: Plan) -> Figures:
    """Bridged WebSockets echoing 1 KiB TEXT frames; RSS cost of an open session."""
    pids = tree_pids(target.server.pid) if target.server else []
    jobs = [
        {
            "kind": "ws_echo",
            "url": target.url("/v1/realtime?model=gpt-realtime"),
            "headers": target.headers,
            "sessions": share,
            "frame_bytes": plan.frame_bytes,
            "duration": plan.realtime_s,
            "timeout": 30.0,
            "rss_pids": pids,
        }
        for share in _split(plan.realtime_sessions, pool.size)
    ]
    before = rss_bytes(pids)
    answers = pool.run(jobs, timeout=90 + plan.realtime_s)
    times = [t for answer in answers for t in answer["latencies"]]
    elapsed = max(answer["elapsed"] for answer in answers)
    opened = sum(answer["opened"] for answer in answers)
    figures: Figures = {
        "rt_rps": len(times) / elapsed if elapsed and times else None,
        "rt_p50_ms": _ms(percentile(times, 50)),
        "rt_p99_ms": _ms(percentile(times, 99)),
        "rt_sessions": opened,
        "errors": _errors(answers),
    }
    if pids and opened:
        rss_open = max(answer["rss_open"] for answer in answers)
        figures["rt_rss_per_session_kib"] = (rss_open - before) / opened / 1024
    return figures


def in_turn(pool: LoadPool, first: Target, second: Target, plan: Plan) -> tuple[float, float]:
    """(p50, p99) of ``second``'s latency minus ``first``'s in ms, at one connection
    each, the two asked in turn, request by request: whatever else the machine does
    falls on both alike, which runs of each, back to back, cannot promise when the
    difference sought is a tenth of a millisecond. Two targets may be one server
    asked two ways (other headers)."""
    job = {
        "kind": "latency",
        "url": first.url("/v1/responses"),
        "headers": first.headers,
        "other_url": second.url("/v1/responses"),
        "other_headers": second.headers,
        "body": SMALL_BODY,
        "n": 2 * plan.latency_n,
        "warmup": 100,
        "timeout": 30.0,
    }
    [answer] = pool.run([job], timeout=60 + plan.latency_n * 0.1)
    return added_ms(answer)


Scenario = Callable[[LoadPool, Target, Plan], Figures]

# (name, profile whose targets it loads, function); run in this order every round.
# realtime goes first: in round 1 its sessions land on a heap no other load has
# grown yet, so the RSS cost per session (worst round) is not hidden by reuse.
SCENARIOS: list[tuple[str, str, Scenario]] = [
    ("realtime", "default", realtime),
    ("latency", "default", latency),
    ("throughput", "default", throughput),
    ("sse-burst", "default", sse_burst),
    ("sse-paced", "paced", sse_paced),
    ("download", "default", download),
    ("upload", "default", upload),
]
