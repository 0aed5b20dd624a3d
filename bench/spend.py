"""``python -m bench spend``: what spend control costs (issue 15).

One run, loopback, two relayd processes in front of the same fake upstream:

- ``limits off``: ``[spend] backend = "off"`` (nothing metered, nothing written);
- ``limits on``: the SQLite ledger, and the bench key with ``rpm``, ``tpm`` and a
  dollar budget (``usd_per_day``) set high enough never to refuse, so every request
  pays for the body read, one admission and one settlement.

Scenarios, interleaved round by round: 2,000 sequential small JSON requests on one
connection (latency p50/p99, relayd's CPU per request), 64 connections posting for
5 s (req/s), and the figure of record, on minus off: 2,000 requests to each relay
in turn, request by request, with each relay's CPU over that run. Then the ledger
alone: admit+settle pairs per second from one process, and from two processes at
once on the same file (as two workers do).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.procs import Server, cpu_seconds, free_port, start_server, tree_pids
from bench.report import cell, median_of
from bench.scenarios import Plan, in_turn, latency, throughput
from bench.stack import EVERY_FLOOR_LIMITS, REPO, Target, _relayd_env, fake_argv
from bench.workers import LoadPool, raise_fd_limit
from relayd.config import Settings, updated
from relayd.store.ledger import Admission, Event, Ledger, SqliteLedger
from relayd.store.ledger_redis import RedisLedger
from relayd.store.redis import connect

__all__ = ["main"]

TARGETS = ("limits off", "limits on")
LANES = 64  # --store redis: admissions in flight at once in one process
RELAY_KEY = "bench-spend-" + "0" * 20
LIMITS = EVERY_FLOOR_LIMITS


def _start(tmp: Path) -> tuple[list[Server], dict[str, Target]]:
    servers: list[Server] = []

    def spawn(name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        server = start_server(name, argv, port=port, log=tmp / f"{name}.log", env=env, cwd=REPO)
        servers.append(server)
        return server

    fake_port = free_port()
    spawn(
        "fake",
        fake_argv(fake_port),
        fake_port,
    )
    auth = {"Authorization": f"Bearer {RELAY_KEY}"}
    targets: dict[str, Target] = {}
    config = tmp / "relayd.toml"
    config.write_text(LIMITS)
    for name, extra in (
        ("limits off", {"RELAYD_SPEND_BACKEND": "off"}),
        ("limits on", {"RELAYD_CONFIG": str(config)}),
    ):
        port = free_port()
        env = _relayd_env(fake_port, port, RELAY_KEY, "info")
        state = tmp / name.replace(" ", "-")
        state.mkdir()
        env.update(RELAYD_STATE_DIR=str(state), **extra)
        server = spawn(name, [sys.executable, "-m", "relayd", "serve"], port, env)
        targets[name] = Target(name, f"http://127.0.0.1:{port}", auth, server)
    for server in servers:
        server.wait_ready()
    return servers, targets


def _ledger(where: str) -> Ledger:
    """``where``: a ledger file's path, or ``redis://…|<state dir>`` (the Redis ledger,
    its detail events in that directory)."""
    if not where.startswith("redis://"):
        return SqliteLedger(Path(where))
    url, state = where.split("|")
    settings = updated(Settings(), store={"backend": "redis", "redis_url": url, "dir": state})
    return RedisLedger(connect(settings), settings, own_client=True)


async def _pair(ledger: Ledger, worker: int, n: int) -> asyncio.Future[bool]:
    """One admission, awaited, and its settlement, not awaited (as relayd does: it
    rides the next commit)."""
    now = time.time()
    admission = Admission(
        key=f"bench{worker}",
        reservation=f"r{worker}-{n}",
        model="gpt-5",
        operation="createResponse",
        now=now,
        expires=now + 900,
        rpm=10**9,
        tpm=10**12,
        max_parallel=10**6,  # checked, never reached (settlements are not awaited)
        budgets=(("day:bench", 10**12), ("total", 10**12)),
        micro_usd=49,
        input_tokens=15,
        output_tokens=3,
        windows=("day:bench", "total"),
    )
    hit = await ledger.admit(admission, hold=True)
    assert isinstance(hit, int), hit
    event = Event(
        at=now,
        key=admission.key,
        model="gpt-5",
        operation="createResponse",
        outcome="ok",
        input_tokens=11,
        output_tokens=3,
        micro_usd=44,
        windows=admission.windows,
    )
    return ledger.settle(event, reservation=admission.reservation, hit=hit, tokens=-4)


async def _pairs(path: str, count: int, worker: int, lanes: int = 1) -> float:
    """``count`` admit+settle pairs, one after the other in each of ``lanes``
    concurrent lanes (as that many requests at once); seconds taken."""
    ledger = _ledger(path)
    await ledger.open()
    settled: list[asyncio.Future[bool]] = []

    async def lane(first: int) -> None:
        for n in range(first, count, lanes):
            settled.append(await _pair(ledger, worker, n))

    started = time.perf_counter()
    await asyncio.gather(*(lane(first) for first in range(lanes)))
    await asyncio.gather(*settled)
    elapsed = time.perf_counter() - started
    await ledger.close()
    return elapsed


def _pairs_in_process(args: tuple[str, int, int]) -> float:
    return asyncio.run(_pairs(*args))


def ledger_rate(tmp: Path, count: int, processes: int, redis_url: str | None = None) -> float:
    """Admit+settle pairs per second over ``processes`` processes on one file, or on
    one Redis server (each process its own client, as instances are)."""
    path = tmp / f"ledger-{processes}.sqlite3"
    SqliteLedger.migrate(path)
    where = str(path) if redis_url is None else f"{redis_url}|{tmp / f'state-{processes}'}"
    jobs = [(where, count, worker) for worker in range(processes)]
    if processes == 1:
        return count / _pairs_in_process(jobs[0])
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        started = time.perf_counter()
        pool.map(_pairs_in_process, jobs)
        elapsed = time.perf_counter() - started
    return count * processes / elapsed


def _commits(target: Target) -> tuple[float, float]:
    """(count, seconds) of the relay's ledger commits so far, from its /metrics."""
    request = urllib.request.Request(target.url("/metrics"), headers=target.headers)
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read().decode()
    found = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "relayd_ledger_operation_seconds"
        for sample in family.samples
        if sample.labels.get("operation") == "commit"
    }
    return (
        found.get("relayd_ledger_operation_seconds_count", 0.0),
        found.get("relayd_ledger_operation_seconds_sum", 0.0),
    )


Added = tuple[float, float, float, float, float, float]


def _in_turn(pool: LoadPool, targets: dict[str, Target], plan: Plan) -> Added:
    """(p50 ms, p99 ms, CPU µs, the event loop's CPU µs) per request of limits on
    minus limits off, the two relays asked in turn, request by request, one
    connection to each: whatever else the machine does falls on both alike, which
    back-to-back runs of each cannot promise at this scale. CPU is each relay's own
    over the same run: all its threads, and its event loop's thread alone (what a
    client waits on). Then the ledger's commits in that run, from the relay's own
    metric: requests per commit, and a commit's time in µs per request."""
    off, on = targets["limits off"], targets["limits on"]
    pids = {name: tree_pids(t.server.pid) for name, t in targets.items() if t.server}
    commits = _commits(on)
    before = {name: cpu_seconds(p) for name, p in pids.items()}
    loop_before = {name: cpu_seconds(p, main_thread=True) for name, p in pids.items()}
    p50, p99 = in_turn(pool, off, on, plan)
    cpu = {name: cpu_seconds(p) - before[name] for name, p in pids.items()}
    loop = {name: cpu_seconds(p, main_thread=True) - loop_before[name] for name, p in pids.items()}
    count, seconds = (after - ahead for after, ahead in zip(_commits(on), commits, strict=True))
    each = plan.latency_n + 50  # warm-up included: CPU is read around the whole run
    added_cpu = (cpu["limits on"] - cpu["limits off"]) / each * 1e6
    added_loop = (loop["limits on"] - loop["limits off"]) / each * 1e6
    per_commit = each / count if count else 0.0
    return p50, p99, added_cpu, added_loop, per_commit, seconds / each * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench spend", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, small sizes")
    parser.add_argument(
        "--store",
        choices=("local", "redis"),
        default="local",
        help="redis: the ledger alone, local (SQLite) against redis (its own redis-server "
        "on loopback), instead of the relay runs",
    )
    args = parser.parse_args(argv)
    if args.store == "redis":
        return _store_comparison(500 if args.quick else 5000, 1 if args.quick else args.rounds)
    raise_fd_limit()
    plan = (
        Plan(rounds=1, latency_n=300, throughput_s=1.5) if args.quick else Plan(rounds=args.rounds)
    )
    pairs = 500 if args.quick else 5000
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in TARGETS}
    added: list[Added] = []
    with tempfile.TemporaryDirectory(prefix="relayd-bench-spend-") as name:
        tmp = Path(name)
        servers, targets = _start(tmp)
        pool = LoadPool(1)
        try:
            for round_ in range(plan.rounds):
                order = TARGETS if round_ % 2 == 0 else TARGETS[::-1]
                this: dict[str, dict[str, Any]] = {}
                for target in order:
                    print(f"round {round_ + 1}: {target}", file=sys.stderr, flush=True)
                    server = targets[target].server
                    assert server is not None
                    pids = tree_pids(server.pid)
                    cpu = cpu_seconds(pids)
                    sequential = latency(pool, targets[target], plan)
                    # relayd's own CPU per request: steadier than latency on a busy machine.
                    sequential["cpu_us"] = (cpu_seconds(pids) - cpu) / (plan.latency_n + 100) * 1e6
                    this[target] = {**sequential, **throughput(pool, targets[target], plan)}
                    figures[target].append(this[target])
                print(f"round {round_ + 1}: in turn", file=sys.stderr, flush=True)
                added.append(_in_turn(pool, targets, plan))
        finally:
            pool.close()
            for server in reversed(servers):
                server.stop()
        print("ledger: admit+settle pairs", file=sys.stderr, flush=True)
        one = ledger_rate(tmp, pairs, 1)
        two = ledger_rate(tmp, pairs, 2)
    print(_table(figures, added, plan, one, two))
    return 0


def _table(
    figures: dict[str, list[dict[str, Any]]],
    added: list[Added],
    plan: Plan,
    one: float,
    two: float,
) -> str:
    rows = [
        ("1 conn: latency p50 ms", "lat_p50_ms", 3),
        ("1 conn: latency p99 ms", "lat_p99_ms", 3),
        ("1 conn: relayd CPU per request µs", "cpu_us", 0),
        ("64 conns: small JSON req/s", "rps", 0),
        ("64 conns: p99 ms", "rps_p99_ms", 1),
    ]
    lines = [
        f"medians of {plan.rounds} round(s); limits on: rpm, tpm and usd_per_day on the key",
        "",
        "| | " + " | ".join(TARGETS) + " | on / off |",
        "|---|---:|---:|---:|",
    ]
    for label, key, digits in rows:
        values = {t: median_of([f[key] for f in figures[t]]) for t in TARGETS}
        off, on = values["limits off"], values["limits on"]
        ratio = on / off if on is not None and off else None
        lines.append(f"| {label} | {cell(off, digits)} | {cell(on, digits)} | {cell(ratio)} |")
    p50, p99, cpu, loop, per_commit, commit_us = (
        median_of(list(column)) for column in zip(*added, strict=True)
    )
    lines += [
        "",
        "added at 1 connection (on − off, the two relays asked in turn): latency p50 "
        f"{cell(p50, 3)} ms, p99 {cell(p99, 3)} ms; relayd CPU per request {cell(cpu, 0)} µs, "
        f"of which on the event loop {cell(loop, 0)} µs (goal: ≤ 0.1 ms per request)",
        f"the ledger's commits: {cell(per_commit, 1)} requests per commit, "
        f"{cell(commit_us, 1)} µs per request",
        f"ledger alone: {one:,.0f} admit+settle pairs/s from one process, "
        f"{two:,.0f} from two processes on one file",
    ]
    errors = {t: [f["errors"] for f in figures[t] if f["errors"]] for t in TARGETS}
    lines.append(f"errors: {errors if any(errors.values()) else 'none'}")
    return "\n".join(lines)


def _store_comparison(pairs: int, rounds: int) -> int:
    """``--store redis``: admit+settle pairs through the SQLite ledger and through
    the Redis ledger, interleaved round by round, from one process and from two."""
    from tests.redisserver import RedisServer

    rates: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="relayd-bench-ledger-") as name:
        tmp = Path(name)
        server = RedisServer(tmp / "redis")
        server.start()
        try:
            for round_ in range(rounds):
                stores = ("local", "redis") if round_ % 2 == 0 else ("redis", "local")
                for store in stores:
                    for processes in (1, 2):
                        print(
                            f"round {round_ + 1}: {store}, {processes} process(es)",
                            file=sys.stderr,
                            flush=True,
                        )
                        where = tmp / f"{store}-{round_}"
                        where.mkdir(exist_ok=True)
                        url = server.url if store == "redis" else None
                        rate = ledger_rate(where, pairs, processes, url)
                        rates.setdefault((store, processes), []).append(rate)
                    print(
                        f"round {round_ + 1}: {store}, {LANES} lanes", file=sys.stderr, flush=True
                    )
                    path = where / "ledger-lanes.sqlite3"
                    SqliteLedger.migrate(path)
                    spec = str(path) if store == "local" else f"{server.url}|{where / 'lanes'}"
                    seconds = asyncio.run(_pairs(spec, pairs, 0, LANES))
                    rates.setdefault((store, LANES), []).append(pairs / seconds)
        finally:
            server.stop()
    lines = [
        f"the ledger alone, medians of {rounds} round(s) of {pairs:,} sequential admit+settle "
        "pairs per process (rpm, tpm, max_parallel and two budgets on the key; redis-server "
        "on loopback)",
        "",
        "| | local (SQLite) | redis |",
        "|---|---:|---:|",
    ]
    one = {store: statistics.median(rates[(store, 1)]) for store in ("local", "redis")}
    two = {store: statistics.median(rates[(store, 2)]) for store in ("local", "redis")}
    lines.append(
        "| 1 process: µs per admit+settle | "
        + " | ".join(f"{1e6 / one[store]:,.0f}" for store in ("local", "redis"))
        + " |"
    )
    lines.append(
        "| 1 process: pairs/s | " + " | ".join(f"{one[s]:,.0f}" for s in ("local", "redis")) + " |"
    )
    lines.append(
        "| 2 processes: pairs/s | "
        + " | ".join(f"{two[s]:,.0f}" for s in ("local", "redis"))
        + " |"
    )
    lanes = {store: statistics.median(rates[(store, LANES)]) for store in ("local", "redis")}
    lines.append(
        f"| 1 process, {LANES} at once: pairs/s | "
        + " | ".join(f"{lanes[s]:,.0f}" for s in ("local", "redis"))
        + " |"
    )
    print("\n".join(lines))
    return 0
