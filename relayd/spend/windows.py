"""Budget windows: calendar days and months in the configured time zone, and "total".

A window is a name (``day:2026-12-03``, ``month:2026-12``, ``total``) that the
ledger keys its counters by. A new day is a new name: nothing is ever reset, so no
reset job can zero fresh spend or miss a boundary (docs/spend.md#windows).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

__all__ = ["Window", "windows_at"]


@dataclass(frozen=True, slots=True)
class Window:
    period: str  # "day", "month" or "total"
    name: str  # the ledger's key for it
    resets_at: float | None  # unix seconds of the next window; None: never


@functools.lru_cache(maxsize=8)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def windows_at(now: float, timezone: str) -> tuple[Window, Window, Window]:
    """The day, month and total windows ``now`` (unix seconds) falls in."""
    zone = _zone(timezone)
    local = datetime.fromtimestamp(now, zone)
    day_start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    # Midnight of the next calendar day, whatever DST did to this day's length.
    next_day = (day_start + timedelta(days=1, hours=12)).replace(hour=0, tzinfo=zone)
    first = day_start.replace(day=1)
    year, month = (first.year + 1, 1) if first.month == 12 else (first.year, first.month + 1)
    next_month = first.replace(year=year, month=month)
    return (
        Window("day", f"day:{local:%Y-%m-%d}", next_day.timestamp()),
        Window("month", f"month:{local:%Y-%m}", next_month.timestamp()),
        Window("total", "total", None),
    )
