"""``python -m bench instructions``: CPU instructions one request costs a proxy.

Time on a shared machine moves by ±10 % between runs; instruction counts do not.
For each mode, one proxy runs under callgrind (``valgrind --tool=callgrind``) in
front of the fake upstream; 100 sequential requests warm it up, then its counters
are zeroed, ``--requests`` more are sent on one connection, and the counters are
dumped. The figure is the main thread's instructions (every thread's, for the
total) divided by the requests counted.

Modes: ``floor`` (bench/floor.py, the plainest aiohttp pass-through), ``warn``
(relayd, spend off, log at warning), ``info`` (relayd, spend off, the access line
at info), ``token`` (spend off, info, OAuth on and the request presented with an
access token instead of the relay key: ``token`` − ``info`` is the bearer-token
check), ``limits`` (spend limits on the key, info), ``every`` (limits and OAuth
on, info: the figure of record). The request is a small JSON ``POST
/v1/responses``; ``--sse`` asks for a stream instead (``--events N`` events).

    python -m bench instructions [--modes every,floor] [--requests 300] [--sse]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench.oauth import access_token
from bench.procs import free_port, start_server
from bench.stack import EVERY_FLOOR_LIMITS, REPO, UPSTREAM_KEY, _relayd_env, fake_argv, floor_argv

__all__ = ["main"]

MODES = ("floor", "warn", "info", "token", "limits", "every")
RELAY_KEY = "bench-instructions-" + "0" * 16
WARMUP = 100


def _proxy(mode: str, tmp: Path, fake_port: int, port: int) -> tuple[list[str], dict[str, str]]:
    """The proxy's argv (without valgrind) and environment for ``mode``."""
    env = _relayd_env(fake_port, port, RELAY_KEY, "warning" if mode == "warn" else "info")
    if mode == "floor":
        upstream = f"http://127.0.0.1:{fake_port}"
        return floor_argv(port, upstream), env
    if mode in ("limits", "every"):
        config = tmp / f"{mode}.toml"
        config.write_text("[spend]\n" + EVERY_FLOOR_LIMITS)
        env["RELAYD_CONFIG"] = str(config)
    else:
        env["RELAYD_SPEND_BACKEND"] = "off"
    if mode in ("token", "every"):
        env["RELAYD_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
    return [sys.executable, "-m", "relayd", "serve"], env


async def _requests(port: int, key: str, count: int, stream: bool) -> None:
    body = {"model": "gpt-5", "input": "hi", **({"stream": True} if stream else {})}
    url = f"http://127.0.0.1:{port}/v1/responses"
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(count):
            async with session.post(
                url, json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")


def _totals(out_dir: Path) -> tuple[int, int]:
    """(main thread, all threads) instructions in the dumps after the zeroing."""
    main = every = 0
    for dump in out_dir.glob("cg.out.*"):  # cg.out.<part>-<thread>: part 1 is the dump
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                count = int(line.split()[1])
                every += count
                if dump.name.endswith("-01"):
                    main += count
                break
    return main, every


def measure(mode: str, requests: int, stream: bool, events: int | None) -> tuple[int, int]:
    with tempfile.TemporaryDirectory(prefix="relayd-bench-instr-") as name:
        tmp = Path(name)
        fake_port, port = free_port(), free_port()
        fake = start_server(
            "fake",
            fake_argv(fake_port, *(("--events", str(events)) if events else ())),
            port=fake_port,
            log=tmp / "fake.log",
            cwd=REPO,
        )
        argv, env = _proxy(mode, tmp, fake_port, port)
        grind = [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            "--dump-instr=no",
            f"--callgrind-out-file={tmp}/cg.out",
        ]
        proxy = start_server(
            mode, [*grind, *argv], port=port, log=tmp / "proxy.log", env=env, cwd=REPO
        )
        try:
            fake.wait_ready()
            proxy.wait_ready(timeout=180)  # a Python start under valgrind is slow
            key = UPSTREAM_KEY if mode == "floor" else RELAY_KEY
            if mode == "token":
                key = asyncio.run(access_token(f"http://127.0.0.1:{port}", RELAY_KEY))
            asyncio.run(_requests(port, key, WARMUP, stream))
            control = ["callgrind_control", "--zero", str(proxy.proc.pid)]
            subprocess.run(control, check=True, capture_output=True, timeout=60)
            asyncio.run(_requests(port, key, requests, stream))
            control[1] = "--dump"
            subprocess.run(control, check=True, capture_output=True, timeout=120)
            main, every = _totals(tmp)
        finally:
            proxy.proc.send_signal(signal.SIGTERM)
            try:
                proxy.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proxy.stop()
            fake.stop()
    return main // requests, every // requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench instructions", description=__doc__)
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--requests", type=int, default=300, help="counted requests (300)")
    parser.add_argument("--sse", action="store_true", help="streamed answers")
    parser.add_argument("--events", type=int, help="events per stream (the fake's default 5)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind not found (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    what = "stream" if args.sse else "request"
    print(f"{'mode':<8} {'main thread':>12} {'all threads':>12}  instructions per {what}")
    results = {}
    for mode in modes:
        main_thread, every = measure(mode, args.requests, args.sse, args.events)
        results[mode] = main_thread
        print(f"{mode:<8} {main_thread:>12,} {every:>12,}", flush=True)
    if "floor" in results:
        for mode, count in results.items():
            if mode != "floor":
                print(f"{mode}: {count / results['floor']:.2f}x the floor")
    return 0
