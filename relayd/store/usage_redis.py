"""The usage report's reads over the shared daily aggregates (``[store] backend = "redis"``).

Every instance's settlements add to the same per-day hashes
(``<prefix>:{<key name>}:usage:<day>``, written by :mod:`relayd.store.ledger_lua`
in the settlement's own script), so reading them on any instance reports the
spend of all. The days are calendar days in ``[spend] timezone``, as the budgets'
are; the report's ``--since``/``--until`` therefore select whole days here (the
detail events, each instance's own, stay in its local ledger file).

The report is a one-shot command: it reads every aggregate once (``SCAN`` by
pattern, then one ``HGETALL`` per key and day, pipelined) and sums in Python.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from redis.exceptions import RedisError

from relayd.config import Settings
from relayd.store import ledger_lua as lua
from relayd.store.redis import connect, tagged
from relayd.store.usage_rows import DaySpan, LedgerUnreadableError, ModelSeen, UsageCell

__all__ = ["SharedUsage"]

# How long the whole read may take (the server may be large and far away).
READ_TIMEOUT_S: Final = 60.0
_DAY: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_COUNTERS: Final = ("requests", "estimated", *lua.COUNTERS, "micro_usd")


@dataclass(slots=True)
class _Group:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))


class SharedUsage:
    """Usage read from the shared server: the same answers as the local ledger's
    queries (:mod:`relayd.store.usage_rows`), by whole days."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.zone = ZoneInfo(settings.spend.timezone)
        redacted = re.sub(r"//[^@/]*@", "//", settings.store.redis_url or "")
        self.where = f"the shared store {redacted}"
        self.whole_days = True
        # (relay key, day) -> (model, operation, outcome, reason) -> counters
        self._days: dict[tuple[str, str], dict[tuple[str, ...], _Group]] | None = None

    # ---------------------------------------------------------------- reads

    def span(self, since: float | None, until: float | None) -> tuple[float, float] | None:
        """The start of the first and of the last day with usage in the window."""
        starts = sorted(
            {self._start(day) for _, day in self._read() if self._overlaps(day, since, until)}
        )
        return (starts[0], starts[-1]) if starts else None

    def cells(
        self,
        since: float | None,
        until: float | None,
        days: Sequence[DaySpan] | None = None,
    ) -> list[UsageCell] | None:
        """Every group of the days in the window, per day of ``days`` when given."""
        wanted = None if days is None else {span.day for span in days}
        sums: dict[tuple[str, ...], dict[str, int]] = {}
        for (key, day), groups in self._read().items():
            if not self._overlaps(day, since, until) or (wanted is not None and day not in wanted):
                continue
            label = "" if wanted is None else day
            for (model, _operation, outcome, reason), group in groups.items():
                into = sums.setdefault((label, key, model, outcome, reason), {})
                for name, value in group.counts.items():
                    into[name] = into.get(name, 0) + value
        return [
            UsageCell(*labels, *(counts.get(name, 0) for name in _COUNTERS))  # type: ignore[arg-type]
            for labels, counts in sorted(sums.items())
        ]

    def models(self) -> list[ModelSeen]:
        seen: dict[str, tuple[int, float]] = {}
        for (_, day), groups in self._read().items():
            for (model, *_), group in groups.items():
                if model:
                    events, last = seen.get(model, (0, 0.0))
                    seen[model] = (events + group.counts["requests"], max(last, self._start(day)))
        return [ModelSeen(model, *seen[model]) for model in sorted(seen)]

    def spent(self, key: str, windows: Sequence[str]) -> dict[str, int]:
        names = [tagged(self.settings, key, f"spent:{window}") for window in windows]

        async def read(client: Any) -> list[Any]:
            return list(await client.mget(names)) if names else []

        values = self._run(read)
        return {window: int(value or 0) for window, value in zip(windows, values, strict=True)}

    # ---------------------------------------------------------------- plumbing

    def _read(self) -> dict[tuple[str, str], dict[tuple[str, ...], _Group]]:
        if self._days is None:
            self._days = self._run(self._fetch)
        return self._days

    async def _fetch(self, client: Any) -> dict[tuple[str, str], dict[tuple[str, ...], _Group]]:
        prefix = self.settings.store.redis_prefix
        pattern = _glob_escape(prefix) + ":{*}:usage:*"
        names: list[bytes] = [name async for name in client.scan_iter(match=pattern, count=1000)]
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        found = await pipe.execute() if names else []
        days: dict[tuple[str, str], dict[tuple[str, ...], _Group]] = {}
        head = prefix + ":{"
        for name, fields in zip(names, found, strict=True):
            text = name.decode()
            relay_key, _, day = text[len(head) :].rpartition("}:usage:")
            if not _DAY.fullmatch(day):
                continue
            groups = days.setdefault((relay_key, day), {})
            for raw, value in fields.items():
                *labels, counter = raw.decode().split(lua.SEP)
                if len(labels) != 4 or counter not in _COUNTERS:
                    continue
                group = groups.setdefault(tuple(labels), _Group())
                group.counts[counter] += int(value)
        return days

    def _run(self, work: Any) -> Any:
        async def call() -> Any:
            client = connect(self.settings)
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    return await work(client)
            finally:
                await client.aclose()

        try:
            return asyncio.run(call())
        except (RedisError, OSError, TimeoutError) as exc:
            raise LedgerUnreadableError(
                f"cannot read the usage in {self.where}: {type(exc).__name__}"
            ) from None

    def _start(self, day: str) -> float:
        return datetime.combine(date.fromisoformat(day), time(), self.zone).timestamp()

    def _overlaps(self, day: str, since: float | None, until: float | None) -> bool:
        start = self._start(day)
        end = datetime.combine(date.fromisoformat(day) + timedelta(days=1), time(), self.zone)
        return (until is None or start < until) and (since is None or end.timestamp() > since)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
