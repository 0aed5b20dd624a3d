"""``python -m bench mcp``: what the MCP face costs over the REST call of the same operation.

One run, loopback: the fake upstream and relayd (info logging) as processes of their
own, load from a separate worker process. Each round measures, interleaved:

- ``getRelayInfo``, relayd's own answer (no upstream): REST ``GET
  /v1/actions/relay_info`` against MCP ``tools/call`` of the same tool;
- ``proxyRequest`` of ``GET /v1/models`` (one upstream call): REST ``POST /v1/proxy``
  against MCP ``tools/call``;
- MCP ``tools/list`` (the whole derived list, about 14 KB).

Figures per operation: one connection, sequential (p50/p99 after a warm-up), and 64
connections back to back for a few seconds (req/s). The MCP rows add the difference
to the REST row of the same operation: what the JSON-RPC envelope, the sub-request
and the tool result cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.procs import HOST, Server, free_port, start_server
from bench.scenarios import percentile
from bench.stack import REPO, _relayd_env, fake_argv
from bench.workers import LoadPool, raise_fd_limit

__all__ = ["main"]

RELAY_KEY = "bench-mcp-" + "0" * 22
MCP_HEADERS = {
    "Authorization": f"Bearer {RELAY_KEY}",
    "Accept": "application/json, text/event-stream",
}
REST_HEADERS = {"Authorization": f"Bearer {RELAY_KEY}"}


def _rpc(method: str, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


PROXY_MODELS = {"method": "GET", "path": "/v1/models"}
# (row, method, path, headers, body): each MCP row names the REST row it is set against.
OPERATIONS: tuple[tuple[str, str, str, dict[str, str], bytes | None], ...] = (
    ("getRelayInfo REST", "GET", "/v1/actions/relay_info", REST_HEADERS, None),
    (
        "getRelayInfo MCP",
        "POST",
        "/mcp",
        MCP_HEADERS,
        _rpc("tools/call", {"name": "getRelayInfo", "arguments": {}}),
    ),
    ("proxyRequest REST", "POST", "/v1/proxy", REST_HEADERS, json.dumps(PROXY_MODELS).encode()),
    (
        "proxyRequest MCP",
        "POST",
        "/mcp",
        MCP_HEADERS,
        _rpc("tools/call", {"name": "proxyRequest", "arguments": PROXY_MODELS}),
    ),
    ("tools/list MCP", "POST", "/mcp", MCP_HEADERS, _rpc("tools/list")),
)


def _start(tmp: Path) -> tuple[list[Server], str]:
    servers: list[Server] = []
    fake_port, port = free_port(), free_port()
    fake = start_server(
        "fake",
        fake_argv(fake_port),
        port=fake_port,
        log=tmp / "fake.log",
        cwd=REPO,
    )
    servers.append(fake)
    relayd = start_server(
        "relayd",
        [sys.executable, "-m", "relayd", "serve"],
        port=port,
        log=tmp / "relayd.log",
        env=_relayd_env(fake_port, port, RELAY_KEY, "info"),
        cwd=REPO,
    )
    servers.append(relayd)
    for server in servers:
        server.wait_ready()
    return servers, f"http://{HOST}:{port}"


def _measure(
    pool: LoadPool, base: str, operation: tuple[Any, ...], plan: dict[str, Any]
) -> dict[str, Any]:
    _, method, path, headers, body = operation
    common = {
        "url": base + path,
        "method": method,
        "headers": headers,
        "body": body,
        "timeout": 30.0,
    }
    [sequential] = pool.run(
        [{"kind": "latency", **common, "n": plan["n"], "warmup": 100}], timeout=120
    )
    [crowd] = pool.run(
        [
            {
                "kind": "throughput",
                **common,
                "concurrency": 64,
                "duration": plan["seconds"],
                "warmup_s": 0.5,
            }
        ],
        timeout=60 + plan["seconds"],
    )
    times = sequential["latencies"]
    failed = sum(sequential["errors"].values()) + sum(crowd["errors"].values())
    return {
        "p50_ms": (percentile(times, 50) or 0) * 1000,
        "p99_ms": (percentile(times, 99) or 0) * 1000,
        "rps": len(crowd["latencies"]) / crowd["elapsed"] if crowd["elapsed"] else 0.0,
        "failed": failed,
    }


def _table(medians: dict[str, dict[str, float]]) -> str:
    lines = [
        "| operation | p50 ms (1 conn) | p99 ms | added p50 ms vs REST | req/s (64 conns) "
        "| req/s vs REST |",
        "|---|---|---|---|---|---|",
    ]
    for row, figures in medians.items():
        rest = medians.get(row.replace(" MCP", " REST")) if row.endswith(" MCP") else None
        added = f"{figures['p50_ms'] - rest['p50_ms']:+.3f}" if rest else "—"
        ratio = f"{figures['rps'] / rest['rps']:.2f}x" if rest and rest["rps"] else "—"
        lines.append(
            f"| {row} | {figures['p50_ms']:.3f} | {figures['p99_ms']:.3f} | {added} | "
            f"{figures['rps']:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench mcp", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, 300 requests, 1.5 s")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    plan = (
        {"rounds": 1, "n": 300, "seconds": 1.5}
        if args.quick
        else {"rounds": args.rounds, "n": 2000, "seconds": 5.0}
    )
    raise_fd_limit()
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="relayd-bench-mcp-") as name:
        servers, base = _start(Path(name))
        pool = LoadPool(1)
        try:
            for number in range(int(plan["rounds"])):
                shift = number % len(OPERATIONS)  # rotate so no operation always goes first
                order = OPERATIONS[shift:] + OPERATIONS[:shift]
                figures = {op[0]: _measure(pool, base, op, plan) for op in order}
                rounds.append(figures)
                print(f"round {number + 1}/{plan['rounds']} done", file=sys.stderr, flush=True)
        finally:
            pool.close()
            for server in reversed(servers):
                server.stop()
    medians = {
        op[0]: {
            key: statistics.median(r[op[0]][key] for r in rounds)
            for key in ("p50_ms", "p99_ms", "rps", "failed")
        }
        for op in OPERATIONS
    }
    text = _table(medians)
    failed = sum(int(m["failed"]) for m in medians.values())
    text += f"\n\nmedians of {plan['rounds']} round(s); failed requests: {failed}\n"
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (args.results / f"mcp-{stamp}.md").write_text(text)
    (args.results / f"mcp-{stamp}.json").write_text(
        json.dumps({"plan": plan, "rounds": rounds}, indent=1)
    )
    return 0 if failed == 0 else 1
