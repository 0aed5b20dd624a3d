"""``relayd usage`` and ``relayd prices check``: who spent what, on which model, when.

The ledger's events are summed by SQL (relayd/store/usage_rows.py) per key, model,
outcome and refusal reason, and per calendar day in the ``[spend]`` time zone when
a day is asked for; with ``[store] backend = "redis"`` the same sums come from the
daily aggregates every instance shares (relayd/store/usage_redis.py). This module
groups those sums the way the reader asked and renders them as a table, JSON (a
list of rows, each with its grouping fields and numbers), CSV or the HTML page
(relayd/spend/usage_page.py).

A window is ``--since`` (inclusive) to ``--until``: a date ``YYYY-MM-DD`` means that
whole day in the report's time zone (``--until 2026-11-30`` includes November 30),
an ISO date and time means that instant (in the time zone unless it names an offset).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Any, Final, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from relayd.config import ConfigError, Settings
from relayd.spend.budget import budget_status
from relayd.spend.prices import PriceBook
from relayd.store.usage_rows import DaySpan, LedgerUnreadableError, UsageCell
from relayd.store.usage_source import UsageSource, usage_source

__all__ = [
    "FORMATS",
    "GROUPINGS",
    "ReportRow",
    "UsageArgumentError",
    "Window",
    "day_spans",
    "group_rows",
    "prices_check",
    "render",
    "usage",
]

GROUPINGS: Final = ("key", "model", "day")
FORMATS: Final = ("table", "json", "csv")
# The ledger's refusal codes (SPEND.md), in the order the columns show them.
REFUSAL_REASONS: Final = (
    "rate_limit_exceeded",
    "insufficient_quota",
    "model_not_allowed",
    "model_not_priced",
    "store_unavailable",
)
COUNTERS: Final = (
    "requests",
    "refused",
    "failed",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "audio_input_tokens",
    "audio_output_tokens",
    "micro_usd",
    "estimated",
    "unpriced",
)
# A report by day over more days than this is a mistake (no --since on an old ledger).
MAX_DAYS: Final = 3700
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


class UsageArgumentError(ValueError):
    """A ``--since``/``--until``/``--by`` the report cannot use; exit 2."""


@dataclass(frozen=True, slots=True)
class Window:
    since: float | None
    until: float | None
    zone: tzinfo
    zone_name: str

    def describe(self) -> str:
        """ "all events", "from <since>", "before <until>" or both, in the zone."""

        def moment(value: float) -> str:
            return datetime.fromtimestamp(value, self.zone).isoformat(timespec="seconds")

        parts = []
        if self.since is not None:
            parts.append(f"from {moment(self.since)}")
        if self.until is not None:
            parts.append(f"before {moment(self.until)}")
        return ", ".join(parts) or "all events"


@dataclass(slots=True)
class ReportRow:
    """One group: its grouping values and its counters."""

    group: dict[str, str]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    refusals: dict[str, int] = field(default_factory=dict)
    budgets: list[dict[str, Any]] = field(default_factory=list)

    def add(self, cell: UsageCell, book: PriceBook) -> None:
        counts = self.counts
        counts["requests"] += cell.events
        if cell.outcome == "refused":
            counts["refused"] += cell.events
            self.refusals[cell.reason] = self.refusals.get(cell.reason, 0) + cell.events
        elif cell.outcome != "ok":
            counts["failed"] += cell.events
        if cell.outcome != "refused" and cell.model and not book.knows(cell.model):
            counts["unpriced"] += cell.events
        counts["estimated"] += cell.estimated
        for name in COUNTERS[3:10]:
            counts[name] += getattr(cell, name)


def zone_of(settings: Settings) -> tuple[tzinfo, str]:
    """The ``[spend]`` time zone, the one budgets' calendar days are counted in."""
    name = settings.spend.timezone
    try:
        return ZoneInfo(name), name
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"[spend] timezone {name!r} is not a time zone name") from None


def parse_moment(text: str, zone: tzinfo, *, until: bool, flag: str) -> float:
    """``text`` as unix seconds; a bare date ``until`` means the end of that day."""
    text = text.strip()
    try:
        if _DATE.fullmatch(text):
            day = date.fromisoformat(text) + timedelta(days=1 if until else 0)
            return datetime.combine(day, time(), zone).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageArgumentError(
            f"{flag} {text!r} is neither a date (2026-11-30) nor an ISO date and time "
            "(2026-11-30T14:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.timestamp()


def day_spans(first: float, last: float, zone: tzinfo) -> list[DaySpan]:
    """Every calendar day from the one holding ``first`` to the one holding ``last``."""
    day = datetime.fromtimestamp(first, zone).date()
    end = datetime.fromtimestamp(last, zone).date()
    if (end - day).days >= MAX_DAYS:
        raise UsageArgumentError(
            f"the window spans {(end - day).days + 1} days; narrow it with --since/--until"
        )
    spans = []
    while day <= end:
        following = day + timedelta(days=1)
        spans.append(
            DaySpan(
                day.isoformat(),
                datetime.combine(day, time(), zone).timestamp(),
                datetime.combine(following, time(), zone).timestamp(),
            )
        )
        day = following
    return spans


def group_rows(cells: Iterable[UsageCell], by: Sequence[str], book: PriceBook) -> list[ReportRow]:
    """The cells summed per distinct value of the ``by`` fields, sorted by them."""
    rows: dict[tuple[str, ...], ReportRow] = {}
    for cell in cells:
        values = tuple(getattr(cell, name) for name in by)
        row = rows.get(values)
        if row is None:
            row = rows[values] = ReportRow(dict(zip(by, values, strict=True)))
        row.add(cell, book)
    return [rows[values] for values in sorted(rows)]


def total_row(rows: Iterable[ReportRow], by: Sequence[str]) -> ReportRow:
    total = ReportRow(dict.fromkeys(by, ""))
    for row in rows:
        for name, value in row.counts.items():
            total.counts[name] += value
        for reason, value in row.refusals.items():
            total.refusals[reason] = total.refusals.get(reason, 0) + value
    return total


def usd(micro: int, places: int = 6) -> str:
    """Micro-dollars as exact decimal dollars (rounded half up to ``places``)."""
    step = 10 ** (6 - places)
    rounded = (micro + step // 2) // step
    whole, part = divmod(rounded, 10**places)
    return f"{whole}.{part:0{places}d}" if places else str(whole)


def render(rows: Sequence[ReportRow], by: Sequence[str], fmt: str, window: Window) -> str:
    if fmt == "json":
        return _json(rows, by)
    if fmt == "csv":
        return _csv(rows, by)
    return _table(rows, by, window)


def _reasons(rows: Iterable[ReportRow]) -> list[str]:
    seen = {reason for row in rows for reason in row.refusals}
    return [*(r for r in REFUSAL_REASONS if r in seen), *sorted(seen - set(REFUSAL_REASONS))]


def _json(rows: Sequence[ReportRow], by: Sequence[str]) -> str:
    out = []
    for row in rows:
        item: dict[str, Any] = dict(row.group)
        item.update(row.counts)
        item["usd"] = float(usd(row.counts["micro_usd"]))
        item["refusals"] = dict(sorted(row.refusals.items()))
        if "key" in by:
            item["budgets"] = row.budgets
        out.append(item)
    return json.dumps(out, indent=2) + "\n"


def _csv(rows: Sequence[ReportRow], by: Sequence[str]) -> str:
    reasons = [*REFUSAL_REASONS, *(r for r in _reasons(rows) if r not in REFUSAL_REASONS)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*by, *COUNTERS, "usd", *(f"refused_{reason}" for reason in reasons)])
    for row in rows:
        writer.writerow(
            [
                *(row.group[name] for name in by),
                *(row.counts[name] for name in COUNTERS),
                usd(row.counts["micro_usd"]),
                *(row.refusals.get(reason, 0) for reason in reasons),
            ]
        )
    return buffer.getvalue()


_TABLE_COLUMNS: Final = (
    ("requests", "requests"),
    ("refused", "refused"),
    ("failed", "failed"),
    ("input_tokens", "input"),
    ("cached_input_tokens", "cached"),
    ("output_tokens", "output"),
    ("reasoning_tokens", "reasoning"),
    ("audio_input_tokens", "audio in"),
    ("audio_output_tokens", "audio out"),
)
_ALWAYS: Final = frozenset(("requests", "refused", "input_tokens", "cached_input_tokens"))
_ALWAYS_TOO: Final = frozenset(("output_tokens", "reasoning_tokens"))


def _table(rows: Sequence[ReportRow], by: Sequence[str], window: Window) -> str:
    head = f"relayd usage, {window.describe()} ({window.zone_name})\n"
    if not rows:
        return head + "no usage in this window\n"
    total = total_row(rows, by)
    shown = [
        (name, title)
        for name, title in _TABLE_COLUMNS
        if name in _ALWAYS or name in _ALWAYS_TOO or total.counts[name]
    ]
    reasons = _reasons(rows)
    titles = [*by, *(t for _, t in shown), *reasons, "usd", "estimated"]
    if total.counts["unpriced"]:
        titles.append("unpriced")

    def cells(row: ReportRow, label: Sequence[str]) -> list[str]:
        values = [
            *label,
            *(f"{row.counts[name]:,}" for name, _ in shown),
            *(f"{row.refusals.get(reason, 0):,}" for reason in reasons),
            "$" + usd(row.counts["micro_usd"], 4),
            f"{row.counts['estimated']:,}",
        ]
        if total.counts["unpriced"]:
            values.append(f"{row.counts['unpriced']:,}")
        return values

    lines = [cells(row, [row.group[name] for name in by]) for row in rows]
    lines.append(cells(total, ["total", *[""] * (len(by) - 1)]))
    widths = [max(len(line[i]) for line in [titles, *lines]) for i in range(len(titles))]

    def joined(values: Sequence[str]) -> str:
        parts = [
            value.ljust(width) if i < len(by) else value.rjust(width)
            for i, (value, width) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [head, joined(titles), joined(["-" * w for w in widths])]
    out.extend(joined(line) for line in lines[:-1])
    out.append(joined(["-" * w for w in widths]))
    out.append(joined(lines[-1]))
    budgets = [(row.group["key"], line) for row in rows if "key" in by for line in row.budgets]
    if budgets:
        out.append("\nbudgets")
        for key, line in budgets:
            resets = line["resets_at"] or "never"
            out.append(
                f"  {key}: {line['limit']} ${usd(line['limit_micro_usd'], 4)}, "
                f"spent ${usd(line['spent_micro_usd'], 4)}, "
                f"left ${usd(line['left_micro_usd'], 4)}, resets {resets}"
            )
    if total.counts["unpriced"]:
        out.append(
            f"\n{total.counts['unpriced']:,} request(s) on models without a price count $0: "
            "dollars are a floor (relayd prices check lists the models)"
        )
    return "\n".join(out) + "\n"


def budget_lines(
    settings: Settings,
    key_names: Iterable[str],
    now: float,
    zone: tzinfo,
    source: UsageSource | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Each key's budgets at ``now``: limit, spent, left and reset (in ``zone``)."""
    source = source or usage_source(settings)
    lines: dict[str, list[dict[str, Any]]] = {}
    for name in key_names:
        lines[name] = [
            {
                "limit": line.limit,
                "limit_micro_usd": line.limit_micro_usd,
                "spent_micro_usd": line.spent_micro_usd,
                "left_micro_usd": line.left_micro_usd,
                "resets_at": None
                if line.resets_at is None
                else datetime.fromtimestamp(line.resets_at, zone).isoformat(timespec="seconds"),
            }
            for line in budget_status(settings, source, name, now)
        ]
    return lines


def usage(
    settings: Settings,
    *,
    since: str | None,
    until: str | None,
    by: Sequence[str],
    fmt: str,
    html: str | None,
    now: float,
    out: TextIO = sys.stdout,
) -> int:
    """``relayd usage``: 0 (also for "no usage yet"), 2 for a bad argument."""
    zone, zone_name = zone_of(settings)
    by = list(dict.fromkeys(by or ["key"]))
    try:
        window = Window(
            parse_moment(since, zone, until=False, flag="--since") if since else None,
            parse_moment(until, zone, until=True, flag="--until") if until else None,
            zone,
            zone_name,
        )
        book = PriceBook.load(settings)
        source = usage_source(settings)
        if source.whole_days and any(m and not _DATE.fullmatch(m.strip()) for m in (since, until)):
            print(
                f"relayd: usage in {source.where} is kept per day: --since and --until "
                "select whole days",
                file=sys.stderr,
            )
        by_day = "day" in by or html is not None
        days = None
        if by_day:
            span = source.span(window.since, window.until)
            days = day_spans(*span, zone) if span else []
        cells = source.cells(window.since, window.until, days)
    except UsageArgumentError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 2
    except LedgerUnreadableError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    if cells is None:
        cells = []
        print(f"relayd: no usage yet ({source.where} has no events)", file=sys.stderr)
    if html is not None:
        from relayd.spend.usage_page import page

        keys = sorted({cell.key for cell in cells})
        try:
            budgets = budget_lines(settings, keys, now, zone, source)
        except LedgerUnreadableError as exc:
            print(f"relayd: {exc}", file=sys.stderr)
            return 1
        text = page(cells, window, book, budgets, generated=now)
        Path(html).write_text(text, encoding="utf-8")
        print(f"relayd: wrote {html}", file=sys.stderr)
        return 0
    rows = group_rows(cells, by, book)
    if "key" in by:
        try:
            budgets = budget_lines(settings, {row.group["key"] for row in rows}, now, zone, source)
        except LedgerUnreadableError as exc:
            print(f"relayd: {exc}", file=sys.stderr)
            return 1
        for row in rows:
            row.budgets = budgets.get(row.group["key"], [])
    out.write(render(rows, by, fmt, window))
    return 0


def prices_check(
    settings: Settings, *, older_than_days: int, today: date, out: TextIO = sys.stdout
) -> int:
    """``relayd prices check``: 1 when a model seen in the ledger has no price or a
    price row was checked more than ``older_than_days`` ago (for cron); else 0."""
    book = PriceBook.load(settings)
    try:
        seen = usage_source(settings).models() or []
    except LedgerUnreadableError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    unpriced = [model for model in seen if not book.knows(model.model)]
    cutoff = today - timedelta(days=older_than_days)
    stale = [row for row in book.rows if row.checked < cutoff]
    for model in unpriced:
        last = datetime.fromtimestamp(model.last_at).astimezone().date().isoformat()
        out.write(f"unpriced  {model.model}  ({model.events:,} events, last {last})\n")
    for row in stale:
        age = (today - row.checked).days
        origin = "shipped" if row.origin == "shipped" else row.origin
        out.write(
            f"stale     {row.model}  checked {row.checked.isoformat()} ({age} days ago; "
            f"{origin}, source {row.source})\n"
        )
    if unpriced or stale:
        print(
            f"relayd: {len(unpriced)} model(s) seen without a price, {len(stale)} price "
            f"row(s) checked more than {older_than_days} days ago; add or correct rows "
            "in your own price file ([spend] prices_file)",
            file=sys.stderr,
        )
        return 1
    print(
        f"relayd: every model seen ({len(seen)}) has a price and all {len(book.rows)} "
        f"rows were checked within {older_than_days} days",
        file=sys.stderr,
    )
    return 0
