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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

__all__ = [
    "MIGRATIONS",
    "WINDOW_S",
    "Admission",
    "Event",
    "Grant",
    "LeaseRow",
    "Refusal",
    "Settlement",
    "admit",
    "append",
    "carry",
    "carry_leased",
    "drop_lease",
    "expire",
    "extend",
    "in_transaction",
    "lease",
    "read_spent",
    "return_hits",
    "settle",
    "settle_carried",
    "settle_leased",
    "spent_in",
    "update_lease",
    "write_lease",
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
    """
    -- One worker's leased allowance for one key (relayd/store/leases.py): money it
    -- holds against the key's budgets (micro_usd, which counts as held in flight for
    -- everyone) and, of that, the estimates of its requests still in flight
    -- (in_flight: what a dead worker's lease is charged when it expires).
    CREATE TABLE leases (
      id TEXT PRIMARY KEY,
      key TEXT NOT NULL,
      micro_usd INTEGER NOT NULL DEFAULT 0,
      in_flight INTEGER NOT NULL DEFAULT 0,
      windows TEXT NOT NULL DEFAULT '',
      expires REAL NOT NULL
    );
    CREATE INDEX leases_key ON leases (key, expires);
    """,
)


# Admission and Event are built once per metered request: plain slotted classes,
# never changed once built (a frozen dataclass costs about six times as much to build).
@dataclass(slots=True)
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


@dataclass(slots=True)
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


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """What one worker's lease holds as it is written (absolute values: only that
    worker writes its row)."""

    id: str
    key: str
    micro_usd: int
    in_flight: int
    windows: tuple[str, ...]
    expires: float


@dataclass(frozen=True, slots=True)
class Grant:
    """An admission that passed under a lease, and the room handed out beside it:
    ``requests`` and ``tokens`` more in the same second, ``micro_usd`` more money."""

    hit: int | None
    requests: int | None  # None: the key has no rpm (no count to keep)
    tokens: int | None  # None: the key has no tpm
    micro_usd: int


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
    room = _room(db, a, hold, prune)
    if isinstance(room, Refusal):
        return room
    hit = _count_hit(db, a, 1, a.input_tokens + a.output_tokens)
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


@dataclass(frozen=True, slots=True)
class _Room:
    """What is left under each limit once the admitted request is counted (None: no
    such limit)."""

    requests: int | None
    tokens: int | None
    micro_usd: int | None


def _room(db: sqlite3.Connection, a: Admission, hold: bool, prune: bool) -> Refusal | _Room:
    """Check ``a`` against every limit it names: a refusal, or the room left."""
    # One read of what the key holds in flight (its slots and its money together,
    # leased money included) and one of its budget windows (all of them at once).
    running = held = 0
    if hold and (a.max_parallel is not None or a.budgets):
        running, held = db.execute(
            "SELECT count(*) FILTER (WHERE ref IS NULL), coalesce(sum(micro_usd), 0)"
            " + (SELECT coalesce(sum(micro_usd), 0) FROM leases WHERE key = ?1 AND expires > ?2)"
            " FROM reservations WHERE key = ?1 AND expires > ?2",
            (a.key, a.now),
        ).fetchone()
    if hold and a.max_parallel is not None and running >= a.max_parallel:
        return Refusal("rate_limit_exceeded", "max_parallel", a.max_parallel, running, 1.0)
    requests_left = tokens_left = money_left = None
    wanted = a.input_tokens + a.output_tokens
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
        # An empty window admits even an estimate above tpm: else it could never pass.
        if a.tpm is not None and tokens and tokens + wanted > a.tpm:
            return Refusal("rate_limit_exceeded", "tpm", a.tpm, tokens, retry)
        if a.rpm is not None:
            requests_left = a.rpm - count - 1
        if a.tpm is not None:
            tokens_left = max(0, a.tpm - tokens - wanted)
    if hold and a.budgets:
        spent_by_window = spent_in(db, a.key, [window for window, _ in a.budgets])
        for window, limit in a.budgets:
            spent = spent_by_window[window]
            if spent >= limit or spent + a.micro_usd > limit:
                return Refusal("insufficient_quota", window, limit, spent, 0.0, window)
            if spent + held + a.micro_usd > limit:
                # What is in flight may settle for less: worth a retry soon.
                return Refusal("rate_limit_exceeded", window, limit, spent + held, 1.0, window)
            left = limit - spent - held - a.micro_usd
            money_left = left if money_left is None else min(money_left, left)
    return _Room(requests_left, tokens_left, money_left)


def _count_hit(db: sqlite3.Connection, a: Admission, requests: int, tokens: int) -> int | None:
    """Count ``requests`` admissions (and their estimated tokens) in this second."""
    if a.rpm is None and a.tpm is None:
        return None
    hit = int(a.now)
    db.execute(
        "INSERT INTO hits (key, second, requests, tokens) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (key, second) DO UPDATE SET requests = requests + excluded.requests,"
        " tokens = tokens + excluded.tokens",
        (a.key, hit, requests, tokens),
    )
    return hit


# A lease hands out at most this share of what is left under a limit (the rest stays
# for other workers), and room for at most this many more requests like the one
# that asked.
LEASE_SHARE: Final = 8
LEASE_REQUESTS: Final = 256


def lease(
    db: sqlite3.Connection, a: Admission, hold: bool, prune: bool, row: LeaseRow
) -> Refusal | Grant:
    """Admit ``a`` for a worker that leases, and hand it room for more.

    ``row`` is the worker's lease as it stands with nothing unused (its unused
    grants were returned just before, :func:`return_hits`): the request is checked
    exactly as :func:`admit` checks it, then the lease grows by the request's
    estimate and by a share of what is left, so that the worker can admit the next
    requests of the key without this file."""
    write_lease(db, row)
    room = _room(db, a, hold, prune)
    if isinstance(room, Refusal):
        return room
    wanted = a.input_tokens + a.output_tokens
    more = LEASE_REQUESTS - 1
    if room.requests is not None:
        more = min(more, room.requests // LEASE_SHARE)
    if room.tokens is not None and wanted:
        more = min(more, room.tokens // LEASE_SHARE // wanted)
    money = 0
    if hold and room.micro_usd is not None:
        money = min(room.micro_usd // LEASE_SHARE, a.micro_usd * (LEASE_REQUESTS - 1))
    hit = _count_hit(db, a, 1 + more, wanted * (1 + more))
    if hold:
        held = row.in_flight + a.micro_usd + money
        db.execute(
            "UPDATE leases SET micro_usd = ?, in_flight = ? WHERE id = ?",
            (held, row.in_flight + a.micro_usd, row.id),
        )
    return Grant(
        hit,
        more if a.rpm is not None else None,
        wanted * more if a.tpm is not None else None,
        money,
    )


def write_lease(db: sqlite3.Connection, row: LeaseRow) -> None:
    db.execute(
        "INSERT INTO leases (id, key, micro_usd, in_flight, windows, expires)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
        " micro_usd = excluded.micro_usd, in_flight = excluded.in_flight,"
        " windows = excluded.windows, expires = excluded.expires",
        (row.id, row.key, row.micro_usd, row.in_flight, " ".join(row.windows), row.expires),
    )


def update_lease(db: sqlite3.Connection, row: LeaseRow) -> None:
    """Write a lease that exists (one that expired, and was charged, stays gone)."""
    db.execute(
        "UPDATE leases SET micro_usd = ?, in_flight = ?, windows = ?, expires = ? WHERE id = ?",
        (row.micro_usd, row.in_flight, " ".join(row.windows), row.expires, row.id),
    )


def drop_lease(db: sqlite3.Connection, lease_id: str) -> None:
    db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))


def return_hits(db: sqlite3.Connection, key: str, second: int, requests: int, tokens: int) -> None:
    """Give back the unused part of a second's grant (requests and tokens counted
    ahead that were never admitted)."""
    db.execute(
        "UPDATE hits SET requests = max(0, requests - ?), tokens = max(0, tokens - ?)"
        " WHERE key = ? AND second = ?",
        (requests, tokens, key, second),
    )


def settle_leased(
    db: sqlite3.Connection,
    lease_id: str,
    events: Sequence[Event],
    corrections: Mapping[tuple[str, int], int],
) -> bool:
    """Settle requests admitted under a lease, all at once: their events, their
    money summed per key and window, their rpm/tpm corrections summed per key and
    second. False (nothing recorded) if the lease expired, and was charged, first."""
    if db.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is None:
        return False
    if corrections:
        db.executemany(
            "UPDATE hits SET tokens = max(0, tokens + ?) WHERE key = ? AND second = ?",
            [(tokens, key, second) for (key, second), tokens in corrections.items()],
        )
    if events:
        db.executemany(_INSERT_EVENT, [_event_row(event) for event in events])
        money: dict[tuple[str, str], int] = {}
        for event in events:
            if event.micro_usd:
                for window in event.windows:
                    money[(event.key, window)] = money.get((event.key, window), 0) + event.micro_usd
        if money:
            db.executemany(
                _ADD_SPENT, [(key, window, micro) for (key, window), micro in money.items()]
            )
    return True


def carry_leased(
    db: sqlite3.Connection,
    reservation: str,
    ref: str,
    expires: float,
    held: Admission,
    micro: int,
) -> None:
    """A request admitted under a lease becomes a carried reservation of its own,
    holding its estimate (``micro``); the lease lets it go when its row is next
    written, so until then the estimate is held twice, never not at all."""
    db.execute(
        "INSERT INTO reservations (id, key, model, operation, micro_usd, windows, expires, ref)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            reservation,
            held.key,
            held.model,
            held.operation,
            micro,
            " ".join(held.windows),
            expires,
            ref,
        ),
    )


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


_INSERT_EVENT: Final = (
    "INSERT INTO events (at, key, model, operation, outcome, reason, input_tokens,"
    " cached_input_tokens, output_tokens, reasoning_tokens, audio_input_tokens,"
    " audio_output_tokens, micro_usd, estimated) VALUES"
    " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ADD_SPENT: Final = (
    "INSERT INTO spent (key, window, micro_usd) VALUES (?, ?, ?)"
    " ON CONFLICT (key, window) DO UPDATE SET micro_usd = micro_usd + excluded.micro_usd"
)


def _event_row(event: Event) -> tuple[object, ...]:
    return (
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
    )


def append(db: sqlite3.Connection, event: Event) -> None:
    db.execute(_INSERT_EVENT, _event_row(event))
    if event.micro_usd:
        db.executemany(
            _ADD_SPENT, [(event.key, window, event.micro_usd) for window in event.windows]
        )


def expire(db: sqlite3.Connection, now: float) -> int:
    # A lease of a worker that died: what its requests in flight were estimated at
    # when it last wrote it is charged, the money it held unused is let go.
    leases = db.execute(
        "DELETE FROM leases WHERE expires <= ? RETURNING key, in_flight, windows", (now,)
    ).fetchall()
    for key, in_flight, windows in leases:
        if in_flight:
            append(
                db,
                Event(
                    at=now,
                    key=key,
                    model="",
                    operation="leased",
                    outcome="expired",
                    micro_usd=in_flight,
                    estimated=True,
                    windows=tuple(windows.split()),
                ),
            )
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
    return len(rows) + len(leases)


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
