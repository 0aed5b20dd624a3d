"""Each key's budgets as the usage report shows them: limit, spent, left, reset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from relayd.config import Settings
from relayd.spend.windows import windows_at
from relayd.store.usage_source import UsageSource

__all__ = ["BudgetLine", "budget_status"]

_LIMIT_NAMES: Final = {"day": "usd_per_day", "month": "usd_per_month", "total": "usd_total"}


@dataclass(frozen=True, slots=True)
class BudgetLine:
    limit: str  # usd_per_day, usd_per_month or usd_total
    limit_micro_usd: int
    spent_micro_usd: int
    left_micro_usd: int
    resets_at: float | None  # unix seconds; None: never
    window: str  # day:2026-12-03, month:2026-12, total


def budget_status(
    settings: Settings, source: UsageSource, key_name: str, now: float
) -> list[BudgetLine]:
    """The budgets of ``key_name`` at ``now``, read from ``source`` (the local ledger
    or the shared store, :func:`relayd.store.usage_source.usage_source`) without
    writing to it."""
    budgets = settings.spend.limits_for(key_name).budgets
    if not budgets:
        return []
    windows = {w.period: w for w in windows_at(now, settings.spend.timezone)}
    spent = source.spent(key_name, [windows[p].name for p in budgets])
    lines = []
    for period, limit in budgets.items():
        window = windows[period]
        used = spent.get(window.name, 0)
        lines.append(
            BudgetLine(
                _LIMIT_NAMES[period],
                limit,
                used,
                max(0, limit - used),
                window.resets_at,
                window.name,
            )
        )
    return lines
