"""The spend ledger's schema and transactions: every statement of SQL it runs.

Each function here works inside a transaction its caller opened (``BEGIN
IMMEDIATE``, :func:`in_transaction`) on a connection its caller owns
(:mod:`relayd.store.ledger`); nothing here knows about threads or the event loop.
The arguments and results are plain numbers (:class:`Admission`,
:class:`Refusal`, :class:`Event`), the same a second backend takes.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

__all__ = [
    "MIGRATIONS",
    "WINDOW_S",
    "Admission",
    "Event",
    "Refusal",
    "Settlement",
    "admit",
    "append",
    "carry",
    "expire",
    "extend",
    "in_transaction",
    "read_spent",
    "settle",
    "settle_carried",
    "spent_in",
]

T = TypeVar("T")

WINDOW_S: Final = 60  # the rpm/tpm window, seconds

MIGRATIONS: Final = (
    """
    CREATE TABLE events (
      id INTEGER PRIMARY KEY,
      at REAL NOT NULL,
      key TEXT NOT NULL,
      model TEXT NOT NULL DEFAULT '',
      operation TEXT NOT NULL,
      outcome TEXT NOT NULL,
      reason TEXT NOT NULL DEFAULT '',
      input_tokens INTEGER NOT NULL DEFAULT 0,
      cached_input_tokens INTEGER NOT NULL DEFAULT 0,
      output_tokens INTEGER NOT NULL DEFAULT 0,
      reasoning_tokens INTEGER NOT NULL DEFAULT 0,
      audio_input_tokens INTEGER NOT NULL DEFAULT 0,
      audio_output_tokens INTEGER NOT NULL DEFAULT 0,
      micro_usd INTEGER NOT NULL DEFAULT 0,
      estimated INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX events_at ON events (at);
    -- Money settled per key and budget window ('day:2026-12-03', 'month:2026-12', 'total').
    CREATE TABLE spent (
      key TEXT NOT NULL,
      window TEXT NOT NULL,
      micro_usd INTEGER NOT NULL DEFAULT 0,
      PRIMARY KEY (key, window)
    ) WITHOUT ROWID;
    -- Requests in flight: each holds a parallel slot and its estimated cost until
    -- settled, or until it expires (its process died).
    CREATE TABLE reservations (
      id TEXT PRIMARY KEY,
      key TEXT NOT NULL,
      model TEXT NOT NULL DEFAULT '',
      operation TEXT NOT NULL,
      micro_usd INTEGER NOT NULL DEFAULT 0,
      input_tokens INTEGER NOT NULL DEFAULT 0,
      output_tokens INTEGER NOT NULL DEFAULT 0,
      windows TEXT NOT NULL DEFAULT '',
      expires REAL NOT NULL,
      ref TEXT
    );
    CREATE INDEX reservations_key ON reservations (key, expires);
    CREATE INDEX reservations_ref ON reservations (ref) WHERE ref IS NOT NULL;
    -- Admissions per key and second of the last minute, for rpm and tpm (tokens:
    -- estimated at admission, corrected at settlement). At most 60 rows per key.
    CREATE TABLE hits (
      key TEXT NOT NULL,
      second INTEGER NOT NULL,
      requests INTEGER NOT NULL DEFAULT 0,
      tokens INTEGER NOT NULL DEFAULT 0,
      PRIMARY KEY (key, second)
    ) WITHOUT ROWID;
    """,
)


@dataclass(frozen=True, slots=True)
class Admission:
    """One admission, all numbers: what to check and what to hold if it passes."""

    key: str
    reservation: str  # its id; settle and extend name it
    model: str
    operation: str
    now: float
    expires: float
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budgets: tuple[tuple[str, int], ...] = ()  # (window, limit micro-dollars)
    micro_usd: int = 0  # the estimate reserved against every budget window
    input_tokens: int = 0
    output_tokens: int = 0
    windows: tuple[str, ...] = ()  # the budget windows the request counts in


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an admission failed, with the numbers the error message names."""

    reason: str  # "rate_limit_exceeded" or "insufficient_quota"
    limit_name: str  # rpm, tpm, max_parallel, usd_per_day, ...
    limit: int
    used: int
    retry_after_s: float
    window: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """One row of ``events``, and the budget windows its money counts in."""

    at: float
    key: str
    model: str
    operation: str
    outcome: str
    reason: str = ""
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    micro_usd: int = 0
    estimated: bool = False
    windows: tuple[str, ...] = field(default=(), compare=False)


# What one settlement needs: the event (None: only release), the reservation, the
# rpm/tpm hit and the correction of its tokens (actual minus estimate).
Settlement = tuple["Event | None", str | None, int | None, int]


def in_transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def admit(
    db: sqlite3.Connection, a: Admission, hold: bool, prune: bool = True
) -> Refusal | int | None:
    # One read of what the key holds in flight (its slots and its money together)
    # and one of its budget windows (all of them at once): fewer statements per request.
    running = held = 0
    if hold and (a.max_parallel is not None or a.budgets):
        running, held = db.execute(
            "SELECT count(*) FILTER (WHERE ref IS NULL), coalesce(sum(micro_usd), 0)"
            " FROM reservations WHERE key = ? AND expires > ?",
            (a.key, a.now),
        ).fetchone()
    if hold and a.max_parallel is not None and running >= a.max_parallel:
        return Refusal("rate_limit_exceeded", "max_parallel", a.max_parallel, running, 1.0)
    hit: int | None = None
    if a.rpm is not None or a.tpm is not None:
        second = int(a.now)
        since = second - WINDOW_S
        if prune:
            db.execute("DELETE FROM hits WHERE key = ? AND second <= ?", (a.key, since))
        count, tokens, oldest = db.execute(
            "SELECT coalesce(sum(requests), 0), coalesce(sum(tokens), 0), min(second)"
            " FROM hits WHERE key = ? AND second > ?",
            (a.key, since),
        ).fetchone()
        retry = max(1.0, (oldest or second) + WINDOW_S - a.now)
        if a.rpm is not None and count >= a.rpm:
            return Refusal("rate_limit_exceeded", "rpm", a.rpm, count, retry)
        wanted = a.input_tokens + a.output_tokens
        # An empty window admits even an estimate above tpm: else it could never pass.
        if a.tpm is not None and tokens and tokens + wanted > a.tpm:
            return Refusal("rate_limit_exceeded", "tpm", a.tpm, tokens, retry)
    if hold and a.budgets:
        spent_by_window = spent_in(db, a.key, [window for window, _ in a.budgets])
        for window, limit in a.budgets:
            spent = spent_by_window[window]
            if spent >= limit or spent + a.micro_usd > limit:
                return Refusal("insufficient_quota", window, limit, spent, 0.0, window)
            if spent + held + a.micro_usd > limit:
                # What is in flight may settle for less: worth a retry soon.
                return Refusal("rate_limit_exceeded", window, limit, spent + held, 1.0, window)
    if a.rpm is not None or a.tpm is not None:
        hit = int(a.now)
        db.execute(
            "INSERT INTO hits (key, second, requests, tokens) VALUES (?, ?, 1, ?)"
            " ON CONFLICT (key, second) DO UPDATE SET requests = requests + 1,"
            " tokens = tokens + excluded.tokens",
            (a.key, hit, a.input_tokens + a.output_tokens),
        )
    if hold:
        db.execute(
            "INSERT INTO reservations (id, key, model, operation, micro_usd, input_tokens,"
            " output_tokens, windows, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                a.reservation,
                a.key,
                a.model,
                a.operation,
                a.micro_usd,
                a.input_tokens,
                a.output_tokens,
                " ".join(a.windows),
                a.expires,
            ),
        )
    return hit


def settle(
    db: sqlite3.Connection,
    event: Event | None,
    reservation: str | None,
    hit: int | None,
    tokens: int,
) -> bool:
    if reservation is not None:
        gone = db.execute("DELETE FROM reservations WHERE id = ?", (reservation,)).rowcount
        if not gone:
            return False  # expired and charged already: never count twice
    if hit is not None and event is not None:
        db.execute(
            "UPDATE hits SET tokens = max(0, tokens + ?) WHERE key = ? AND second = ?",
            (tokens, event.key, hit),
        )
    if event is not None:
        append(db, event)
    return True


def append(db: sqlite3.Connection, event: Event) -> None:
    db.execute(
        "INSERT INTO events (at, key, model, operation, outcome, reason, input_tokens,"
        " cached_input_tokens, output_tokens, reasoning_tokens, audio_input_tokens,"
        " audio_output_tokens, micro_usd, estimated) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.at,
            event.key,
            event.model,
            event.operation,
            event.outcome,
            event.reason,
            event.input_tokens,
            event.cached_input_tokens,
            event.output_tokens,
            event.reasoning_tokens,
            event.audio_input_tokens,
            event.audio_output_tokens,
            event.micro_usd,
            int(event.estimated),
        ),
    )
    if event.micro_usd:
        db.executemany(
            "INSERT INTO spent (key, window, micro_usd) VALUES (?, ?, ?)"
            " ON CONFLICT (key, window) DO UPDATE SET micro_usd = micro_usd + excluded.micro_usd",
            [(event.key, window, event.micro_usd) for window in event.windows],
        )


def expire(db: sqlite3.Connection, now: float) -> int:
    rows = db.execute(
        "DELETE FROM reservations WHERE expires <= ? RETURNING key, model, operation,"
        " micro_usd, input_tokens, output_tokens, windows",
        (now,),
    ).fetchall()
    for key, model, operation, micro_usd, input_tokens, output_tokens, windows in rows:
        append(
            db,
            Event(
                at=now,
                key=key,
                model=model,
                operation=operation,
                outcome="expired",
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                micro_usd=micro_usd,
                estimated=True,
                windows=tuple(windows.split()),
            ),
        )
    return len(rows)


def read_spent(path: Path, key: str, windows: Sequence[str]) -> dict[str, int]:
    """Money settled per window for ``key``, read without writing (``relayd usage``
    reads while relayd runs: WAL lets it). A missing ledger has spent nothing."""
    if not path.exists():
        return dict.fromkeys(windows, 0)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    try:
        return spent_in(db, key, windows)
    except sqlite3.OperationalError:
        return dict.fromkeys(windows, 0)  # no schema yet: nothing spent
    finally:
        db.close()


def extend(db: sqlite3.Connection, reservations: Sequence[str], expires: float) -> None:
    db.executemany(
        "UPDATE reservations SET expires = ? WHERE id = ? AND expires < ?",
        [(expires, rid, expires) for rid in reservations],
    )


def carry(
    db: sqlite3.Connection, reservation: str, ref: str, expires: float, held: Admission
) -> None:
    db.execute(
        "INSERT INTO reservations (id, key, model, operation, windows, expires, ref)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET ref = excluded.ref, expires = excluded.expires",
        (reservation, held.key, held.model, held.operation, " ".join(held.windows), expires, ref),
    )


def settle_carried(db: sqlite3.Connection, ref: str, event: Event) -> bool:
    row = db.execute("SELECT id, key, windows FROM reservations WHERE ref = ?", (ref,)).fetchone()
    if row is None or row[1] != event.key:
        return False
    carried = dataclasses.replace(event, windows=tuple(row[2].split()))
    return settle(db, carried, row[0], None, 0)


def spent_in(db: sqlite3.Connection, key: str, windows: Sequence[str]) -> dict[str, int]:
    found = dict.fromkeys(windows, 0)
    if not found:
        return found
    marks = ", ".join("?" * len(found))
    rows = db.execute(
        f"SELECT window, micro_usd FROM spent WHERE key = ? AND window IN ({marks})",
        (key, *found),
    )
    for window, micro_usd in rows:
        found[window] = micro_usd
    return found
