"""The spend ledger on a shared Redis or Valkey server (``[store] backend = "redis"``).

The same operations as :class:`~relayd.store.ledger.SqliteLedger`, with the same
answers (``tests/test_spend_ledger.py`` runs over both), for any number of relayd
instances on any number of machines: admission, settlement, extension, carrying
and expiry are each one Lua script (:mod:`relayd.store.ledger_lua`), atomic on the
server and timed by its clock, so two instances never both take the last parallel
slot or the last dollar, and a reservation whose holder died is charged once, by
whichever instance's upkeep finds it first.

What is shared: limit windows, reservations, money spent per budget window, and
the daily aggregates the usage report reads. What stays on each instance: the
detail events (one row per request, for forensics), written in batches to the
``events`` table of the instance's own ledger file through the SQLite ledger's own
code. Every call is bounded by ``[store] timeout``; a failure raises
:class:`~relayd.store.ledger.LedgerUnavailableError` and ``[spend]
on_backend_error`` decides (docs/spend.md#the-redis-ledger).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from redis import asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from relayd.config import Settings
from relayd.spend.windows import windows_at
from relayd.store import ledger_lua as lua
from relayd.store import state_dir
from relayd.store.ledger import LEDGER_FILE, LedgerUnavailableError, SqliteLedger
from relayd.store.ledger_sql import Admission, Event, Refusal
from relayd.store.redis import key as global_key
from relayd.store.redis import tagged, unavailable
from relayd.tasks import spawn

__all__ = ["RedisLedger", "usage_group"]

T = TypeVar("T")
log = logging.getLogger("relayd.spend")

# A key is written to the index of keys holding reservations (which every
# instance's upkeep walks) at most this often per process.
INDEX_EVERY_S: Final = 300.0
# Detail events wait this long for company before they are written locally.
DETAIL_DELAY_S: Final = 0.2
DETAIL_BATCH: Final = 500

_REFUSALS: Final = {1: "max_parallel", 2: "rpm", 3: "tpm"}


def usage_group(model: str, operation: str, outcome: str, reason: str) -> str:
    """A group of a day's usage hash; each of its fields is ``<group>␟<counter>``."""
    return lua.SEP.join((model, operation, outcome, reason))


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: list[str]
    args: list[str | int | float]
    done: asyncio.Future[Any]


class _Batches:
    """Script calls made during one turn of the event loop, sent together at the end
    of it: one write and one round trip for all (a pipeline, not a transaction:
    each script is atomic on its own). Alone, a call goes as it is. The same idea as
    the SQLite ledger's group commit (docs/spend.md#group-commit)."""

    def __init__(self, client: aioredis.Redis, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._queue: list[_Call] = []

    def run(self, script: AsyncScript, keys: list[str], args: list[str | int | float]) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        self._queue.append(call)
        if len(self._queue) == 1:
            loop.call_soon(self._send)
        return call.done

    def _send(self) -> None:
        batch, self._queue = self._queue, []
        spawn(self._execute(batch), name="relayd.ledger.batch")

    async def _execute(self, batch: list[_Call]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                if len(batch) == 1:
                    call = batch[0]
                    results: list[Any] = [await call.script(keys=call.keys, args=call.args)]
                else:
                    results = await self._pipelined(batch)
        except (RedisError, OSError, TimeoutError) as exc:
            results = [exc] * len(batch)
        for call, result in zip(batch, results, strict=True):
            if call.done.done():
                continue  # its caller gave up (its own deadline)
            if isinstance(result, BaseException):
                call.done.set_exception(result)
            else:
                call.done.set_result(result)

    async def _pipelined(self, batch: list[_Call]) -> list[Any]:
        results: list[Any] = [None] * len(batch)
        pending = list(range(len(batch)))
        for _ in range(2):  # a second pass after loading scripts the server lost
            pipe = self._client.pipeline(transaction=False)
            for index in pending:
                call = batch[index]
                pipe.execute_command(
                    "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args
                )
            answers = await pipe.execute(raise_on_error=False)
            lost = [
                i for i, a in zip(pending, answers, strict=True) if isinstance(a, NoScriptError)
            ]
            for index, answer in zip(pending, answers, strict=True):
                results[index] = answer
            if not lost:
                break
            for script in {id(batch[i].script): batch[i].script for i in lost}.values():
                script.sha = await self._client.script_load(script.script)
            pending = lost
        return results


class RedisLedger:
    """:class:`~relayd.store.ledger.Ledger` on one Redis server shared by every instance.

    ``client`` is the process's client (:func:`relayd.store.redis.connect`); the
    ledger closes it only when told it owns it.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        *,
        observe: Callable[[str, float], None] | None = None,
        own_client: bool = False,
    ) -> None:
        self._client = client
        self._settings = settings
        self._observe = observe
        self._own_client = own_client
        self._timeout_s = settings.store.timeout_s
        self._admit = client.register_script(lua.ADMIT)
        self._settle = client.register_script(lua.SETTLE)
        self._expire = client.register_script(lua.EXPIRE)
        self._extend = client.register_script(lua.EXTEND)
        self._carry = client.register_script(lua.CARRY)
        self._index = global_key(settings, "ledger", "keys")
        self._batches = _Batches(client, self._timeout_s)
        self._holders: dict[str, str] = {}  # reservation id -> relay key, while held here
        self._uncertain: dict[str, str] = {}  # admissions whose answer never came
        self._indexed: dict[str, float] = {}  # relay key -> expiry last written to the index
        self._day: tuple[float, float, str] = (0.0, 0.0, "")
        self._local = SqliteLedger(
            state_dir(settings) / LEDGER_FILE, busy_timeout_s=settings.store.busy_timeout_s
        )
        self._detail: list[Event] = []
        self._detail_task: asyncio.Task[None] | None = None
        self._detail_now = asyncio.Event()
        self._closed = False

    # -------------------------------------------------------------- plumbing

    async def _call(self, name: str, work: Callable[[], Awaitable[T]]) -> T:
        """``work`` within ``[store] timeout`` (a script may queue behind others on
        the server); any failure is :class:`LedgerUnavailableError`."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                return await work()
        except (RedisError, OSError, TimeoutError) as exc:
            raise LedgerUnavailableError(str(unavailable(exc, f"spend ledger {name}"))) from exc
        finally:
            if self._observe is not None:
                self._observe(name, time.perf_counter() - started)

    def _keys(self, key: str, *names: str) -> list[str]:
        return [tagged(self._settings, key, name) for name in names]

    def _usage_key(self, key: str, at: float) -> str:
        return tagged(self._settings, key, "usage", self._day_of(at))

    def _day_of(self, at: float) -> str:
        """``at``'s calendar day in ``[spend] timezone`` (the budgets' own days)."""
        low, high, day = self._day
        if not low <= at < high:
            window = windows_at(at, self._settings.spend.timezone)[0]
            day = window.name.removeprefix("day:")
            self._day = (at, window.resets_at or at, day)
        return day

    async def _register(self, key: str, expires: float) -> None:
        """Name ``key`` in the index every upkeep walks, so a reservation is found
        however its holder ended. Scores are the latest expiry, by the caller's
        clock; entries a grace period old are dropped (:meth:`expire`)."""
        before = self._indexed.get(key, float("-inf"))
        if expires <= before + INDEX_EVERY_S:
            return
        self._indexed[key] = expires  # now: concurrent admissions write it once
        try:
            await self._client.zadd(self._index, {key: expires}, gt=True)
        except BaseException:
            self._indexed[key] = before
            raise

    # -------------------------------------------------------------- operations

    async def open(self) -> None:
        try:
            await self._local.open()
        except LedgerUnavailableError as exc:
            log.warning("local detail events cannot be written: %s", exc)

        async def load() -> None:
            for script in (self._admit, self._settle, self._expire, self._extend, self._carry):
                script.sha = await self._client.script_load(script.script)

        await self._call("open", load)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._detail_now.set()
        while self._detail_task is not None:
            await asyncio.gather(self._detail_task, return_exceptions=True)
        await self._local.close()
        if self._own_client:
            await self._client.aclose()

    async def admit(self, admission: Admission, *, hold: bool) -> Refusal | int | None:
        a = admission
        clock = time.time()
        budgets = a.budgets if hold else ()
        keys = self._keys(
            a.key, "slots", "held", "res", "refs", "hits", *(f"spent:{w}" for w, _ in budgets)
        )
        record = lua.SEP.join(
            (
                str(a.micro_usd),
                str(a.input_tokens),
                str(a.output_tokens),
                a.model,
                a.operation,
                " ".join(a.windows),
                "",
            )
        )
        args: list[str | float | int] = [
            a.now - clock,
            a.expires - clock,
            "1" if hold else "0",
            a.reservation,
            "" if a.rpm is None else a.rpm,
            "" if a.tpm is None else a.tpm,
            "" if a.max_parallel is None else a.max_parallel,
            a.micro_usd,
            a.input_tokens + a.output_tokens,
            record,
            *(limit for _, limit in budgets),
        ]

        async def work() -> list[Any]:
            if hold:
                await self._register(a.key, a.expires)
            return await self._batches.run(self._admit, keys, args)  # type: ignore[no-any-return]

        try:
            answer = await self._call("admit", work)
        except LedgerUnavailableError:
            if hold:
                # The server may have run it after the reply was lost: the request
                # goes on without it (refused, or passed on "open"), so the next
                # upkeep lets it go rather than expire it to its estimate.
                self._uncertain[a.reservation] = a.key
            raise
        if int(answer[0]) == 0:
            if hold:
                self._holders[a.reservation] = a.key
            hit = int(answer[1])
            return None if hit < 0 else hit
        kind, limit, used, retry_ms, budget = (int(value) for value in answer[1:6])
        if kind in _REFUSALS:
            return Refusal("rate_limit_exceeded", _REFUSALS[kind], limit, used, retry_ms / 1000)
        window = budgets[budget - 1][0]
        if kind == 4:
            return Refusal("insufficient_quota", window, limit, used, 0.0, window)
        return Refusal("rate_limit_exceeded", window, limit, used, retry_ms / 1000, window)

    def settle(
        self, event: Event | None, *, reservation: str | None, hit: int | None, tokens: int
    ) -> asyncio.Future[bool]:
        return spawn(self._settle_one(event, reservation, hit, tokens), name="relayd.ledger.settle")

    async def _settle_one(
        self, event: Event | None, reservation: str | None, hit: int | None, tokens: int
    ) -> bool:
        key = event.key if event is not None else self._holders.get(reservation or "")
        if key is None:  # a release of a reservation this process does not hold
            return reservation is None
        settled = await self._run_settle(key, event, reservation or "", "", hit, tokens)
        if reservation is not None:
            self._holders.pop(reservation, None)
        return settled

    async def _run_settle(
        self,
        key: str,
        event: Event | None,
        reservation: str,
        ref: str,
        hit: int | None,
        tokens: int,
    ) -> bool:
        at = event.at if event is not None else time.time()
        keys = [*self._keys(key, "slots", "held", "res", "refs", "hits"), self._usage_key(key, at)]
        args: list[str | int | float] = [reservation, ref, "" if hit is None else hit, tokens]
        if event is None:
            args += ["0", "", 0, "0", 0, 0, 0, 0, 0, 0, ""]
        else:
            args += [
                "1",
                usage_group(event.model, event.operation, event.outcome, event.reason),
                event.micro_usd,
                "1" if event.estimated else "0",
                event.input_tokens,
                event.cached_input_tokens,
                event.output_tokens,
                event.reasoning_tokens,
                event.audio_input_tokens,
                event.audio_output_tokens,
                " ".join(event.windows),
            ]
        done = await self._call("settle", lambda: self._batches.run(self._settle, keys, args))
        if done and event is not None:
            self._keep_detail([event])
        return bool(done)

    async def record(self, events: Sequence[Event]) -> None:
        await asyncio.gather(*(self._run_settle(e.key, e, "", "", None, 0) for e in events))

    async def extend(self, reservations: Sequence[str], expires: float) -> None:
        by_key: dict[str, list[str]] = {}
        for rid in reservations:
            if (holder := self._holders.get(rid)) is not None:
                by_key.setdefault(holder, []).append(rid)
        offset = expires - time.time()

        async def one(key: str, ids: list[str]) -> None:
            async def work() -> None:
                await self._register(key, expires)
                names = self._keys(key, "slots", "held", "res", "refs")
                await self._extend(keys=names, args=[offset, *ids])

            await self._call("extend", work)

        await asyncio.gather(*(one(key, ids) for key, ids in by_key.items()))

    async def carry(self, reservation: str, ref: str, expires: float, held: Admission) -> None:
        self._holders.pop(reservation, None)
        record = lua.SEP.join(
            ("0", "0", "0", held.model, held.operation, " ".join(held.windows), ref)
        )
        keys = self._keys(held.key, "slots", "held", "res", "refs")
        offset = expires - time.time()

        async def work() -> None:
            await self._register(held.key, expires)
            await self._carry(keys=keys, args=[reservation, ref, offset, record])

        await self._call("carry", work)

    async def settle_ref(self, ref: str, event: Event, tokens_now: float) -> bool:
        return await self._run_settle(event.key, event, "", ref, None, 0)

    async def expire(self, now: float) -> int:
        """Let go of admissions whose answer was lost, then charge every expired
        reservation of every key in the index; entries a grace period past their
        latest expiry leave it (all charged by then)."""
        for reservation, key in list(self._uncertain.items()):
            await self._run_settle(key, None, reservation, "", None, 0)
            del self._uncertain[reservation]
        oldest = now - lua.GRACE_S

        async def indexed() -> list[Any]:
            await self._client.zremrangebyscore(self._index, "-inf", f"({oldest}")
            return list(await self._client.zrangebyscore(self._index, oldest, "+inf"))

        names = [bytes(name).decode() for name in await self._call("expire", indexed)]
        offset = now - time.time()

        async def one(key: str) -> list[bytes]:
            names = [*self._keys(key, "slots", "held", "res", "refs"), self._usage_key(key, now)]

            async def work() -> list[bytes]:
                return await self._expire(keys=names, args=[offset])  # type: ignore[no-any-return]

            return await self._call("expire", work)

        found = await asyncio.gather(*(one(name) for name in names))
        events = [
            _expired_event(key, record.decode(), now)
            for key, records in zip(names, found, strict=True)
            for record in records
        ]
        self._keep_detail(events)
        return len(events)

    async def spent(self, key: str, windows: Sequence[str]) -> dict[str, int]:
        if not windows:
            return {}
        names = self._keys(key, *(f"spent:{w}" for w in windows))
        values = await self._call("read", lambda: self._client.mget(names))
        return {w: int(v or 0) for w, v in zip(windows, values, strict=True)}

    # -------------------------------------------------------------- detail events

    def _keep_detail(self, events: Sequence[Event]) -> None:
        """Queue events for this instance's local ``events`` table (forensics; the
        shared aggregates already have them). Their money is not added again."""
        if not events:
            return
        self._detail.extend(dataclasses.replace(e, windows=()) for e in events)
        if self._detail_task is None:
            self._detail_now.clear()
            self._detail_task = spawn(self._write_detail(), name="relayd.ledger.detail")

    async def _write_detail(self) -> None:
        try:
            try:
                await asyncio.wait_for(self._detail_now.wait(), DETAIL_DELAY_S)
            except TimeoutError:
                pass
            while self._detail:
                batch = self._detail[:DETAIL_BATCH]
                del self._detail[:DETAIL_BATCH]
                try:
                    await self._local.record(batch)
                except LedgerUnavailableError as exc:
                    log.warning("%d detail events not written locally: %s", len(batch), exc)
        finally:
            self._detail_task = None


def _expired_event(key: str, record: str, now: float) -> Event:
    micro, input_tokens, output_tokens, model, operation, windows, _ = record.split(lua.SEP)
    return Event(
        at=now,
        key=key,
        model=model,
        operation=operation,
        outcome="expired",
        input_tokens=int(input_tokens),
        output_tokens=int(output_tokens),
        micro_usd=int(micro),
        estimated=True,
        windows=tuple(windows.split()),
    )
