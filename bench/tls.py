"""``python -m bench tls``: relayd's own TLS against nginx terminating TLS (issue 13).

One run, loopback, a throwaway CA's certificate (trustme) for every TLS listener:

- ``relayd-tls``: relayd serving https itself (RELAYD_TLS_CERT_FILE/KEY_FILE);
- ``nginx-tls``: nginx terminating TLS and proxying to the fake upstream, the
  ceiling of a TLS front (no relay features);
- ``nginx-tls+relayd``: nginx terminating TLS in front of relayd on plain http,
  the deployment relayd's own TLS replaces;
- ``relayd`` on plain http, for what TLS costs relayd.

Scenarios: 64 connections posting small JSON for 5 s (req/s), and 1,000 SSE
streams opened at once (wall time, time to first event). The load clients do TLS
without verifying the certificate: the run measures TLS, not trust.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.procs import HOST, Server, free_port, start_server
from bench.report import cell, median_of
from bench.scenarios import Plan, sse_burst, throughput
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

TARGETS = ("relayd-tls", "nginx-tls", "nginx-tls+relayd", "relayd")


def _nginx_conf(tmp: Path, cert: Path, key: Path, pairs: Sequence[tuple[int, int]]) -> str:
    """TLS-terminating streaming proxies, one server per (listen, upstream) pair."""
    blocks = "".join(
        f"""
    upstream up{index} {{ server {HOST}:{upstream}; keepalive 256; }}
    server {{
        listen {HOST}:{listen} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://up{index};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}"""
        for index, (listen, upstream) in enumerate(pairs)
    )
    return nginx_main(tmp, blocks)


def _start(tmp: Path, nginx: str) -> tuple[list[Server], dict[str, Target]]:
    import trustme  # a test dependency; bench/ runs from a checkout with .[test]

    ca = trustme.CA()
    issued = ca.issue_cert(HOST)
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    relay_key = "bench-tls-" + "0" * 22
    relay_auth = {"Authorization": f"Bearer {relay_key}"}
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
    targets: dict[str, Target] = {}
    plain_port, tls_port = free_port(), free_port()
    plain = spawn(
        "relayd",
        [sys.executable, "-m", "relayd", "serve"],
        plain_port,
        _relayd_env(fake_port, plain_port, relay_key, "info"),
    )
    targets["relayd"] = Target("relayd", f"http://{HOST}:{plain_port}", relay_auth, plain)
    env = _relayd_env(fake_port, tls_port, relay_key, "info")
    env.update(RELAYD_TLS_CERT_FILE=str(cert), RELAYD_TLS_KEY_FILE=str(key))
    own = spawn("relayd-tls", [sys.executable, "-m", "relayd", "serve"], tls_port, env)
    targets["relayd-tls"] = Target("relayd-tls", f"https://{HOST}:{tls_port}", relay_auth, own)
    to_fake, to_relayd = free_port(), free_port()
    tmp.chmod(0o755)  # nginx workers run as nobody
    key.chmod(0o644)  # read by nginx's master as root; a throwaway key
    (tmp / "nginx-temp").mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(_nginx_conf(tmp, cert, key, [(to_fake, fake_port), (to_relayd, plain_port)]))
    front = spawn("nginx", [nginx, "-p", str(tmp), "-c", str(conf)], to_fake)
    upstream_auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    targets["nginx-tls"] = Target("nginx-tls", f"https://{HOST}:{to_fake}", upstream_auth, front)
    targets["nginx-tls+relayd"] = Target(
        "nginx-tls+relayd", f"https://{HOST}:{to_relayd}", relay_auth, front
    )
    for server in servers:
        server.wait_ready()
    return servers, targets


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    return None if mine is None or not theirs else mine / theirs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench tls", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s, 200 streams")
    args = parser.parse_args(argv)
    nginx = find_nginx()
    if nginx is None:
        print("nginx not found (apt-get install -y nginx-light)", file=sys.stderr)
        return 1
    raise_fd_limit()
    plan = (
        Plan(rounds=1, throughput_s=2.0, sse_streams=200)
        if args.quick
        else Plan(rounds=args.rounds)
    )
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in TARGETS}
    with tempfile.TemporaryDirectory(prefix="relayd-bench-tls-") as name:
        servers, targets = _start(Path(name), nginx)
        pool = LoadPool(1)
        try:
            for round_ in range(plan.rounds):
                order = TARGETS[round_ % len(TARGETS) :] + TARGETS[: round_ % len(TARGETS)]
                for target in order:
                    print(f"round {round_ + 1}: {target}", file=sys.stderr, flush=True)
                    rps = throughput(pool, targets[target], plan)
                    burst = sse_burst(pool, targets[target], plan)
                    figures[target].append({**rps, **burst})
        finally:
            pool.close()
            for server in reversed(servers):
                server.stop()
    print(_table(figures, plan))
    return 0


def _table(figures: dict[str, list[dict[str, Any]]], plan: Plan) -> str:
    rows = [
        ("small JSON req/s (64 conns)", "rps", 0),
        ("  p99 ms", "rps_p99_ms", 1),
        (f"{plan.sse_streams} SSE streams: wall s", "burst_wall_s", 2),
        ("  first event p50 ms", "burst_ttfe_p50_ms", 1),
        ("  first event p99 ms", "burst_ttfe_p99_ms", 1),
        ("  complete (worst)", "burst_complete", 0),
    ]
    lines = [
        f"medians of {plan.rounds} round(s); ratio = relayd-tls / nginx-tls and "
        "relayd-tls / nginx-tls+relayd",
        "",
        "| | " + " | ".join(TARGETS) + " | ratio to nginx-tls | ratio to nginx-tls+relayd |",
        "|---|" + "---:|" * (len(TARGETS) + 2),
    ]
    for label, key, digits in rows:
        pick = min if key == "burst_complete" else median_of
        values: dict[str, float | None] = {t: pick([f[key] for f in figures[t]]) for t in TARGETS}
        ratios = [_ratio(values["relayd-tls"], values[other]) for other in TARGETS[1:3]]
        cells = [cell(values[t], digits) for t in TARGETS] + [cell(r, 2) for r in ratios]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = {t: [f["errors"] for f in figures[t] if f["errors"]] for t in TARGETS}
    lines += ["", f"errors: {errors if any(errors.values()) else 'none'}"]
    return "\n".join(lines)
