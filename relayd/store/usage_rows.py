"""The usage report's read queries over the ledger's ``events`` table.

The report may run while relayd serves: the ledger is opened read-only (a
``mode=ro`` URI, ``query_only``), so it never writes, never takes the write lock and,
in WAL mode, never waits for a writer or makes one wait. Each query is one short
read transaction. A ledger that does not exist yet, or has no ``events`` table yet,
is "no usage yet" (``None``), not an error.

Only the columns the ledger promises (migration 1 of ``relayd/store/ledger.py``)
are read, so columns the ledger adds later change nothing here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from relayd.config import Settings
from relayd.store import state_dir
from relayd.store.ledger import LEDGER_FILE

__all__ = [
    "DaySpan",
    "LedgerUnreadableError",
    "ModelSeen",
    "UsageCell",
    "ledger_path",
    "model_usage",
    "usage_cells",
    "usage_span",
]

# How long a read waits on a lock: only a checkpoint or a migration ever holds one
# that a reader must wait for, and both are short.
_BUSY_TIMEOUT_S: Final = 5.0

_SUMS: Final = """
    COUNT(*), SUM(estimated != 0),
    SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens),
    SUM(reasoning_tokens), SUM(audio_input_tokens), SUM(audio_output_tokens),
    SUM(micro_usd)
"""


class LedgerUnreadableError(RuntimeError):
    """The ledger exists but cannot be read (permissions, not a database)."""


@dataclass(frozen=True, slots=True)
class DaySpan:
    """One calendar day in the report's time zone: its label and its unix seconds."""

    day: str  # YYYY-MM-DD
    start: float
    end: float  # exclusive


@dataclass(frozen=True, slots=True)
class UsageCell:
    """The events of one (day, key, model, outcome, reason), summed."""

    day: str  # "" unless the query was by day
    key: str
    model: str
    outcome: str
    reason: str
    events: int
    estimated: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    audio_input_tokens: int
    audio_output_tokens: int
    micro_usd: int


@dataclass(frozen=True, slots=True)
class ModelSeen:
    model: str
    events: int
    last_at: float


def ledger_path(settings: Settings) -> Path:
    return state_dir(settings) / LEDGER_FILE


def usage_span(path: Path, since: float | None, until: float | None) -> tuple[float, float] | None:
    """The first and last event time within [since, until); None: no events."""
    with _reading(path) as connection:
        if connection is None:
            return None
        where, params = _window(since, until)
        first, last = connection.execute(
            f"SELECT MIN(at), MAX(at) FROM events {where}", params
        ).fetchone()
    return None if first is None else (float(first), float(last))


def usage_cells(
    path: Path,
    since: float | None,
    until: float | None,
    days: Sequence[DaySpan] | None = None,
) -> list[UsageCell] | None:
    """Events within [since, until) summed per key, model, outcome and reason, and
    per day of ``days`` when given (events outside every day are left out). Uses the
    ``events_at`` index: one range scan per day. None: no ledger yet."""
    with _reading(path) as connection:
        if connection is None:
            return None
        groups = "key, model, outcome, reason"
        params: list[str | float]
        if days is None:
            where, bounds = _window(since, until)
            params = list(bounds)
            sql = f"SELECT '', {groups}, {_SUMS} FROM events {where} GROUP BY {groups}"
        else:
            if not days:
                return []
            values = ", ".join("(?, ?, ?)" for _ in days)
            params = [value for span in days for value in (span.day, span.start, span.end)]
            where, extra = _window(since, until, prefix="AND")
            params.extend(extra)
            sql = (
                f"WITH days(day, lo, hi) AS (VALUES {values}) "
                f"SELECT days.day, {groups}, {_SUMS} FROM days "
                f"JOIN events ON events.at >= days.lo AND events.at < days.hi {where} "
                f"GROUP BY days.day, {groups}"
            )
        rows = connection.execute(sql, params).fetchall()
    return [UsageCell(*row[:5], *(int(value or 0) for value in row[5:])) for row in rows]


def model_usage(path: Path) -> list[ModelSeen] | None:
    """Every model named in the ledger, with its event count and last event time."""
    with _reading(path) as connection:
        if connection is None:
            return None
        rows = connection.execute(
            "SELECT model, COUNT(*), MAX(at) FROM events WHERE model != '' "
            "GROUP BY model ORDER BY model"
        ).fetchall()
    return [ModelSeen(model, count, float(last)) for model, count, last in rows]


def _window(
    since: float | None, until: float | None, *, prefix: str = "WHERE"
) -> tuple[str, list[float]]:
    clauses, params = [], []
    if since is not None:
        clauses.append("at >= ?")
        params.append(since)
    if until is not None:
        clauses.append("at < ?")
        params.append(until)
    if not clauses:
        return "", []
    return f"{prefix} {' AND '.join(clauses)}", params


@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection to the ledger, or None when it has no events yet."""
    try:
        if not path.is_file():
            yield None
            return
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S)) as connection:
            connection.execute("PRAGMA query_only=1")
            known = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
            ).fetchone()
            yield connection if known else None
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LedgerUnreadableError(f"cannot read the ledger {path}: {reason}") from None
