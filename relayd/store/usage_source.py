"""Where ``relayd usage`` reads: the local ledger file, or the shared aggregates.

:func:`usage_source` picks by ``[store] backend``, so the report (relayd/spend/
report.py) never knows where usage lives: ``"local"`` reads this machine's ledger
file (:mod:`relayd.store.usage_rows`), ``"redis"`` the daily aggregates every
instance adds to (:mod:`relayd.store.usage_redis`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from relayd.config import Settings
from relayd.store.ledger import read_spent
from relayd.store.usage_rows import (
    DaySpan,
    ModelSeen,
    UsageCell,
    ledger_path,
    model_usage,
    usage_cells,
    usage_span,
)

__all__ = ["LocalUsage", "UsageSource", "usage_source"]


class UsageSource(Protocol):
    where: str  # what the report names when there is no usage yet
    whole_days: bool  # --since/--until select whole days (the shared aggregates)

    def span(self, since: float | None, until: float | None) -> tuple[float, float] | None: ...

    def cells(
        self, since: float | None, until: float | None, days: Sequence[DaySpan] | None = None
    ) -> list[UsageCell] | None: ...

    def models(self) -> list[ModelSeen] | None: ...

    def spent(self, key: str, windows: Sequence[str]) -> dict[str, int]: ...


class LocalUsage:
    """This machine's ledger file, read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self.whole_days = False

    def span(self, since: float | None, until: float | None) -> tuple[float, float] | None:
        return usage_span(self.path, since, until)

    def cells(
        self, since: float | None, until: float | None, days: Sequence[DaySpan] | None = None
    ) -> list[UsageCell] | None:
        return usage_cells(self.path, since, until, days)

    def models(self) -> list[ModelSeen] | None:
        return model_usage(self.path)

    def spent(self, key: str, windows: Sequence[str]) -> dict[str, int]:
        return read_spent(self.path, key, windows)


def usage_source(settings: Settings) -> UsageSource:
    if settings.store.backend == "redis":
        from relayd.store.usage_redis import SharedUsage  # redis-py: only with Redis

        return SharedUsage(settings)
    return LocalUsage(ledger_path(settings))
