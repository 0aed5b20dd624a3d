"""Admission and settlement: the rules of ``[spend]`` applied through a ledger.

One :class:`SpendControl` per process. :meth:`~SpendControl.admit` runs before
anything goes upstream: the key's model rule and the price check here (no I/O),
then one atomic ledger operation for the parallel slot, the rpm/tpm window and the
dollar reservation. It returns a :class:`Ticket` or raises the refusal.
:meth:`~SpendControl.finish` is synchronous and idempotent: the first call fixes the
outcome and schedules the settlement (a task, off the client's latency path); any
later call is a no-op, so a ticket settles exactly once however its request ended.

Overshoot bound (README "Spend control"): a request is admitted only if what the key
has spent, plus every reservation in flight, plus this request's estimate fits the
budget; settled spend can therefore exceed a budget only by what in-flight requests
cost beyond their estimates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from relayd.config import KeyLimits, Settings
from relayd.config.spend_limits import BUDGET_PERIODS
from relayd.errors import (
    ModelNotAllowedError,
    ModelNotPricedError,
    SpendUnavailableError,
)
from relayd.spend.costs import Cost
from relayd.spend.estimate import Estimate, charge, estimate
from relayd.spend.prices import PriceBook, Tokens
from relayd.spend.refusals import refusal_error
from relayd.spend.windows import Window, windows_at
from relayd.store.ledger import Admission, Event, Ledger, LedgerUnavailableError, Refusal
from relayd.tasks import spawn

__all__ = ["SpendControl", "SpendHooks", "Ticket"]

log = logging.getLogger("relayd.spend")

# Usage kept while the ledger is away (on_backend_error = "open"); past it the
# oldest events are dropped, and said so.
SPOOL_MAX: Final = 100_000
# The request fields settlement reads (flat prices, background responses).
_KEPT: Final = ("model", "n", "size", "quality", "seconds", "background")


@dataclass(slots=True)
class Ticket:
    """One admitted request: what it holds and what it was estimated to cost."""

    key: str
    operation: str
    cost: Cost
    estimate: Estimate
    windows: tuple[str, ...]
    reservation: str | None = None  # held in the ledger (a slot, a reservation)
    hit: int | None = None  # its rpm/tpm window entry
    request: Mapping[str, Any] | None = None  # the JSON body, for flat prices
    done: bool = False
    carried: str | None = None  # an upstream id a later poll settles it by


@dataclass(slots=True)
class SpendHooks:
    """What the control reports to metrics (relayd/metrics.py fills these)."""

    spent: Callable[[str, str, int], None] = lambda key, model, micro: None
    refused: Callable[[str], None] = lambda reason: None
    passed_open: Callable[[], None] = lambda: None


_Pending = tuple[Event | None, str | None, int | None, int]


@dataclass(slots=True)
class _Live:
    tickets: dict[str, Ticket] = field(default_factory=dict)


@dataclass(slots=True)
class _Plan:
    """What admission checks for one key's limits, worked out once per key (and again
    when its limits change, SIGHUP), not per request."""

    limits: KeyLimits
    budgets: tuple[tuple[int, int], ...]  # (index of its window in day/month/total, limit)
    hold: bool  # a slot or money is held
    check: bool  # the ledger has anything to check
    names: tuple[str, ...] = ()  # the windows the budgets below were named for
    named: tuple[tuple[str, int], ...] = ()  # (window, limit) for those windows


def _plan(limits: KeyLimits) -> _Plan:
    budgets = limits.budgets
    held = tuple((BUDGET_PERIODS.index(p), budgets[p]) for p in BUDGET_PERIODS if p in budgets)
    hold = bool(held) or limits.max_parallel is not None
    return _Plan(limits, held, hold, hold or limits.rpm is not None or limits.tpm is not None)


class SpendControl:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger | None,
        prices: PriceBook,
        *,
        hooks: SpendHooks | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.prices = prices
        self.hooks = hooks or SpendHooks()
        self.clock = clock
        self._live = _Live()
        # Settlements waiting for the ledger: (event, reservation, hit, tokens).
        self._spool: list[_Pending] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        # Settlements by the ledger future that says how they went: a lease's
        # settlements of one commit share one future, and one callback here.
        self._writing: dict[asyncio.Future[bool], list[_Pending]] = {}
        self._windows: tuple[float, str, tuple[Window, Window, Window], tuple[str, ...]] | None = (
            None
        )
        self._plans: dict[str, _Plan] = {}
        # Reservation ids: unique in the ledger across processes and restarts (a
        # random prefix per process), without a system call per request.
        self._prefix = os.urandom(6).hex()
        self._serial = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.ledger is not None and self.settings.spend.backend != "off"

    def reload(self, settings: Settings, prices: PriceBook) -> None:
        """SIGHUP: new limits and prices apply to the next admission."""
        self.settings, self.prices = settings, prices

    def windows(self, now: float) -> tuple[Window, Window, Window]:
        """The budget windows ``now`` falls in, worked out once per day."""
        return self._windows_at(now)[0]

    def _windows_at(self, now: float) -> tuple[tuple[Window, Window, Window], tuple[str, ...]]:
        """:meth:`windows` and their names."""
        zone = self.settings.spend.timezone
        cached = self._windows
        if cached is not None and cached[1] == zone:
            resets_at = cached[2][0].resets_at
            if resets_at is not None and cached[0] <= now < resets_at:
                return cached[2], cached[3]
        found = windows_at(now, zone)
        names = (found[0].name, found[1].name, found[2].name)
        self._windows = (now, zone, found, names)
        return found, names

    def limits(self, key: str) -> KeyLimits:
        return self.settings.spend.limits_for(key)

    # -------------------------------------------------------------- admission

    async def admit(
        self,
        key: str,
        operation: str,
        cost: Cost,
        body: Mapping[str, Any] | None,
        body_bytes: int,
        *,
        model: str | None = None,
    ) -> Ticket:
        """Admit one request or raise its refusal (before any upstream byte).

        ``model`` names the model when ``body`` cannot (a realtime session, a
        multipart form whose model field was read ahead)."""
        spend = self.settings.spend
        limits = spend.limits_for(key)
        plan = self._plans.get(key)
        if plan is None or plan.limits is not limits:
            plan = self._plans[key] = _plan(limits)
        guess = estimate(self.prices, cost, body, body_bytes)
        if model and not guess.model:
            if cost is Cost.REALTIME:
                guess = Estimate(model, 0, 0, 0 if self.prices.knows(model) else None)
            else:  # a body relayd did not parse (multipart): its output, or flat price
                guess = estimate(self.prices, cost, {"model": model}, 0)
        now = self.clock()
        _, windows = self._windows_at(now)
        # Only what settlement reads is kept, not the whole (possibly large) body.
        kept = {name: body[name] for name in _KEPT if name in body} if body else None
        ticket = Ticket(key, operation, cost, guess, windows, request=kept)
        if limits.models is not None and not limits.allows(guess.model):
            self._refuse_event(ticket, now, "model_not_allowed")
            shown = guess.model or "(a request whose model relayd cannot read)"
            raise ModelNotAllowedError(
                f"Relay key '{key}' may not use model {shown}; allowed: "
                f"{', '.join(limits.models or ())}.",
                param="model",
            )
        if plan.budgets and guess.micro_usd is None and not spend.allow_unpriced:
            self._refuse_event(ticket, now, "model_not_priced")
            raise ModelNotPricedError(
                f"Relay key '{key}' has a dollar budget and relayd has no price for model "
                f"{guess.model or '(unnamed)'}; the operator can add one ([spend] prices_file) "
                "or set [spend] allow_unpriced.",
                param="model",
            )
        if not plan.check:
            return ticket  # nothing to check: settlement alone records it
        if plan.names is not windows:
            plan.names = windows
            plan.named = tuple((windows[at], limit) for at, limit in plan.budgets)
        hold = plan.hold
        admission = Admission(
            key=key,
            reservation=f"{self._prefix}{next(self._serial):x}",
            model=guess.model,
            operation=operation,
            now=now,
            expires=now + spend.reservation_ttl_s,
            rpm=limits.rpm,
            tpm=limits.tpm,
            max_parallel=limits.max_parallel,
            budgets=plan.named,
            micro_usd=guess.micro_usd or 0,
            input_tokens=guess.input_tokens,
            output_tokens=guess.output_tokens,
            windows=windows,
        )
        assert self.ledger is not None
        try:
            verdict = await self.ledger.admit(admission, hold=hold)
        except LedgerUnavailableError as exc:
            if spend.on_backend_error == "open":
                log.warning("spend ledger unavailable, letting a request pass: %s", exc)
                self.hooks.passed_open()
                return ticket
            self._refuse_event(ticket, now, "store_unavailable")
            raise SpendUnavailableError(
                "The relay cannot check this key's limits right now; retry shortly.",
                headers={"retry-after": "1", "x-should-retry": "true"},
            ) from exc
        if isinstance(verdict, Refusal):
            self._refuse_event(ticket, now, verdict.reason)
            raise refusal_error(key, verdict, now, spend.timezone)
        ticket.hit = verdict
        if hold:
            ticket.reservation = admission.reservation
            self._live.tickets[admission.reservation] = ticket
        return ticket

    def _refuse_event(self, ticket: Ticket, now: float, reason: str) -> None:
        self.hooks.refused(reason)
        self._write(
            Event(
                at=now,
                key=ticket.key,
                model=ticket.estimate.model,
                operation=ticket.operation,
                outcome="refused",
                reason=reason,
            )
        )

    # -------------------------------------------------------------- settlement

    def finish(
        self,
        ticket: Ticket,
        outcome: str,
        *,
        model: str | None = None,
        usage: Mapping[str, Any] | None = None,
    ) -> None:
        """Settle ``ticket`` once (synchronous; the ledger write is a task).

        ``outcome``: ``ok`` (answer complete: its usage, else for images and videos
        the flat price, else the estimate, flagged), ``failed`` before any output
        (an upstream error status: nothing charged), ``cancelled`` or ``broken``
        (the client left or the stream broke: the input estimate, flagged).
        """
        if ticket.done:
            return
        ticket.done = True
        if ticket.reservation is not None:
            self._live.tickets.pop(ticket.reservation, None)
        event, tokens = self._event(ticket, outcome, model, usage)
        tokens -= ticket.estimate.input_tokens + ticket.estimate.output_tokens  # tpm's correction
        self.hooks.spent(ticket.key, event.model, event.micro_usd)
        self._settle((event, ticket.reservation, ticket.hit, tokens))

    def release(self, ticket: Ticket) -> None:
        """End ``ticket`` recording nothing more (a realtime session whose responses
        settled one by one): its slot and reservation are let go."""
        if ticket.done:
            return
        ticket.done = True
        if ticket.reservation is None:
            return
        self._live.tickets.pop(ticket.reservation, None)
        self._settle((None, ticket.reservation, ticket.hit, 0))

    def record_usage(self, ticket: Ticket, model: str, usage: Mapping[str, Any]) -> None:
        """One priced answer inside a longer session (realtime ``response.done``)."""
        now = self.clock()
        tokens, micro = charge(self.prices, Cost.TOKENS, model, usage, None)
        event = _event_of(
            now, ticket.key, model, ticket.operation, "ok", tokens, micro or 0, micro is None
        )
        event = dataclasses.replace(event, windows=ticket.windows)
        self.hooks.spent(ticket.key, model, event.micro_usd)
        self._write(event)

    async def flushed(self) -> None:
        """Wait until every ledger write this process scheduled so far is done."""
        pending = list(self._tasks)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def over_budget(self, key: str) -> bool:
        """Whether ``key`` has spent a whole budget (a realtime session asks before
        each ``response.create``)."""
        budgets = self.limits(key).budgets
        if not budgets or self.ledger is None:
            return False
        windows = {w.period: w.name for w in windows_at(self.clock(), self.settings.spend.timezone)}
        try:
            spent = await self.ledger.spent(key, [windows[p] for p in budgets])
        except LedgerUnavailableError:
            return self.settings.spend.on_backend_error == "closed"
        return any(spent[windows[p]] >= limit for p, limit in budgets.items())

    def carry(self, ticket: Ticket, ref: str) -> None:
        """The answer is a background response still running: its reservation stays,
        under the upstream id ``ref``, until a poll sees it end or it expires."""
        if ticket.done:
            return
        ticket.done = True
        ticket.carried = ref
        if ticket.reservation is not None:
            self._live.tickets.pop(ticket.reservation, None)
        if self.ledger is None:
            return
        now = self.clock()
        expires = now + self.settings.spend.reservation_ttl_s
        held = Admission(
            key=ticket.key,
            reservation=ticket.reservation or os.urandom(9).hex(),
            model=ticket.estimate.model,
            operation=ticket.operation,
            now=now,
            expires=expires,
            windows=ticket.windows,
        )
        self._track(
            spawn(
                self._quietly(self.ledger.carry(held.reservation, ref, expires, held)),
                name="relayd.spend.carry",
            )
        )

    def poll_saw_end(self, key: str, ref: str, model: str, usage: Mapping[str, Any] | None) -> None:
        """A poll saw background response ``ref`` end: settle what it carried."""
        if not self.enabled:
            return
        now = self.clock()
        windows = tuple(w.name for w in windows_at(now, self.settings.spend.timezone))
        tokens, micro = charge(self.prices, Cost.TOKENS, model, usage, None)
        event = _event_of(now, key, model, "createResponse", "ok", tokens, micro or 0, False)
        event = dataclasses.replace(event, windows=windows)
        assert self.ledger is not None

        async def settle() -> None:
            if await self.ledger.settle_ref(ref, event, now):  # type: ignore[union-attr]
                self.hooks.spent(key, model, event.micro_usd)

        self._track(spawn(self._quietly(settle()), name="relayd.spend.poll"))

    def _event(
        self,
        ticket: Ticket,
        outcome: str,
        model: str | None,
        usage: Mapping[str, Any] | None,
    ) -> tuple[Event, int]:
        guess = ticket.estimate
        model = model or guess.model
        now = self.clock()
        if outcome == "ok":
            tokens, micro = charge(self.prices, ticket.cost, model, usage, ticket.request)
            estimated = micro is None and usage is None
            if estimated:
                tokens = Tokens(input=guess.input_tokens, output=guess.output_tokens)
                micro = guess.micro_usd
        elif outcome == "failed":
            tokens, micro, estimated = Tokens(), 0, False
        else:  # cancelled, broken: the input was sent, what came back is unknown
            tokens = Tokens(input=guess.input_tokens)
            micro = self.prices.token_cost(model, tokens) if guess.micro_usd else 0
            estimated = True
        event = _event_of(
            now,
            ticket.key,
            model,
            ticket.operation,
            outcome,
            tokens,
            micro or 0,
            estimated,
            ticket.windows,
        )
        return event, tokens.input + tokens.output

    def _settle(self, pending: _Pending) -> None:
        """Hand one settlement to the ledger (no task: the ledger's future says how it
        went), spooling it if the ledger is away."""
        if self.ledger is None:
            return
        event, reservation, hit, tokens = pending
        written = self.ledger.settle(event, reservation=reservation, hit=hit, tokens=tokens)
        waiting = self._writing.get(written)
        if waiting is not None:  # a settlement of the same commit: one callback for all
            waiting.append(pending)
            return
        self._writing[written] = [pending]
        self._tasks.add(written)
        written.add_done_callback(self._settled)

    def _settled(self, written: asyncio.Future[bool]) -> None:
        self._tasks.discard(written)
        pendings = self._writing.pop(written)
        if written.cancelled():
            return
        exc = written.exception()
        for pending in pendings:
            event = pending[0]
            if exc is not None:
                log.warning("spend ledger unavailable, usage spooled until it returns: %s", exc)
                self._spool_event(pending)
            elif not written.result() and event is not None:
                log.warning(
                    "a reservation of relay key %s expired before its request settled; it "
                    "was charged at its estimate",
                    event.key,
                )

    def _write(self, event: Event) -> None:
        if self.ledger is None:
            return
        ledger = self.ledger

        async def write() -> None:
            try:
                await ledger.record((event,))
            except LedgerUnavailableError:
                self._spool_event((event, None, None, 0))

        self._track(spawn(write(), name="relayd.spend.record"))

    def _spool_event(self, pending: _Pending) -> None:
        if len(self._spool) >= SPOOL_MAX:
            del self._spool[0]
            log.error("spend spool full: the oldest spooled event was dropped")
        self._spool.append(pending)

    async def _quietly(self, work: Any) -> None:
        try:
            await work
        except LedgerUnavailableError as exc:
            log.warning("spend ledger unavailable: %s", exc)

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for scheduled settlements (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -------------------------------------------------------------- upkeep

    async def upkeep(self) -> None:
        """One round: extend live reservations, expire dead ones, replay the spool."""
        if self.ledger is None:
            return
        now = self.clock()
        ttl = self.settings.spend.reservation_ttl_s
        live = list(self._live.tickets)
        try:
            if live:
                await self.ledger.extend(live, now + ttl)
            replayed = 0
            while self._spool:
                event, reservation, hit, tokens = self._spool[0]
                await self.ledger.settle(event, reservation=reservation, hit=hit, tokens=tokens)
                del self._spool[0]
                replayed += 1
            if replayed:
                log.info("spend ledger back: %d spooled settlements recorded", replayed)
            await self.ledger.expire(now)  # after the replay: settled beats expired
        except LedgerUnavailableError as exc:
            log.warning("spend ledger unavailable during upkeep: %s", exc)

    async def run_upkeep(self) -> None:
        interval = max(1.0, min(30.0, self.settings.spend.reservation_ttl_s / 3))
        while True:
            await self.upkeep()
            await asyncio.sleep(interval)

    @property
    def spooled(self) -> int:
        return len(self._spool)


def _event_of(
    at: float,
    key: str,
    model: str,
    operation: str,
    outcome: str,
    tokens: Tokens,
    micro: int,
    estimated: bool,
    windows: tuple[str, ...] = (),
) -> Event:
    return Event(
        at=at,
        key=key,
        model=model,
        operation=operation,
        outcome=outcome,
        input_tokens=tokens.input,
        cached_input_tokens=tokens.cached_input,
        output_tokens=tokens.output,
        reasoning_tokens=tokens.reasoning,
        audio_input_tokens=tokens.audio_input,
        audio_output_tokens=tokens.audio_output,
        micro_usd=micro,
        estimated=estimated,
        windows=windows,
    )
