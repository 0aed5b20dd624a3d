"""From per-round figures to the table: medians, ratios, goals, Markdown and JSON."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.goals import goal_lines
from bench.scenarios import Plan
from bench.stack import FLOOR

__all__ = ["COLUMNS", "RATIOS", "Figure", "Report", "add_derived", "figures_for"]

# "aiohttp" is bench/floor.py, the plainest aiohttp pass-through: context, not a goal.
COLUMNS = ("direct", "relayd", "relayd-warn", FLOOR, "nginx")
RATIOS = ("direct", FLOOR, "nginx")  # relayd (info) over each of these
HEADER = ["figure", *COLUMNS, *(f"relayd/{base}" for base in RATIOS)]

Rounds = list[dict[str, dict[str, Any]]]  # round -> target -> figure key -> value


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    combine: str = "median"  # across rounds: median, or the worst round (min/max)
    ratio: bool = True
    digits: int = 1


def figures_for(plan: Plan) -> list[Figure]:
    conns, streams, paced = plan.concurrency, plan.sse_streams, plan.paced_streams
    down, up = _size(plan.download_bytes), _size(plan.upload_bytes)
    rt = plan.realtime_sessions
    figures = [
        Figure("idle_rss_mib", "idle RSS after start (MiB)"),
        Figure("lat_p50_ms", "1 conn: latency p50 (ms)", digits=3),
        Figure("lat_p99_ms", "1 conn: latency p99 (ms)", digits=3),
        Figure("lat_added_p50_ms", "1 conn: added latency p50 vs direct (ms)", "median", False, 3),
        Figure("lat_added_p99_ms", "1 conn: added latency p99 vs direct (ms)", "median", False, 3),
        Figure(
            "lat_over_floor_p50_ms", "1 conn: over the floor p50, in turn (ms)", "median", False, 3
        ),
        Figure(
            "lat_over_floor_p99_ms", "1 conn: over the floor p99, in turn (ms)", "median", False, 3
        ),
        Figure("rps", f"{conns} conns: req/s", digits=0),
        Figure("rps_p50_ms", f"{conns} conns: latency p50 (ms)", digits=2),
        Figure("rps_p99_ms", f"{conns} conns: latency p99 (ms)", digits=2),
        Figure("throughput_cpu_pct", f"{conns} conns: proxy CPU (% of one core)", digits=0),
        Figure("throughput_machine_pct", f"{conns} conns: machine CPU (% of one core)", digits=0),
        Figure("rps_proxy_us", f"{conns} conns: proxy CPU per request (µs)", digits=0),
        Figure("rps_rest_us", f"{conns} conns: rest of the machine per request (µs)", digits=0),
        Figure("rps_ceiling", f"{conns} conns: machine's req/s ceiling, all cores", digits=0),
        Figure("burst_ttfe_p50_ms", f"{streams} SSE burst: first event p50 (ms)"),
        Figure("burst_ttfe_p99_ms", f"{streams} SSE burst: first event p99 (ms)"),
        Figure("burst_complete", f"{streams} SSE burst: complete streams (worst)", "min", False, 0),
        Figure("burst_wall_s", f"{streams} SSE burst: wall time (s)", digits=2),
        Figure(
            "burst_overflows", f"{streams} SSE burst: accept-queue drops (worst)", "max", False, 0
        ),
    ]
    if plan.paced:
        figures += [
            Figure("paced_ttfe_p50_ms", f"{paced} SSE 50x20ms: first event p50 (ms)"),
            Figure("paced_ttfe_p99_ms", f"{paced} SSE 50x20ms: first event p99 (ms)"),
            Figure("paced_complete", f"{paced} SSE 50x20ms: complete (worst)", "min", False, 0),
            Figure("paced_wall_s", f"{paced} SSE 50x20ms: wall time (s)", digits=2),
            Figure(
                "paced_overflows",
                f"{paced} SSE 50x20ms: accept-queue drops (worst)",
                "max",
                False,
                0,
            ),
        ]
    figures += [
        Figure("down_mib_s", f"{down} download (MiB/s)", digits=0),
        Figure("down_peak_rss_mib", f"{down} download: peak RSS (MiB, worst)", "max"),
        Figure("down_rss_growth_mib", f"{down} download: RSS growth (MiB, worst)", "max"),
        Figure("download_cpu_pct", f"{down} download: proxy CPU (% of one core)", digits=0),
        Figure("up_mib_s", f"{up} multipart upload (MiB/s)", digits=0),
        Figure("up_peak_rss_mib", f"{up} upload: peak RSS (MiB, worst)", "max"),
        Figure("up_rss_growth_mib", f"{up} upload: RSS growth (MiB, worst)", "max"),
        Figure("upload_cpu_pct", f"{up} upload: proxy CPU (% of one core)", digits=0),
        Figure("rt_rps", f"{rt} realtime bridges: round trips/s", digits=0),
        Figure("rt_p50_ms", f"{rt} realtime: round trip p50 (ms)", digits=2),
        Figure("rt_p99_ms", f"{rt} realtime: round trip p99 (ms)", digits=2),
        Figure("realtime_cpu_pct", f"{rt} realtime: proxy CPU (% of one core)", digits=0),
        Figure("rt_cpu_us", f"{rt} realtime: proxy CPU per round trip (µs)"),
        Figure(
            "rt_rss_per_session_kib", f"{rt} realtime: RSS per open session (KiB, worst)", "max"
        ),
        Figure("rt_sessions", f"{rt} realtime: sessions open (worst)", "min", False, 0),
        Figure("final_rss_mib", "RSS after the run (MiB)"),
        Figure("failed", "failed requests, all rounds", "sum", False, 0),
    ]
    return figures


def _size(n: int) -> str:
    return f"{n // 1024**3} GiB" if n % 1024**3 == 0 else f"{n // 1024**2} MiB"


_COMBINE: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "min": min,
    "max": max,
    "sum": sum,
}


def add_derived(round_: dict[str, dict[str, Any]]) -> None:
    """Added latency is computed within a round, against that round's direct run;
    CPU per realtime round trip from that scenario's CPU share and rate."""
    direct = round_.get("direct", {})
    for name, figures in round_.items():
        if name == "direct":
            continue
        cpu, rate = figures.get("realtime_cpu_pct"), figures.get("rt_rps")
        if cpu is not None and rate:
            figures["rt_cpu_us"] = cpu / 100 / rate * 1e6
        _add_ceiling(figures)
        for pct in ("p50", "p99"):
            mine, base = figures.get(f"lat_{pct}_ms"), direct.get(f"lat_{pct}_ms")
            if mine is not None and base is not None:
                figures[f"lat_added_{pct}_ms"] = mine - base


def _add_ceiling(figures: dict[str, Any]) -> None:
    """What one small request costs the machine, split into the proxy's share and
    everyone else's (the fake upstream, the load, the kernel's softirqs), and the
    req/s all cores could give if the proxy had as many workers as it wanted: the
    bound any ``--workers`` figure on this machine is measured against."""
    proxy, machine, rate = (
        figures.get("throughput_cpu_pct"),
        figures.get("throughput_machine_pct"),
        figures.get("rps"),
    )
    if proxy is None or machine is None or not rate:
        return
    figures["rps_proxy_us"] = proxy / 100 / rate * 1e6
    figures["rps_rest_us"] = max(0.0, machine - proxy) / 100 / rate * 1e6
    per_request = figures["rps_proxy_us"] + figures["rps_rest_us"]
    figures["rps_ceiling"] = (os.cpu_count() or 1) * 1e6 / per_request


@dataclass
class Report:
    plan: Plan
    environment: dict[str, Any]
    rounds: Rounds
    once: dict[str, dict[str, Any]]  # target -> figures measured once (idle, final RSS)
    notes: list[str]
    soak: dict[str, Any] | None = None  # the newest soak's summary (bench.soak)

    def combined(self) -> dict[str, dict[str, float | None]]:
        table: dict[str, dict[str, float | None]] = {}
        for figure in figures_for(self.plan):
            row: dict[str, float | None] = {}
            for column in COLUMNS:
                values = [
                    r[column][figure.key]
                    for r in self.rounds
                    if r.get(column, {}).get(figure.key) is not None
                ]
                single = self.once.get(column, {}).get(figure.key)
                if single is not None:
                    values = [single]
                row[column] = _COMBINE[figure.combine](values) if values else None
            table[figure.key] = row
        return table

    def rows(self) -> list[list[str]]:
        table = self.combined()
        rows = []
        for figure in figures_for(self.plan):
            row = table[figure.key]
            cells = [figure.label] + [_fmt(row[c], figure.digits) for c in COLUMNS]
            relayd = row["relayd"]
            for base in RATIOS:
                other = row[base]
                ok = figure.ratio and relayd is not None and other
                cells.append(f"{relayd / other:.2f}x" if ok else "—")  # type: ignore[operator]
            rows.append(cells)
        return rows

    def goals(self) -> list[str]:
        return goal_lines(self.combined(), self.plan, self.soak)

    def text(self) -> str:
        rows = [HEADER, *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
        lines = []
        for index, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells))
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join([*lines, "", *self.goals(), *self.notes])

    def markdown(self) -> str:
        lines = [
            f"# relayd benchmark, {self.environment['started']}",
            "",
            f"Medians of {self.plan.rounds} round(s) unless the figure says worst or sum. "
            "`relayd` logs at info (every feature on), `relayd-warn` at warning; "
            f"`{FLOOR}` is the plainest aiohttp pass-through on uvloop (bench/floor.py), "
            "the floor a Python relay on aiohttp cannot go below.",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|" + "---|" * len(HEADER),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        lines += ["", "## Goals", "", *(f"- {g}" for g in self.goals())]
        if self.notes:
            lines += ["", "## Notes", "", *(f"- {n}" for n in self.notes)]
        lines += ["", "## Environment", ""]
        lines += [f"- {key}: {value}" for key, value in self.environment.items()]
        lines += [f"- plan: {asdict(self.plan)}"]
        return "\n".join(lines) + "\n"

    def write(self, directory: Path, stamp: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        md, js = directory / f"{stamp}.md", directory / f"{stamp}.json"
        md.write_text(self.markdown())
        document = {
            "plan": asdict(self.plan),
            "environment": self.environment,
            "table": self.combined(),
            "labels": {f.key: f.label for f in figures_for(self.plan)},
            "goals": self.goals(),
            "notes": self.notes,
            "rounds": self.rounds,
            "once": self.once,
        }
        js.write_text(json.dumps(document, indent=2, default=str) + "\n")
        return md, js


def _fmt(value: float | None, digits: int) -> str:
    return cell(value, digits)


def cell(value: float | None, digits: int = 2) -> str:
    """A table cell: thousands separated, or — for a figure that is missing."""
    return "—" if value is None else f"{value:,.{digits}f}"


def median_of(values: Sequence[Any]) -> float | None:
    """The median of the figures present (None: none is)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
