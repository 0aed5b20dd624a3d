"""``python -m bench``: relayd against the direct upstream, an aiohttp floor and nginx.

``python -m bench soak`` is the bounded mixed soak against relayd alone (bench.soak).

Starts the fake upstream(s), relayd (info and warning logging), the plain aiohttp
pass-through (bench.floor) and nginx as separate processes on loopback, drives load
from separate worker processes, interleaving the targets round by round, and prints
and saves the medians. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

import relayd
from bench.procs import cpu_seconds, machine_busy_seconds, rss_bytes, tree_pids
from bench.report import Report, add_derived
from bench.scenarios import SCENARIOS, Plan, in_turn
from bench.soak import latest_soak
from bench.soak import main as soak_main
from bench.stack import FLOOR, REPO, Stack, find_nginx
from bench.workers import LoadPool, raise_fd_limit

MiB = 1024 * 1024


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n")[0],
        epilog="python -m bench soak [--minutes N]: the bounded mixed soak (see --help there)",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1 round, small)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 3; quick 1)")
    parser.add_argument("--workers", type=int, default=1, help="load worker processes (1)")
    parser.add_argument(
        "--relayd-workers", default="1", help="RELAYD_WORKERS for relayd: N or auto (1)"
    )
    parser.add_argument("--no-paced", action="store_true", help="skip the paced SSE scenario")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument(
        "--no-floor", action="store_true", help="leave out the aiohttp floor (bench.floor)"
    )
    parser.add_argument(
        "--results", type=Path, default=REPO / "bench" / "results", help="output directory"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    parser.add_argument(
        "--every-floor",
        action="store_true",
        help="relayd with spend limits on its key (SQLite ledger) and OAuth on (a public url)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated scenarios to run (" + ",".join(s for s, _, _ in SCENARIOS) + ")",
    )
    return parser


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _command_output(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout + done.stderr).strip() or "unknown"


def _environment(fd_limit: int) -> dict[str, Any]:
    nginx = find_nginx()
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio"
    dirty = _command_output(["git", "status", "--porcelain", "relayd"]) not in ("", "unknown")
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "commit": _command_output(["git", "rev-parse", "--short", "HEAD"])
        + (" (relayd/ has local changes)" if dirty else ""),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "relayd": relayd.__version__,
        "event loops": f"{loop} (relayd, aiohttp floor, fake, load)",
        "nginx": _command_output([nginx, "-v"]) if nginx else "absent",
        "RLIMIT_NOFILE (load, servers)": fd_limit,
        "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip(),
    }


def _log_notes(stack: Stack) -> list[str]:
    """relayd's and the floor's warnings and errors: a run that provokes them is worth
    a look (the floor logs only aiohttp's "Error handling request" and tracebacks)."""
    notes = []
    for server in stack.relayds() + stack.floors():
        lines = [
            line
            for line in server.log_tail(1_000_000).splitlines()
            if line.startswith(("warning", "error", "critical", "Traceback", "Error handling"))
        ]
        if lines:
            notes.append(
                f"{server.name} logged {len(lines)} warning/error line(s); first: {lines[0][:300]}"
            )
    return notes


def _rss_once(stack: Stack) -> dict[str, dict[str, Any]]:
    figures: dict[str, dict[str, Any]] = {}
    for name, target in stack.targets["default"].items():
        if target.server is not None:
            figures[name] = {"rss_mib": rss_bytes(tree_pids(target.server.pid)) / MiB}
    return figures


def _run_rounds(
    stack: Stack, pool: LoadPool, plan: Plan, notes: list[str], only: set[str] | None
) -> list[Any]:
    rounds = []
    for number in range(plan.rounds):
        round_: dict[str, dict[str, Any]] = {}
        for scenario, profile, measure in SCENARIOS:
            if profile not in stack.targets or (only is not None and scenario not in only):
                continue
            targets = list(stack.targets[profile].values())
            shift = number % len(targets)  # rotate so no target always goes first
            for target in targets[shift:] + targets[:shift]:
                pids = tree_pids(target.server.pid) if target.server else []
                cpu, busy, started = cpu_seconds(pids), machine_busy_seconds(), time.monotonic()
                try:
                    figures = measure(pool, target, plan)
                except (TimeoutError, RuntimeError, OSError) as exc:
                    notes.append(f"round {number + 1} {scenario} {target.name}: {exc}")
                    _say(f"  {scenario:<10} {target.name:<11} FAILED: {exc}")
                    continue
                elapsed = time.monotonic() - started
                if pids:  # the proxy's CPU use over the whole measurement
                    figures[f"{scenario}_cpu_pct"] = (cpu_seconds(pids) - cpu) / elapsed * 100
                # Everyone's: the proxy, the fake upstream and the load share the cores.
                figures[f"{scenario}_machine_pct"] = (machine_busy_seconds() - busy) / elapsed * 100
                errors = figures.pop("errors")
                slot = round_.setdefault(target.name, {"failed": 0})
                slot.update(figures)
                slot["failed"] += sum(errors.values())
                if errors:
                    notes.append(f"round {number + 1} {scenario} {target.name}: {errors}")
                shown = ", ".join(
                    f"{k}={v:.4g}" for k, v in figures.items() if isinstance(v, float | int)
                )
                _say(f"  {scenario:<10} {target.name:<11} {elapsed:5.1f}s  {shown}")
        if only is None or "latency" in only:
            _latency_over_floor(stack, pool, plan, round_, notes, number)
        add_derived(round_)
        rounds.append(round_)
        _say(f"round {number + 1}/{plan.rounds} done")
    return rounds


def _latency_over_floor(
    stack: Stack,
    pool: LoadPool,
    plan: Plan,
    round_: dict[str, dict[str, Any]],
    notes: list[str],
    number: int,
) -> None:
    """Each relayd column's latency over the floor's, the two asked in turn: the
    figure issue 17's latency goals are judged by."""
    targets = stack.targets["default"]
    floor = targets.get(FLOOR)
    if floor is None:
        return
    for name, target in targets.items():
        if not name.startswith("relayd"):
            continue
        try:
            p50, p99 = in_turn(pool, floor, target, plan)
        except (TimeoutError, RuntimeError, OSError) as exc:
            notes.append(f"round {number + 1} latency over the floor {name}: {exc}")
            continue
        figures = {"lat_over_floor_p50_ms": p50, "lat_over_floor_p99_ms": p99}
        round_.setdefault(name, {"failed": 0}).update(figures)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in figures.items())
        _say(f"  {'in turn':<10} {name:<11} {shown}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["soak"]:
        return soak_main(argv[1:])
    if argv[:1] == ["tls"]:
        from bench.tls import main as tls_main

        return tls_main(argv[1:])
    if argv[:1] == ["mcp"]:
        from bench.mcp import main as mcp_main

        return mcp_main(argv[1:])
    if argv[:1] == ["oauth"]:
        from bench.oauth import main as oauth_main

        return oauth_main(argv[1:])
    if argv[:1] == ["spend"]:
        from bench.spend import main as spend_main

        return spend_main(argv[1:])
    if argv[:1] == ["instructions"]:
        from bench.instructions import main as instructions_main

        return instructions_main(argv[1:])
    if argv[:1] == ["fleet"]:
        from bench.fleet import main as fleet_main

        return fleet_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if only is not None and (unknown := only - {s for s, _, _ in SCENARIOS}):
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    paced = not args.no_paced and (only is None or "sse-paced" in only)
    overrides: dict[str, Any] = {"workers": args.workers, "paced": paced}
    if args.rounds:
        overrides["rounds"] = args.rounds
    plan = Plan.quick(**overrides) if args.quick else Plan(**overrides)
    # SIGTERM must reach the finally below, or the servers would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    fd_limit = raise_fd_limit()  # inherited by every server and load worker
    environment = _environment(fd_limit)
    tmp = Path(tempfile.mkdtemp(prefix="relayd-bench-"))
    profiles = ["default", "paced"] if plan.paced else ["default"]
    stack = Stack(
        tmp,
        profiles,
        use_nginx=not args.no_nginx,
        use_floor=not args.no_floor,
        relayd_workers=args.relayd_workers,
        every_floor=args.every_floor,
    )
    environment["relayd workers"] = args.relayd_workers
    environment["relayd floors"] = (
        "every floor: spend limits (rpm, tpm, usd_per_day; SQLite ledger), OAuth, metrics, "
        "access log"
        if args.every_floor
        else "metrics, access log (no spend limits, no OAuth)"
    )
    if only is not None:
        environment["scenarios"] = ",".join(sorted(only))
    pool: LoadPool | None = None
    notes: list[str] = []
    try:
        _say(f"starting servers (logs in {tmp})")
        stack.start()
        if stack.nginx_skipped:
            notes.append(stack.nginx_skipped)
            _say(stack.nginx_skipped)
        pool = LoadPool(plan.workers)
        time.sleep(1.0)  # let the servers settle before the idle reading
        once = {k: {"idle_rss_mib": v["rss_mib"]} for k, v in _rss_once(stack).items()}
        rounds = _run_rounds(stack, pool, plan, notes, only)
        for name, figures in _rss_once(stack).items():
            once[name]["final_rss_mib"] = figures["rss_mib"]
        for server in stack.servers:
            if server.proc.poll() is not None:
                notes.append(f"{server.name} exited during the run ({server.proc.returncode})")
        notes += _log_notes(stack)
        report = Report(plan, environment, rounds, once, notes, latest_soak(args.results))
        print(report.text())
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        md, js = report.write(args.results, stamp)
        _say(f"wrote {md} and {js}")
        return 0
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        if pool is not None:
            pool.close()
        stack.stop()
        if args.keep_logs:
            _say(f"server logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
