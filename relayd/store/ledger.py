"""The spend ledger: limit counters, reservations and the append-only event log.

A handful of operations, each atomic, make up the whole interface (:class:`Ledger`),
so a second backend (Redis, issue 16) implements the same ones as scripts: **admit**
(parallel slot, rpm/tpm window, dollar reservation: all or nothing), **settle** (the
reservation becomes an event added to the spent aggregates), **extend** (live
reservations outlive their TTL), **carry** (a background response keeps its
reservation under its upstream id) and **expire** (reservations of a dead process
are charged at their estimate). Everything the rules decide (which limits, which
windows, what to estimate) comes in as numbers from :mod:`relayd.spend`; this
module only counts, atomically. Its SQL is in :mod:`relayd.store.ledger_sql`.

The SQLite backend: one file (``ledger.sqlite3`` in the state directory) in WAL
mode, shared by every worker. Admissions and settlements are group-committed on
the event loop's own connection (below, and docs/spend.md#group-commit); everything
else, and any batch that finds the write lock held, runs in the ledger's one thread,
whose connection also migrates the schema and checkpoints the log. Every
read-modify-write is ``BEGIN IMMEDIATE`` (a deferred transaction that upgrades to a
write fails with SQLITE_BUSY regardless of the busy timeout).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from relayd.store import ledger_sql as sql
from relayd.store.ledger_sql import MIGRATIONS, Admission, Event, Refusal, Settlement, read_spent
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
# How long an admission on the event loop waits for another writer before it moves
# to the ledger's thread (which waits up to [store] busy_timeout).
QUICK_BUSY_S: Final = 0.005
# Commits on the loop between two checkpoints (in the thread): about 1,000 WAL
# pages, SQLite's own default.
CHECKPOINT_EVERY: Final = 200


T = TypeVar("T")
log = logging.getLogger("relayd.spend")


class LedgerUnavailableError(RuntimeError):
    """The ledger cannot be read or written now (locked past its timeout, read-only,
    gone); ``[spend] on_backend_error`` decides what the request gets."""


@dataclass(slots=True)
class _Queued:
    """An admission or a settlement waiting for its group commit."""

    admission: Admission | None = None
    hold: bool = False
    prune: bool = True
    settlement: Settlement | None = None
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

    async def _run(
        self, name: str, work: Callable[[sqlite3.Connection], T], *, transaction: bool = True
    ) -> T:
        """``work`` in the ledger's thread, in a transaction unless told otherwise."""

        def call() -> T:
            started = time.perf_counter()
            try:
                db = self._connection()
                return sql.in_transaction(db, work) if transaction else work(db)
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
            results = sql.in_transaction(self._quick_connection(), lambda db: _apply(db, batch))
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
            await self._run(
                "checkpoint",
                # Read to the end: a pragma's row left unread keeps its statement
                # active, and the thread's next COMMIT fails ("SQL statements in
                # progress") for as long as that cursor lives.
                lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall(),
                transaction=False,
            )
        except LedgerUnavailableError as exc:
            log.warning("spend ledger checkpoint failed: %s", exc)
        finally:
            self._checkpointing = None

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
                sql.append(db, event)

        await self._run("record", work)

    async def extend(self, reservations: Sequence[str], expires: float) -> None:
        await self._run("extend", lambda db: sql.extend(db, reservations, expires))

    async def carry(self, reservation: str, ref: str, expires: float, held: Admission) -> None:
        await self._run("carry", lambda db: sql.carry(db, reservation, ref, expires, held))

    async def settle_ref(self, ref: str, event: Event, tokens_now: float) -> bool:
        return await self._run("settle", lambda db: sql.settle_carried(db, ref, event))

    async def expire(self, now: float) -> int:
        return await self._run("expire", lambda db: sql.expire(db, now))

    async def spent(self, key: str, windows: Sequence[str]) -> dict[str, int]:
        return await self._run("read", lambda db: sql.spent_in(db, key, windows))


def _apply(db: sqlite3.Connection, batch: Sequence[_Queued]) -> list[object]:
    """Every queued operation, in order, in the caller's transaction."""
    results: list[object] = []
    for operation in batch:
        if operation.admission is not None:
            results.append(sql.admit(db, operation.admission, operation.hold, operation.prune))
        elif operation.settlement is not None:
            results.append(sql.settle(db, *operation.settlement))
    return results


def _resolve(batch: Sequence[_Queued], results: Sequence[object]) -> None:
    for operation, result in zip(batch, results, strict=True):
        if operation.done is not None and not operation.done.done():
            operation.done.set_result(result)
