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
mode, shared by every worker. Most admissions are answered from the worker's lease
for the key without touching the file (:mod:`relayd.store.leases`,
docs/spend.md#leases); the others, the leases themselves and settlements are
group-committed on the event loop's own connection (below, and
docs/spend.md#group-commit); everything else, and any batch that finds the write
lock held, runs in the ledger's one thread, whose connection also migrates the
schema and checkpoints the log. Every read-modify-write is ``BEGIN IMMEDIATE`` (a
deferred transaction that upgrades to a write fails with SQLITE_BUSY regardless of
the busy timeout).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from relayd.store import ledger_sql as sql
from relayd.store.leases import IDLE_S, Lease, leasable
from relayd.store.ledger_sql import MIGRATIONS, Admission, Event, Grant, Refusal, read_spent
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
# How long settlements (and lease bookkeeping) wait to share a commit when no
# admission needs one sooner (docs/spend.md#group-commit).
SETTLE_DELAY_S: Final = 0.02


T = TypeVar("T")
log = logging.getLogger("relayd.spend")


class LedgerUnavailableError(RuntimeError):
    """The ledger cannot be read or written now (locked past its timeout, read-only,
    gone); ``[spend] on_backend_error`` decides what the request gets."""


@dataclass(slots=True)
class _Queued:
    """One operation waiting for its group commit: ``work`` runs in the commit's
    transaction, ``then`` (on the loop) sees its result before ``done`` does."""

    work: Callable[[sqlite3.Connection], object]
    done: asyncio.Future[object] | None = None
    then: Callable[[object], None] | None = None


class _LeaseSettlements:
    """The settlements of one lease's requests that wait for the same commit."""

    __slots__ = ("corrections", "events", "lease_id", "reservations", "written")

    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        self.events: list[Event] = []
        self.corrections: dict[tuple[str, int], int] = {}  # (key, second) -> tokens
        self.reservations: list[str] = []  # replayed under the lease if the commit fails
        self.written: asyncio.Future[object] = None  # type: ignore[assignment]

    def add(
        self, event: Event | None, reservation: str | None, hit: int | None, tokens: int
    ) -> None:
        if reservation is not None:
            self.reservations.append(reservation)
        if event is None:
            return
        self.events.append(event)
        if hit is not None and tokens:
            where = (event.key, hit)
            self.corrections[where] = self.corrections.get(where, 0) + tokens

    def apply(self, db: sqlite3.Connection) -> bool:
        return sql.settle_leased(db, self.lease_id, self.events, self.corrections)


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
        self._later: asyncio.TimerHandle | None = None  # a settlements-only commit
        self._leases: dict[str, Lease] = {}  # by key (relayd/store/leases.py)
        self._leased: dict[str, tuple[Lease, int]] = {}  # reservation -> its lease, estimate
        self._replays: dict[str, str] = {}  # leased reservation -> lease id, settling failed
        self._settling: dict[str, _LeaseSettlements] = {}  # by lease, until its commit
        self._tending: asyncio.TimerHandle | None = None
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
        for handle in (self._tending, self._later):
            if handle is not None:
                handle.cancel()
        self._tending = None
        self._release_leases()
        while self._queue or self._threaded or self._checkpointing:
            self._commit()
            await asyncio.gather(
                *self._threaded, *filter(None, [self._checkpointing]), return_exceptions=True
            )
            await asyncio.sleep(0)  # the commit scheduled for this turn
        self._drop_quick()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._drop)
        self._pool.shutdown(wait=True)

    def admit(self, admission: Admission, *, hold: bool) -> Awaitable[Refusal | int | None]:
        loop = asyncio.get_running_loop()
        if leasable(admission, hold):
            lease = self._leases.get(admission.key)
            if lease is not None and lease.busy is not None:
                return self._after(lease.busy, admission, hold)
            if lease is not None:
                taken, hit = lease.take(admission, hold)
                if taken:  # no file, no commit: the lease's room covers it
                    if hold:
                        self._leased[admission.reservation] = (lease, admission.micro_usd)
                    answer: asyncio.Future[Refusal | int | None] = loop.create_future()
                    answer.set_result(hit)
                    return answer
            return self._take_lease(admission, hold, lease)
        prune = self._prune(admission)
        return self._queued(  # type: ignore[return-value]
            lambda db: sql.admit(db, admission, hold, prune), urgent=True
        )

    def _prune(self, admission: Admission) -> bool:
        # Hits older than the window are pruned once a second per key, not per request.
        second = int(admission.now)
        prune = self._pruned.get(admission.key) != second
        if prune:
            self._pruned[admission.key] = second
        return prune

    async def _after(
        self, busy: asyncio.Future[object], admission: Admission, hold: bool
    ) -> Refusal | int | None:
        """Wait for the lease being taken for the key, then ask again."""
        await asyncio.wait([busy])
        return await self.admit(admission, hold=hold)

    def _take_lease(
        self, a: Admission, hold: bool, lease: Lease | None
    ) -> asyncio.Future[Refusal | int | None]:
        """Admit ``a`` in the file and lease room for more (relayd/store/leases.py).

        The lease's unused room goes back in the same transaction, so this worker's
        own leftovers never refuse it; until the answer, the key's other admissions
        wait for it."""
        if lease is None:
            lease = self._leases[a.key] = Lease.for_admission(a)
        unused = lease.unused_grant()
        lease.release_money()
        row = lease.row(a.now)
        prune = self._prune(a)

        def work(db: sqlite3.Connection) -> Refusal | Grant:
            if unused is not None:
                sql.return_hits(db, a.key, *unused)
            return sql.lease(db, a, hold, prune, row)

        def then(result: object) -> None:
            lease.busy = None
            if isinstance(result, Grant):
                lease.granted(a, result, hold)
                if hold:
                    self._leased[a.reservation] = (lease, a.micro_usd)
            self._tend_soon()

        queued = _Queued(work, then=then)
        done = self._queue_op(queued, urgent=True)
        lease.busy = done
        answer: asyncio.Future[Refusal | int | None] = asyncio.get_running_loop().create_future()

        def answered(done: asyncio.Future[object]) -> None:
            if lease.busy is done:
                lease.busy = None  # the commit failed: its room was never granted
            if done.cancelled():
                answer.cancel()
            elif (exc := done.exception()) is not None:
                answer.set_exception(exc)
            else:
                result = done.result()
                answer.set_result(result.hit if isinstance(result, Grant) else result)  # type: ignore[arg-type]

        done.add_done_callback(answered)
        return answer

    def settle(
        self, event: Event | None, *, reservation: str | None, hit: int | None, tokens: int
    ) -> asyncio.Future[bool]:
        leased = self._leased.pop(reservation, None) if reservation is not None else None
        replay = self._replays.pop(reservation, None) if reservation is not None else None
        if leased is None and replay is None:
            return self._queued(  # type: ignore[return-value]
                lambda db: sql.settle(db, event, reservation, hit, tokens), urgent=False
            )
        if leased is not None:
            lease, estimate = leased
            lease.settled(estimate, event.micro_usd if event is not None else 0)
            lease_id = lease.id
        else:
            assert replay is not None
            lease, lease_id = None, replay  # spooled while the ledger was away
        # The lease's settlements of one commit are written together: one check that
        # the lease still stands, their events in one statement, their money and
        # token corrections summed per window and per second.
        batch = self._settling.get(lease_id)
        if batch is None:
            batch = self._settling[lease_id] = _LeaseSettlements(lease_id)

            def then(settled: object, lease: Lease | None = lease) -> None:
                if not settled and lease is not None:  # the lease expired and was charged
                    self._forget(lease)

            def failed(written: asyncio.Future[object], batch: _LeaseSettlements = batch) -> None:
                if not written.cancelled() and written.exception():
                    for reservation in batch.reservations:  # spend control spools, replays
                        self._replays[reservation] = batch.lease_id

            batch.written = self._queue_op(_Queued(batch.apply, then=then), urgent=False)
            batch.written.add_done_callback(failed)
        batch.add(event, reservation, hit, tokens)
        return batch.written  # type: ignore[return-value]

    def _forget(self, lease: Lease) -> None:
        if self._leases.get(lease.key) is lease:
            del self._leases[lease.key]
        for reservation in [r for r, (held, _) in self._leased.items() if held is lease]:
            del self._leased[reservation]

    # Group commit: admissions and settlements queued during one turn of the event
    # loop are written in one transaction at the end of it, on the loop's own
    # connection with a busy timeout of a few milliseconds (a thread hop
    # costs more than the transaction, about 0.1 ms). Under load many requests
    # share one commit; alone, a request pays for one. Settlements that no admission
    # waits for wait up to SETTLE_DELAY_S for company. If another writer holds the
    # lock longer, the batch moves to the ledger's thread, which waits up to
    # [store] busy_timeout; either way the batch stays in order.

    def _queued(
        self, work: Callable[[sqlite3.Connection], object], *, urgent: bool
    ) -> asyncio.Future[object]:
        return self._queue_op(_Queued(work), urgent=urgent)

    def _queue_op(self, operation: _Queued, *, urgent: bool) -> asyncio.Future[object]:
        """Queue ``operation`` for a group commit (at the end of this turn of the loop
        if ``urgent``, else within SETTLE_DELAY_S); its future has the result. A
        settlement is queued once its answer has gone to the client, so its commit
        runs while the client reads."""
        loop = asyncio.get_running_loop()
        operation.done = done = loop.create_future()
        self._queue.append(operation)
        self._schedule(urgent=urgent)
        return done

    def _schedule(self, *, urgent: bool) -> None:
        loop = asyncio.get_running_loop()
        if urgent:
            if not self._commit_scheduled:
                self._commit_scheduled = True
                loop.call_soon(self._commit)
        elif self._later is None and not self._commit_scheduled:
            self._later = loop.call_later(SETTLE_DELAY_S, self._commit)

    def _commit(self) -> None:
        self._commit_scheduled = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        now = time.time()
        for lease in self._leases.values():
            if lease.dirty and lease.busy is None:  # a lease being taken writes its own row
                row = lease.row(now)
                self._queue.append(_Queued(functools.partial(_write_lease, row=row)))
        batch, self._queue = self._queue, []
        self._settling.clear()  # settlements from here on go to the next commit
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

    # -------------------------------------------------------------- leases' upkeep

    def _tend_soon(self) -> None:
        if self._tending is None and self._leases:
            self._tending = asyncio.get_running_loop().call_later(IDLE_S, self._tend)

    def _tend(self) -> None:
        """Once a second while leases are held: return what a past second's grant
        left unused, and what an idle key's lease holds beyond its requests in
        flight; forget leases with nothing left."""
        self._tending = None
        now = time.time()
        for lease in list(self._leases.values()):
            if lease.busy is not None:
                continue
            if lease.second is not None and lease.second < int(now):
                self._return_grant(lease)
            if now - lease.used_at >= IDLE_S:
                lease.release_money()
                if lease.empty:
                    del self._leases[lease.key]
                    self._queued(functools.partial(_drop_lease, lease_id=lease.id), urgent=False)
        if any(lease.dirty for lease in self._leases.values()):
            self._schedule(urgent=False)
        self._tend_soon()

    def _return_grant(self, lease: Lease) -> None:
        unused = lease.unused_grant()
        if unused is not None:
            key = lease.key
            self._queued(lambda db: sql.return_hits(db, key, *unused), urgent=False)

    def _release_leases(self) -> None:
        """At close: every lease goes back (its requests have settled by now)."""
        for lease in list(self._leases.values()):
            self._return_grant(lease)
            lease.release_money()
            if lease.in_flight == 0:
                self._queued(functools.partial(_drop_lease, lease_id=lease.id), urgent=True)
        self._leases.clear()

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

        # In the commit queue, behind the settlements already queued: the events of
        # one process reach the file in the order they happened.
        await self._queued(work, urgent=False)

    async def extend(self, reservations: Sequence[str], expires: float) -> None:
        rows = []
        for reservation in reservations:
            if (leased := self._leased.get(reservation)) is not None:
                leased[0].dirty = True  # its lease's row is written with a later expiry
            else:
                rows.append(reservation)
        if len(rows) < len(reservations):
            self._schedule(urgent=False)
        if rows:
            await self._run("extend", lambda db: sql.extend(db, rows, expires))

    async def carry(self, reservation: str, ref: str, expires: float, held: Admission) -> None:
        leased = self._leased.pop(reservation, None)
        if leased is None:
            await self._run("carry", lambda db: sql.carry(db, reservation, ref, expires, held))
            return
        # Its estimate moves out of the lease into a reservation of its own.
        lease, estimate = leased
        lease.settled(estimate, estimate)
        await self._queued(
            lambda db: sql.carry_leased(db, reservation, ref, expires, held, estimate),
            urgent=True,
        )

    async def settle_ref(self, ref: str, event: Event, tokens_now: float) -> bool:
        return await self._run("settle", lambda db: sql.settle_carried(db, ref, event))

    async def expire(self, now: float) -> int:
        return await self._run("expire", lambda db: sql.expire(db, now))

    async def spent(self, key: str, windows: Sequence[str]) -> dict[str, int]:
        return await self._run("read", lambda db: sql.spent_in(db, key, windows))


def _write_lease(db: sqlite3.Connection, *, row: sql.LeaseRow) -> None:
    sql.update_lease(db, row)


def _drop_lease(db: sqlite3.Connection, *, lease_id: str) -> None:
    sql.drop_lease(db, lease_id)


def _apply(db: sqlite3.Connection, batch: Sequence[_Queued]) -> list[object]:
    """Every queued operation, in order, in the caller's transaction."""
    return [operation.work(db) for operation in batch]


def _resolve(batch: Sequence[_Queued], results: Sequence[object]) -> None:
    for operation, result in zip(batch, results, strict=True):
        if operation.then is not None:
            operation.then(result)
        if operation.done is not None and not operation.done.done():
            operation.done.set_result(result)
