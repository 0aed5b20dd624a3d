"""``python -m bench fleet``: what the shared Redis store costs (issue 16).

One run, loopback, one fake upstream, one ``redis-server`` (AOF ``everysec``, as
systemd/README.md "Several machines" sets it up), and these targets:

- ``direct``: the fake upstream itself;
- ``nginx``: nginx as a plain reverse proxy in front of the fake (bench.stack);
- ``local``: relayd with ``[store] backend = "local"`` (the SQLite ledger);
- ``redis``: relayd with ``[store] backend = "redis"`` and ``[spend] backend = "store"``;
- ``fleet`` (``--fleet``): nginx round-robin over two relayd on that Redis.

Both relayd run one worker each, with spend limits on: the bench key has ``rpm``,
``tpm`` and a day budget set high enough never to refuse, so every request pays for
one admission and one settlement in its store. Scenarios, interleaved round by round
with the order rotated: sequential small JSON ``POST /v1/responses`` on one
connection (latency p50/p99) and 64 connections for 5 s (req/s). Printed: medians,
the ratios redis / local, and the latency redis adds over local within each round.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.procs import HOST, Server, free_port, start_server
from bench.report import cell, median_of
from bench.scenarios import Plan, latency, throughput
from bench.spend import LIMITS, RELAY_KEY
from bench.stack import (
    REPO,
    UPSTREAM_KEY,
    Target,
    _relayd_env,
    fake_argv,
    find_nginx,
    nginx_main,
)
from bench.workers import LoadPool, raise_fd_limit

__all__ = ["main"]

RELAYD = ("local", "redis")
STORE = {
    "local": '[store]\nbackend = "local"\n',
    "redis": '[store]\nbackend = "redis"\n\n[spend]\nbackend = "store"\n',
}


class _Run:
    """The processes of one run; :meth:`stop` undoes :meth:`spawn`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: list[Server] = []

    def spawn(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None
    ) -> Server:
        log = self.tmp / f"{name}.log"
        server = start_server(name, argv, port=port, log=log, env=env, cwd=REPO)
        self.servers.append(server)
        return server

    def ready(self) -> None:
        for server in self.servers:
            server.wait_ready()

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def _redis(run: _Run) -> str:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    data = run.tmp / "redis"
    data.mkdir()
    argv = [
        binary,
        "--port", str(port),
        "--bind", HOST,
        "--dir", str(data),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--maxmemory", "256mb",
        "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    run.spawn("redis-server", argv, port)
    return f"redis://{HOST}:{port}/0"


def _relayd(run: _Run, name: str, fake_port: int, redis_url: str, secret: Path) -> Target:
    port = free_port()
    config = run.tmp / f"{name}.toml"
    config.write_text(STORE[name.split("-")[0]] + LIMITS)
    env = _relayd_env(fake_port, port, RELAY_KEY, "info")
    state = run.tmp / f"state-{name}"
    state.mkdir()
    env.update(
        RELAYD_CONFIG=str(config),
        RELAYD_STATE_DIR=str(state),
        RELAYD_REDIS_URL=redis_url,
        RELAYD_SIGNING_SECRET_FILE=str(secret),
        RELAYD_PUBLIC_URL=f"http://{HOST}:{port}",
    )
    server = run.spawn(name, [sys.executable, "-m", "relayd", "serve"], port, env)
    auth = {"Authorization": f"Bearer {RELAY_KEY}"}
    return Target(name, f"http://{HOST}:{port}", auth, server)


def _nginx(run: _Run, name: str, upstreams: Sequence[int], headers: dict[str, str]) -> Target:
    binary = find_nginx()
    assert binary is not None
    listen = free_port()
    servers = "\n".join(f"        server {HOST}:{port};" for port in upstreams)
    block = f"""
    upstream {name} {{
{servers}
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{listen} backlog=4096;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}"""
    prefix = run.tmp / name
    (prefix / "nginx-temp").mkdir(parents=True)
    run.tmp.chmod(0o755)  # nginx workers run as nobody when we are root
    prefix.chmod(0o755)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main(prefix, block))
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "nginx-error.log")]
    server = run.spawn(name, argv, listen)
    return Target(name, f"http://{HOST}:{listen}", headers, server)


def _start(run: _Run, fleet: bool) -> dict[str, Target]:
    fake_port = free_port()
    run.spawn("fake", fake_argv(fake_port), fake_port)
    redis_url = _redis(run)
    secret = run.tmp / "signing_secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    upstream_auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    targets = {"direct": Target("direct", f"http://{HOST}:{fake_port}", upstream_auth)}
    has_nginx = find_nginx() is not None
    if has_nginx:
        targets["nginx"] = _nginx(run, "nginx", [fake_port], upstream_auth)
    for name in RELAYD:
        targets[name] = _relayd(run, name, fake_port, redis_url, secret)
    if fleet and has_nginx:
        pair = [_relayd(run, f"redis-{n}", fake_port, redis_url, secret) for n in "ab"]
        ports = [t.server.port for t in pair if t.server is not None]
        targets["fleet"] = _nginx(run, "fleet", ports, pair[0].headers)
    run.ready()
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, small sizes")
    parser.add_argument(
        "--fleet", action="store_true", help="also nginx over two relayd on the one Redis"
    )
    args = parser.parse_args(argv)
    raise_fd_limit()
    plan = (
        Plan(rounds=1, latency_n=300, throughput_s=1.5) if args.quick else Plan(rounds=args.rounds)
    )
    figures: dict[str, list[dict[str, Any]]] = {}
    added: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="relayd-bench-fleet-") as name:
        run = _Run(Path(name))
        pool: LoadPool | None = None
        try:
            targets = _start(run, args.fleet)
            pool = LoadPool(1)
            order = list(targets)
            for round_ in range(plan.rounds):
                shift = round_ % len(order)  # rotate so no target always goes first
                this: dict[str, dict[str, Any]] = {}
                for target in order[shift:] + order[:shift]:
                    print(f"round {round_ + 1}: {target}", file=sys.stderr, flush=True)
                    this[target] = {
                        **latency(pool, targets[target], plan),
                        **throughput(pool, targets[target], plan),
                    }
                    figures.setdefault(target, []).append(this[target])
                on, off = this["redis"], this["local"]
                added.append(
                    (on["lat_p50_ms"] - off["lat_p50_ms"], on["lat_p99_ms"] - off["lat_p99_ms"])
                )
            notes = _log_notes(run)
        finally:
            if pool is not None:
                pool.close()
            run.stop()
    print(_table(figures, added, plan, notes))
    return 0


def _log_notes(run: _Run) -> list[str]:
    """relayd's warnings and errors during the run (a refused request shows here)."""
    notes = []
    for server in run.servers:
        if not server.name.startswith(RELAYD) or server.name == "redis-server":
            continue
        lines = [
            line
            for line in server.log_tail(1_000_000).splitlines()
            if line.split()[1:2] in (["warning"], ["error"], ["critical"])
        ]
        if lines:
            notes.append(f"{server.name}: {len(lines)} warning/error lines; first: {lines[0]}")
    return notes


def _table(
    figures: dict[str, list[dict[str, Any]]],
    added: list[tuple[float, float]],
    plan: Plan,
    notes: list[str],
) -> str:
    names = list(figures)
    rows = [
        ("1 conn: latency p50 ms", "lat_p50_ms", 3),
        ("1 conn: latency p99 ms", "lat_p99_ms", 3),
        (f"{plan.concurrency} conns: small JSON req/s", "rps", 0),
        (f"{plan.concurrency} conns: p99 ms", "rps_p99_ms", 1),
    ]
    lines = [
        f"medians of {plan.rounds} round(s); relayd: 1 worker, spend limits on "
        "(rpm, tpm, usd_per_day on the key)",
        "",
        "| | " + " | ".join(names) + " | redis / local |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for label, key, digits in rows:
        values = {t: median_of([f[key] for f in figures[t]]) for t in names}
        local, redis = values["local"], values["redis"]
        ratio = redis / local if redis is not None and local else None
        cells = " | ".join(cell(values[t], digits) for t in names)
        lines.append(f"| {label} | {cells} | {cell(ratio)} |")
    p50 = median_of([a for a, _ in added])
    p99 = median_of([b for _, b in added])
    lines += [
        "",
        f"added latency at 1 connection (redis − local, same round): p50 {cell(p50, 3)} ms, "
        f"p99 {cell(p99, 3)} ms",
    ]
    errors = {t: [f["errors"] for f in figures[t] if f["errors"]] for t in names}
    lines.append(f"errors: {errors if any(errors.values()) else 'none'}")
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)
