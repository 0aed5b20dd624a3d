"""The spend ledger: limit counters, reservations and the append-only event log.

Four operations, each one small transaction, make up the whole interface
(:class:`Ledger`), so a second backend (Redis, issue 16) implements the same four as
atomic scripts: **admit** (parallel slot, rpm/tpm window, dollar reservation: all or
nothing), **settle** (the reservation becomes an event and is added to the spent
aggregates), **extend** (live reservations outlive the TTL) and **expire**
(reservations of a dead process are charged at their estimate). Everything the
rules decide (which limits, which windows, what to estimate) comes in as numbers
from :mod:`relayd.spend`; this module only counts, atomically.

The SQLite backend: one file (``ledger.sqlite3`` in the state directory), WAL, one
connection per process used from one thread (SQLite calls block: the loop never
waits on another worker's write lock), ``BEGIN IMMEDIATE`` for every
read-modify-write (a deferred transaction that upgrades to a write fails with
SQLITE_BUSY regardless of the busy timeout). Windows are part of a counter's key
(``day:2026-12-03``), so nothing is ever reset and nothing goes stale; the rpm/tpm
window slides over the last 60 whole seconds (one counter row per key and second),
exact across workers to the second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, TypeVar

from relayd.store.sqlite import open_database
from relayd.tasks import spawn

__all__ = [
    "LEDGER_FILE",
    "MIGRATIONS",
    "Admission",
    "Event",
    "Ledger",
    "LedgerUnavailableError",
    "Refusal",
    "SqliteLedger",
    "read_spent",
]

LEDGER_FILE: Final = "ledger.sqlite3"
WINDOW_S: Final = 60  # the rpm/tpm window, seconds
# How long an admission on the event loop waits for another writer before it moves
# to the ledger's thread (which waits up to [store] busy_timeout).
QUICK_BUSY_S: Final = 0.005
# Commits on the loop between two checkpoints (in the thread): about 1,000 WAL
# pages, SQLite's own default.
CHECKPOINT_EVERY: Final = 200

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

T = TypeVar("T")
log = logging.getLogger("relayd.spend")
_Settlement = tuple["Event | None", str | None, int | None, int]


class LedgerUnavailableError(RuntimeError):
    """The ledger cannot be read or written now (locked past its timeout, read-only,
    gone); ``[spend] on_backend_error`` decides what the request gets."""


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


@dataclass(slots=True)
class _Queued:
    """An admission or a settlement waiting for its group commit."""

    admission: Admission | None = None
    hold: bool = False
    prune: bool = True
    settlement: _Settlement | None = None
    done: asyncio.Future[object] | None = None


class Ledger(Protocol):
    """The operations spend control needs from a backend; each is atomic."""

    def admit(self, admission: Admission, *, hold: bool) -> Awaitable[Refusal | int | None]:
        """Check and hold, or refuse: a :class:`Refusal`, else the second its rpm/tpm
        hit was counted in (None when the key has no rpm/tpm). ``hold=False`` checks nothing and
        holds nothing beyond the rpm/tpm hit."""
        ...

    def settle(
        self, event: Event | None, *, reservation: str | None, hit: int | None, tokens: int
    ) -> asyncio.Future[bool]:
        """Record ``event`` (None: nothing to record, only release), add its money to
        its windows, correct its rpm/tpm ``hit`` by ``tokens`` (actual minus
        estimate) and drop the reservation; False (and nothing recorded) if the
        reservation had already expired."""
        ...

    async def record(self, events: Sequence[Event]) -> None:
        """Record events that held nothing (refusals, spooled usage)."""
        ...

    async def extend(self, reservations: Sequence[str], expires: float) -> None: ...

    async def carry(self, reservation: str, ref: str, expires: float, held: Admission) -> None:
        """Keep a reservation past its request under ``ref`` (an upstream id); one
        that was never held (a key without limits) is made now, holding nothing,
        from ``held``, so the poll that sees the end still records it."""
        ...

    async def settle_ref(self, ref: str, event: Event, tokens_now: float) -> bool:
        """Settle the reservation carried under ``ref``, if there is one."""
        ...

    async def expire(self, now: float) -> int:
        """Charge reservations past their expiry at their estimate; how many."""
        ...

    async def spent(self, key: str, windows: Sequence[str]) -> dict[str, int]: ...

    async def open(self) -> None:
        """Create or migrate the ledger and connect (at start; an error is logged
        and the ledger is tried again on first use)."""
        ...

    async def close(self) -> None: ...


class SqliteLedger:
    """:class:`Ledger` on one SQLite file shared by the workers of one machine."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 2.0,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._db: sqlite3.Connection | None = None  # the thread's
        self._quick: sqlite3.Connection | None = None  # the loop's (admissions)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="relayd-ledger")
        self._observe = observe
        self._queue: list[_Queued] = []  # waiting for the commit at the end of this turn
        self._commit_scheduled = False
        self._commits = 0
        self._pruned: dict[str, int] = {}  # key -> the second its old hits were pruned
        self._checkpointing: asyncio.Task[None] | None = None
        self._threaded: set[asyncio.Task[None]] = set()  # batches the thread commits

    @classmethod
    def migrate(cls, path: Path, busy_timeout_s: float = 2.0) -> None:
        """Create or migrate the schema now (the supervisor, before any worker)."""
        open_database(path, MIGRATIONS, busy_timeout_s=busy_timeout_s).close()

    # -------------------------------------------------------------- plumbing

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = open_database(self.path, MIGRATIONS, busy_timeout_s=self._busy_timeout_s)
        return self._db

    async def _run(self, name: str, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            started = time.perf_counter()
            try:
                db = self._connection()
                return _in_transaction(db, work)
            except sqlite3.Error as exc:
                # A broken connection (file replaced, made read-only) is reopened on
                # the next call, so the ledger recovers without a restart.
                self._drop()
                raise LedgerUnavailableError(f"the spend ledger {self.path}: {exc}") from exc
            finally:
                if self._observe is not None:
                    self._observe(name, time.perf_counter() - started)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _drop(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    def _drop_quick(self) -> None:
        if self._quick is not None:
            try:
                self._quick.close()
            finally:
                self._quick = None

    async def close(self) -> None:
        while self._queue or self._threaded or self._checkpointing:
            await asyncio.gather(
                *self._threaded, *filter(None, [self._checkpointing]), return_exceptions=True
            )
            await asyncio.sleep(0)  # the commit scheduled for this turn
        self._drop_quick()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._drop)
        self._pool.shutdown(wait=True)

    def admit(self, admission: Admission, *, hold: bool) -> asyncio.Future[Refusal | int | None]:
        # Hits older than the window are pruned once a second per key, not per request.
        second = int(admission.now)
        prune = self._pruned.get(admission.key) != second
        if prune:
            self._pruned[admission.key] = second
        queued = _Queued(admission=admission, hold=hold, prune=prune)
        return self._queued(queued)  # type: ignore[return-value]

    def settle(
        self, event: Event | None, *, reservation: str | None, hit: int | None, tokens: int
    ) -> asyncio.Future[bool]:
        return self._queued(_Queued(settlement=(event, reservation, hit, tokens)))  # type: ignore[return-value]

    # Group commit: admissions and settlements queued during one turn of the event
    # loop are written in one transaction at the end of it, on the loop's own
    # connection with a busy timeout of a few milliseconds (a thread hop
    # costs more than the transaction, about 0.1 ms). Under load many requests
    # share one commit; alone, a request pays for one. If another writer holds the
    # lock longer, the batch moves to the ledger's thread, which waits up to
    # [store] busy_timeout; either way the batch stays in order.

    def _queued(self, operation: _Queued) -> asyncio.Future[object]:
        """Queue ``operation`` for the commit at the end of this turn of the loop;
        its future has the result. A settlement is queued once its answer has gone
        to the client, so its commit runs while the client reads."""
        loop = asyncio.get_running_loop()
        operation.done = done = loop.create_future()
        self._queue.append(operation)
        if not self._commit_scheduled:
            self._commit_scheduled = True
            loop.call_soon(self._commit)
        return done

    def _commit(self) -> None:
        self._commit_scheduled = False
        batch, self._queue = self._queue, []
        if not batch:
            return
        if self._threaded:  # an earlier batch is still in the thread: stay in order
            self._track(spawn(self._commit_in_thread(batch), name="relayd.ledger.commit"))
            return
        started = time.perf_counter()
        try:
            results = _in_transaction(self._quick_connection(), lambda db: _apply(db, batch))
        except sqlite3.Error:
            self._drop_quick()  # busy past a few ms, or no ledger yet: the thread waits
            self._track(spawn(self._commit_in_thread(batch), name="relayd.ledger.commit"))
            return
        if self._observe is not None:
            self._observe("commit", time.perf_counter() - started)
        _resolve(batch, results)
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0 and self._checkpointing is None:
            # Not a batch: loop commits go on meanwhile (a passive checkpoint never
            # takes the write lock).
            self._checkpointing = spawn(self._checkpoint(), name="relayd.ledger.checkpoint")

    async def _commit_in_thread(self, batch: list[_Queued]) -> None:
        try:
            results = await self._run("commit", lambda db: _apply(db, batch))
        except LedgerUnavailableError as exc:
            for operation in batch:
                if operation.done is not None and not operation.done.done():
                    operation.done.set_exception(exc)
            return
        _resolve(batch, results)

    def _quick_connection(self) -> sqlite3.Connection:
        if self._quick is None:
            if not self.path.exists():
                raise sqlite3.OperationalError("the ledger is not created yet")
            self._quick = sqlite3.connect(
                self.path, timeout=QUICK_BUSY_S, isolation_level=None, check_same_thread=False
            )
            self._quick.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints copy the log into the database and sync it: the thread
            # does them (_checkpoint), never the loop.
            self._quick.execute("PRAGMA wal_autocheckpoint=0")
        return self._quick

    async def _checkpoint(self) -> None:
        try:
            await self._run_bare("checkpoint", "PRAGMA wal_checkpoint(PASSIVE)")
        except LedgerUnavailableError as exc:
            log.warning("spend ledger checkpoint failed: %s", exc)
        finally:
            self._checkpointing = None

    async def _run_bare(self, name: str, sql: str) -> None:
        """One statement outside any transaction, in the ledger's thread."""

        def call() -> None:
            started = time.perf_counter()
            try:
                self._connection().execute(sql)
            except sqlite3.Error as exc:
                self._drop()
                raise LedgerUnavailableError(f"the spend ledger {self.path}: {exc}") from exc
            finally:
                if self._observe is not None:
                    self._observe(name, time.perf_counter() - started)

        await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._threaded.add(task)
        task.add_done_callback(self._threaded.discard)

    # -------------------------------------------------------------- operations

    async def open(self) -> None:
        await self._run("open", lambda db: None)  # migrates, in the thread
        try:
            self._quick_connection()
        except sqlite3.Error as exc:
            self._drop_quick()
            raise LedgerUnavailableError(f"the spend ledger {self.path}: {exc}") from exc

    async def record(self, events: Sequence[Event]) -> None:
        def work(db: sqlite3.Connection) -> None:
            for event in events:
                _append(db, event)

        await self._run("record", work)

    async def extend(self, reservations: Sequence[str], expires: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE reservations SET expires = ? WHERE id = ? AND expires < ?",
                [(expires, rid, expires) for rid in reservations],
            )

        await self._run("extend", work)

    async def carry(self, reservation: str, ref: str, expires: float, held: Admission) -> None:
        await self._run(
            "carry",
            lambda db: db.execute(
                "INSERT INTO reservations (id, key, model, operation, windows, expires, ref)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET ref = excluded.ref, expires = excluded.expires",
                (
                    reservation,
                    held.key,
                    held.model,
                    held.operation,
                    " ".join(held.windows),
                    expires,
                    ref,
                ),
            ),
        )

    async def settle_ref(self, ref: str, event: Event, tokens_now: float) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT id, key, windows FROM reservations WHERE ref = ?", (ref,)
            ).fetchone()
            if row is None or row[1] != event.key:
                return False
            windows = tuple(row[2].split())
            carried = dataclasses.replace(event, windows=windows)
            return _settle(db, carried, row[0], None, 0)

        return await self._run("settle", work)

    async def expire(self, now: float) -> int:
        return await self._run("expire", lambda db: _expire(db, now))

    async def spent(self, key: str, windows: Sequence[str]) -> dict[str, int]:
        def work(db: sqlite3.Connection) -> dict[str, int]:
            found = dict.fromkeys(windows, 0)
            for window in windows:
                row = db.execute(
                    "SELECT micro_usd FROM spent WHERE key = ? AND window = ?", (key, window)
                ).fetchone()
                if row is not None:
                    found[window] = row[0]
            return found

        return await self._run("read", work)


# ------------------------------------------------------------------ transactions


def _in_transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _apply(db: sqlite3.Connection, batch: Sequence[_Queued]) -> list[object]:
    """Every queued operation, in order, in the caller's transaction."""
    results: list[object] = []
    for operation in batch:
        if operation.admission is not None:
            results.append(_admit(db, operation.admission, operation.hold, operation.prune))
        elif operation.settlement is not None:
            results.append(_settle(db, *operation.settlement))
    return results


def _resolve(batch: Sequence[_Queued], results: Sequence[object]) -> None:
    for operation, result in zip(batch, results, strict=True):
        if operation.done is not None and not operation.done.done():
            operation.done.set_result(result)


def _admit(
    db: sqlite3.Connection, a: Admission, hold: bool, prune: bool = True
) -> Refusal | int | None:
    if hold and a.max_parallel is not None:
        (running,) = db.execute(
            "SELECT count(*) FROM reservations WHERE key = ? AND expires > ? AND ref IS NULL",
            (a.key, a.now),
        ).fetchone()
        if running >= a.max_parallel:
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
        (held,) = db.execute(
            "SELECT coalesce(sum(micro_usd), 0) FROM reservations WHERE key = ? AND expires > ?",
            (a.key, a.now),
        ).fetchone()
        for window, limit in a.budgets:
            row = db.execute(
                "SELECT micro_usd FROM spent WHERE key = ? AND window = ?", (a.key, window)
            ).fetchone()
            spent = row[0] if row is not None else 0
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


def _settle(
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
        _append(db, event)
    return True


def _append(db: sqlite3.Connection, event: Event) -> None:
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


def _expire(db: sqlite3.Connection, now: float) -> int:
    rows = db.execute(
        "DELETE FROM reservations WHERE expires <= ? RETURNING key, model, operation,"
        " micro_usd, input_tokens, output_tokens, windows",
        (now,),
    ).fetchall()
    for key, model, operation, micro_usd, input_tokens, output_tokens, windows in rows:
        _append(
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
    found = dict.fromkeys(windows, 0)
    if not path.exists():
        return found
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    try:
        for window in windows:
            row = db.execute(
                "SELECT micro_usd FROM spent WHERE key = ? AND window = ?", (key, window)
            ).fetchone()
            if row is not None:
                found[window] = row[0]
    except sqlite3.OperationalError:
        return found  # no schema yet: nothing spent
    finally:
        db.close()
    return found
