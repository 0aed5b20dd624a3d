"""``python -m bench soak``: a bounded mixed soak against relayd alone.

Starts the fake upstream and one relayd (info logging: every feature on), runs the
mixed load of :mod:`bench.soakload` from one worker process, and samples relayd's
RSS, open fds and ESTABLISHED connections to the fake's port every ``--interval``
seconds. Timeline: an *idle* sample; warm-up load until RSS is steady (the last
four samples within 3 %, at least 30 s, at most ``--warmup`` s; Python's heap
takes a minute or two to reach its working set); after 2 s without load the
*start* sample; the soak proper (``--minutes``); then, load stopped, a wait of at
most ``--settle`` seconds for fds and upstream connections to come back to the
idle figures (relayd's upstream pool keeps idle connections for 30 s); the *end*
sample. Verdicts: RSS at the end within 10 % of the start; fds and upstream
connections back at the idle figures; no unexpected answers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.procs import cpu_seconds, fd_count, rss_bytes, upstream_connections
from bench.stack import REPO, Stack
from bench.workers import LoadPool, raise_fd_limit

__all__ = ["latest_soak", "main"]

MiB = 1024 * 1024
RSS_TOLERANCE = 0.10
STEADY_SAMPLES, STEADY_TOLERANCE, MIN_WARMUP_S = 4, 0.03, 30.0
COLUMNS = (
    ("t_s", "t (s)"),
    ("phase", "phase"),
    ("rss_mib", "RSS (MiB)"),
    ("fds", "fds"),
    ("upstream", "upstream conns"),
    ("cpu_pct", "relayd CPU %"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="soak length (5)")
    parser.add_argument("--warmup", type=float, default=180.0, help="max warm-up, s (180)")
    parser.add_argument("--interval", type=float, default=10.0, help="sample period, s (10)")
    parser.add_argument("--settle", type=float, default=60.0, help="max wait after load, s (60)")
    parser.add_argument(
        "--results", type=Path, default=REPO / "bench" / "results", help="output directory"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    parser.add_argument("--lanes", help="only these load lanes, comma-separated (all)")
    return parser


class Sampler:
    """Samples one process every ``interval`` s from a thread; ``sample()`` marks a moment."""

    def __init__(self, pid: int, port: int, interval: float, steady_file: Path) -> None:
        self.pid, self.port, self.interval = pid, port, interval
        self.steady_file = steady_file  # created once RSS is steady during the warm-up
        self.phase = "idle"
        self.rows: list[dict[str, Any]] = []
        self._t0 = self._last_t = time.monotonic()
        self._last_cpu = cpu_seconds([pid])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def read(self) -> dict[str, Any]:
        return {
            "rss_mib": rss_bytes([self.pid]) / MiB,
            "fds": fd_count(self.pid),
            "upstream": upstream_connections(self.pid, self.port),
        }

    def sample(self, phase: str | None = None) -> dict[str, Any]:
        with self._lock:
            now, cpu = time.monotonic(), cpu_seconds([self.pid])
            row = {
                "t_s": round(now - self._t0, 1),
                "phase": phase or self.phase,
                **self.read(),
                "cpu_pct": (cpu - self._last_cpu) / max(now - self._last_t, 1e-6) * 100,
            }
            self._last_t, self._last_cpu = now, cpu
            self.rows.append(row)
            print(
                "  " + "  ".join(f"{k}={_cell(row[k])}" for k, _ in COLUMNS),
                file=sys.stderr,
                flush=True,
            )
            return row

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
            if self.phase == "warm-up" and self._steady():
                self.steady_file.touch()

    def _steady(self) -> bool:
        warm = [row for row in self.rows if row["phase"] == "warm-up"]
        if len(warm) < STEADY_SAMPLES or warm[-1]["t_s"] < MIN_WARMUP_S:
            return False
        last: list[float] = [row["rss_mib"] for row in warm[-STEADY_SAMPLES:]]
        return max(last) - min(last) <= STEADY_TOLERANCE * max(last)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _cell(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _verdicts(
    idle: dict[str, Any],
    start: dict[str, Any],
    end: dict[str, Any],
    unexpected: dict[str, int],
    minutes: float,
    warmup: float,
) -> list[str]:
    change = (end["rss_mib"] - start["rss_mib"]) / start["rss_mib"]
    ok = abs(change) <= RSS_TOLERANCE
    lines = [
        f"{'PASS' if ok else 'FAIL'}: soak RSS within 10 % of the start (after warm-up) — "
        f"start {start['rss_mib']:.1f} MiB, end {end['rss_mib']:.1f} MiB ({change:+.1%}), "
        f"{minutes:g} min soak after a {warmup:.0f} s warm-up"
    ]
    back = end["fds"] <= idle["fds"] and end["upstream"] <= idle["upstream"]
    lines.append(
        f"{'PASS' if back else 'FAIL'}: fds/connections return to baseline — fds "
        f"{idle['fds']} idle, {end['fds']} at the end; upstream connections "
        f"{idle['upstream']} idle, {end['upstream']} at the end (t={end['t_s']:.0f} s)"
    )
    count = sum(unexpected.values())
    lines.append(f"{'PASS' if not count else 'FAIL'}: no unexpected answers ({count})")
    return lines


def _markdown(
    stamp: str,
    rows: list[dict[str, Any]],
    tally: dict[str, int],
    unexpected: dict[str, int],
    verdicts: list[str],
    notes: list[str],
) -> str:
    lines = [
        f"# relayd soak, {stamp}",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    lines += [
        "",
        "## Verdicts",
        "",
        *(f"- {v}" for v in verdicts),
        "",
        "## Load (soak + warm-up)",
        "",
        "| outcome | count |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(tally.items())]
    lines += [f"| UNEXPECTED {k} | {v} |" for k, v in sorted(unexpected.items())]
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def latest_soak(directory: Path) -> dict[str, Any] | None:
    """The newest soak's RSS verdict, for the main run's goals section."""
    found = sorted(directory.glob("soak-*.json"))
    if not found:
        return None
    try:
        document = json.loads(found[-1].read_text())
        return {"name": found[-1].name, "rss_verdict": document["verdicts"][0]}
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _merge(answers: list[dict[str, Any]], key: str) -> dict[str, int]:
    merged: dict[str, int] = {}
    for answer in answers:
        for name, count in answer[key].items():
            merged[name] = merged.get(name, 0) + count
    return merged


def _log_notes(log: str) -> list[str]:
    lines = [
        line
        for line in log.splitlines()
        if line.startswith(("warning", "error", "critical", "Traceback"))
    ]
    kinds = sorted({line.split(" request_id")[0][:160] for line in lines})
    return [f"relayd logged {len(lines)} warning/error line(s); distinct: {kinds[:8]}"]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="relayd-soak-"))
    stack = Stack(tmp, ["soak"], use_nginx=False, levels={"relayd": "info"})
    pool: LoadPool | None = None
    try:
        print(f"starting servers (logs in {tmp})", file=sys.stderr, flush=True)
        stack.start()
        target, fake = stack.targets["soak"]["relayd"], stack.fakes["soak"]
        assert target.server is not None
        pool = LoadPool(1)
        time.sleep(1.0)
        steady = tmp / "warm-up-steady"
        job = {
            "kind": "soak",
            "base": target.base_url,
            "headers": target.headers,
            "lanes": args.lanes.split(",") if args.lanes else None,
        }
        answers = []
        with Sampler(target.server.pid, fake.port, args.interval, steady) as sampler:
            idle = sampler.sample("idle")
            sampler.phase = "warm-up"
            answers += pool.run(
                [{**job, "duration": args.warmup, "stop_file": str(steady)}],
                timeout=args.warmup + 300,
            )
            time.sleep(2.0)
            start = sampler.sample("start")
            warmup = start["t_s"] - 2.0 - idle["t_s"]
            sampler.phase = "soak"
            seconds = args.minutes * 60
            answers += pool.run([{**job, "duration": seconds}], timeout=seconds + 300)
            sampler.phase = "settle"
            time.sleep(2.0)
            deadline = time.monotonic() + args.settle
            while time.monotonic() < deadline:
                now = sampler.read()
                if now["fds"] <= idle["fds"] and now["upstream"] <= idle["upstream"]:
                    break
                time.sleep(1.0)
            end = sampler.sample("end")
        rows = sampler.rows
        tally, unexpected = _merge(answers, "tally"), _merge(answers, "unexpected")
        verdicts = _verdicts(idle, start, end, unexpected, args.minutes, warmup)
        notes = _log_notes(target.server.log_tail(10_000_000))
        if target.server.proc.poll() is not None:
            notes.append(f"relayd exited during the soak ({target.server.proc.returncode})")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        text = _markdown(stamp, rows, tally, unexpected, verdicts, notes)
        print(text)
        args.results.mkdir(parents=True, exist_ok=True)
        md, js = args.results / f"soak-{stamp}.md", args.results / f"soak-{stamp}.json"
        md.write_text(text)
        document = {
            "minutes": args.minutes,
            "warmup_s": warmup,
            "samples": rows,
            "tally": tally,
            "unexpected": unexpected,
            "verdicts": verdicts,
            "notes": notes,
        }
        js.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {md} and {js}", file=sys.stderr)
        return 0 if all(v.startswith("PASS") for v in verdicts) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if pool is not None:
            pool.close()
        stack.stop()
        if args.keep_logs:
            print(f"server logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
