"""The performance issue's goals, checked against a run's combined table.

Each goal is checked for ``relayd`` (info logging, every feature on: the figure of
record, whose verdict leads the line) and for ``relayd-warn``. Goals relative to
nginx need the nginx column; the soak goal comes from the newest ``bench soak``
result, which is a separate command. Where the aiohttp floor (bench/floor.py) was
measured, the line ends with its figure too, as context: it has no verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.scenarios import Plan
from bench.stack import FLOOR

__all__ = ["goal_lines"]

Table = dict[str, dict[str, float | None]]
# A check reads the table for one column: (what was measured, met?), or None if unmeasured.
Check = Callable[[Table, str], "tuple[str, bool] | None"]

RELAYS = ("relayd", "relayd-warn")
GROWTH_MIB = 16.0


def _value(table: Table, key: str, column: str) -> float | None:
    return table.get(key, {}).get(column)


def _ratio(table: Table, key: str, column: str) -> float | None:
    mine, nginx = _value(table, key, column), _value(table, key, "nginx")
    return mine / nginx if mine is not None and nginx else None


def _at_most(key: str, limit: float, unit: str, digits: int = 3) -> Check:
    def check(table: Table, column: str) -> tuple[str, bool] | None:
        value = _value(table, key, column)
        return None if value is None else (f"{value:.{digits}f} {unit}", value <= limit)

    return check


def _vs_nginx(key: str, limit: float, at_least: bool) -> Check:
    def check(table: Table, column: str) -> tuple[str, bool] | None:
        ratio = _ratio(table, key, column)
        if ratio is None:
            return None
        return f"{ratio:.2f}x nginx", ratio >= limit if at_least else ratio <= limit

    return check


def _vs_floor(key: str, limit: float, at_least: bool) -> Check:
    def check(table: Table, column: str) -> tuple[str, bool] | None:
        mine, floor = _value(table, key, column), _value(table, key, FLOOR)
        if mine is None or not floor:
            return None
        ratio = mine / floor
        return f"{ratio:.2f}x floor", ratio >= limit if at_least else ratio <= limit

    return check


def _above_floor(key: str, in_turn: str, margin: float) -> Check:
    """``column``'s ``key`` at most ``margin`` ms above the floor's: by ``in_turn``
    (the two asked in turn) when the run measured it, else by ``key`` in each."""

    def check(table: Table, column: str) -> tuple[str, bool] | None:
        over = _value(table, in_turn, column)
        if over is not None:
            return f"floor {over:+.3f} ms (asked in turn)", over <= margin
        mine, floor = _value(table, key, column), _value(table, key, FLOOR)
        if mine is None or floor is None:
            return None
        return f"floor {mine - floor:+.3f} ms", mine - floor <= margin

    return check


def _both(first: Check, second: Check) -> Check:
    def check(table: Table, column: str) -> tuple[str, bool] | None:
        a, b = first(table, column), second(table, column)
        if a is None or b is None:
            return None
        return f"{a[0]}, {b[0]}", a[1] and b[1]

    return check


def _complete(key: str, expected: int) -> Check:
    def check(table: Table, column: str) -> tuple[str, bool] | None:
        value = _value(table, key, column)
        return None if value is None else (f"{value:.0f}/{expected} complete", value >= expected)

    return check


def _growth(prefix: str) -> Check:
    key = f"{prefix}_rss_growth_mib"

    def check(table: Table, column: str) -> tuple[str, bool] | None:
        value = _value(table, key, column)
        return None if value is None else (f"RSS growth {value:.1f} MiB", value <= GROWTH_MIB)

    return check


def _goals(plan: Plan) -> list[tuple[str, Check]]:
    goals = [
        ("1 conn: added latency p50 ≤ 0.4 ms", _at_most("lat_added_p50_ms", 0.4, "ms")),
        ("1 conn: added latency p99 ≤ 0.8 ms", _at_most("lat_added_p99_ms", 0.8, "ms")),
        (f"{plan.concurrency} conns: req/s ≥ 0.35 × nginx", _vs_nginx("rps", 0.35, True)),
        (
            "SSE burst: first-event p99 ≤ 2 × nginx, 100 % complete",
            _both(
                _vs_nginx("burst_ttfe_p99_ms", 2.0, False),
                _complete("burst_complete", plan.sse_streams),
            ),
        ),
    ]
    if plan.paced:
        goals.append(
            ("SSE 50x20ms: wall time ≤ 1.5 × nginx", _vs_nginx("paced_wall_s", 1.5, False))
        )
    goals += [
        (
            f"upload: MiB/s ≥ 0.75 × nginx, peak RSS growth ≤ {GROWTH_MIB:.0f} MiB",
            _both(_vs_nginx("up_mib_s", 0.75, True), _growth("up")),
        ),
        (
            f"download: MiB/s ≥ 0.8 × nginx, peak RSS growth ≤ {GROWTH_MIB:.0f} MiB",
            _both(_vs_nginx("down_mib_s", 0.8, True), _growth("down")),
        ),
        (
            f"{plan.realtime_sessions} realtime bridges: round trips/s ≥ 0.75 × nginx",
            _vs_nginx("rt_rps", 0.75, True),
        ),
        ("idle RSS ≤ 60 MiB", _at_most("idle_rss_mib", 60.0, "MiB", 1)),
    ]
    return goals


def _floor_goals(plan: Plan) -> list[tuple[str, Check]]:
    """Issue 17: relayd with every floor on (``--every-floor``) against the aiohttp
    floor measured in the same run."""
    return [
        (
            f"{plan.concurrency} conns: req/s ≥ 0.85 × the aiohttp floor",
            _vs_floor("rps", 0.85, True),
        ),
        (
            "1 conn: added latency p50 ≤ floor + 0.15 ms",
            _above_floor("lat_added_p50_ms", "lat_over_floor_p50_ms", 0.15),
        ),
        (
            "1 conn: added latency p99 ≤ floor + 0.3 ms",
            _above_floor("lat_added_p99_ms", "lat_over_floor_p99_ms", 0.3),
        ),
        ("realtime round trips/s ≥ 0.95 × floor", _vs_floor("rt_rps", 0.95, True)),
        ("SSE burst: first-event p99 ≤ 1.1 × floor", _vs_floor("burst_ttfe_p99_ms", 1.1, False)),
        ("SSE 50x20ms: wall time ≤ 1.1 × floor", _vs_floor("paced_wall_s", 1.1, False)),
        (
            f"upload: MiB/s ≥ 0.9 × floor, RSS growth ≤ {GROWTH_MIB:.0f} MiB",
            _both(_vs_floor("up_mib_s", 0.9, True), _growth("up")),
        ),
        (
            f"download: MiB/s ≥ 0.9 × floor, RSS growth ≤ {GROWTH_MIB:.0f} MiB",
            _both(_vs_floor("down_mib_s", 0.9, True), _growth("down")),
        ),
    ]


def _verdict(result: tuple[str, bool] | None) -> str:
    return "n/a" if result is None else ("PASS" if result[1] else "FAIL")


def goal_lines(table: Table, plan: Plan, soak: dict[str, Any] | None) -> list[str]:
    lines = []
    for goal, check in _goals(plan):
        results = {column: check(table, column) for column in RELAYS}
        lead = results["relayd"]
        parts = [
            f"{column} {'not measured' if r is None else r[0]} ({_verdict(r)})"
            for column, r in results.items()
        ]
        floor = check(table, FLOOR)
        if floor is not None:
            parts.append(f"{FLOOR} floor {floor[0]}")
        lines.append(f"{_verdict(lead)}: {goal} — {'; '.join(parts)}")
    for goal, check in _floor_goals(plan):
        results = {column: check(table, column) for column in RELAYS}
        if all(r is None for r in results.values()):
            continue  # not measured in this run (a scenario left out, or no floor)
        parts = [
            f"{column} {'not measured' if r is None else r[0]} ({_verdict(r)})"
            for column, r in results.items()
        ]
        lines.append(f"{_verdict(results['relayd'])}: {goal} — {'; '.join(parts)}")
    if soak is None:
        lines.append("n/a: soak RSS within 10 % — no soak result yet (python -m bench soak)")
    else:
        lines.append(f"{soak['rss_verdict']} (from {soak['name']}, relayd at info)")
    return lines
