"""Leased allowances: what one worker may admit for a key without asking the file.

An admission that goes to the ledger's file costs a transaction on the client's
path. So a worker that admits a key's request there also takes a *lease*: room for
more of the same, counted in the file at once so that every other worker sees it
as used (docs/spend.md#leases):

- for rpm and tpm, more requests and tokens in the same second, added to that
  second's hits; what is left unused when the second is over goes back;
- for dollar budgets, money held in the worker's row of ``leases``, which counts as
  held in flight for every admission; what its requests did not use goes back when
  the key falls idle, or when the worker needs a new lease.

A lease is checked exactly as a request is (``ledger_sql.lease``), after this
worker's own unused room was returned, so one worker alone admits exactly what the
file would; with several, another worker's unused room can refuse a request early
(never admit one late). A lease hands out at most an eighth of what is left under
each limit and room for at most 256 requests, so the early refusals stay small and
end as the room is used or returned. Keys with ``max_parallel`` are not leased:
their slots are the reservations themselves.

This module only keeps the numbers, on the event loop; ``ledger.py`` writes them.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Final

from relayd.store.ledger_sql import Admission, Grant, LeaseRow

__all__ = ["IDLE_S", "Lease", "leasable"]

# A key with no admission for this long gives its unused money back.
IDLE_S: Final = 1.0


def leasable(admission: Admission, hold: bool) -> bool:
    """Whether ``admission`` can be served by a lease: it names a limit, holds no
    parallel slot (those are counted as reservations, one per request), and if it
    holds money, holds some: a request estimated at nothing (a realtime session)
    is refused once a budget is spent, which only the file knows."""
    if admission.max_parallel is not None:
        return False
    if hold and admission.budgets and admission.micro_usd <= 0:
        return False
    return hold or admission.rpm is not None or admission.tpm is not None


def _terms(a: Admission) -> tuple[object, ...]:
    """What a lease was checked under: a change of limits (SIGHUP) or of windows
    (midnight) sends the next admission to the file."""
    return (a.rpm, a.tpm, a.budgets)


@dataclass(slots=True)
class Lease:
    """One key's leased room in this process."""

    key: str
    terms: tuple[object, ...]
    windows: tuple[str, ...]
    ttl: float
    id: str = field(default_factory=lambda: "lease-" + os.urandom(9).hex())
    held: int = 0  # micro-dollars the lease holds in the file
    in_flight: int = 0  # of which the estimates of requests not yet settled
    second: int | None = None  # the second the request grant counts in
    requests: int | None = 0  # more requests it may admit in that second (None: no rpm)
    tokens: int | None = 0  # more tokens (None: no tpm)
    expires: float = 0.0
    used_at: float = 0.0
    busy: asyncio.Future[object] | None = None  # a lease being taken: wait for it
    dirty: bool = False  # held/in_flight changed since the row was written

    @classmethod
    def for_admission(cls, a: Admission) -> Lease:
        return cls(a.key, _terms(a), a.windows, max(0.0, a.expires - a.now))

    def take(self, a: Admission, hold: bool) -> tuple[bool, int | None]:
        """Admit ``a`` from the lease if its room covers it: (admitted, its hit)."""
        if self.busy is not None or _terms(a) != self.terms or a.now >= self.expires:
            return False, None
        wanted = a.input_tokens + a.output_tokens
        hit = None
        if a.rpm is not None or a.tpm is not None:
            hit = int(a.now)
            if hit != self.second:
                return False, None
            if self.requests is not None and self.requests < 1:
                return False, None
            if self.tokens is not None and self.tokens < wanted:
                return False, None
        if hold and self.held - self.in_flight < a.micro_usd:
            return False, None
        if hit is not None:
            if self.requests is not None:
                self.requests -= 1
            if self.tokens is not None:
                self.tokens -= wanted
        if hold:
            self.in_flight += a.micro_usd
            self.dirty = True
        self.used_at = a.now
        return True, hit

    def unused_grant(self) -> tuple[int, int, int] | None:
        """Give back the unused grant of its second: (second, requests, tokens), or
        None if there is none to return."""
        second, requests, tokens = self.second, self.requests, self.tokens
        self.second, self.requests, self.tokens = None, 0, 0
        if second is None or not (requests or tokens):
            return None
        return second, requests or 0, tokens or 0

    def release_money(self) -> None:
        """Hold only what is in flight."""
        if self.held != self.in_flight:
            self.held = self.in_flight
            self.dirty = True

    def granted(self, a: Admission, grant: Grant, hold: bool) -> None:
        """The file admitted ``a`` under this lease and handed out ``grant``."""
        self.terms, self.windows = _terms(a), a.windows
        self.second, self.requests, self.tokens = grant.hit, grant.requests, grant.tokens
        if hold:
            self.in_flight += a.micro_usd
            self.held = self.in_flight + grant.micro_usd
        self.expires = a.now + self.ttl
        self.used_at = a.now
        self.dirty = True  # settlements may have moved it while the lease was taken

    def settled(self, estimate: int, charged: int) -> None:
        """A request admitted under the lease settled: its estimate leaves the
        flight, what it cost leaves the held money (now spent)."""
        self.in_flight = max(0, self.in_flight - estimate)
        self.held = max(self.in_flight, self.held - charged)
        self.dirty = True

    def row(self, now: float) -> LeaseRow:
        """The row as it stands, its expiry pushed on (this worker is alive)."""
        self.expires = max(now, self.used_at) + self.ttl
        self.dirty = False
        return LeaseRow(self.id, self.key, self.held, self.in_flight, self.windows, self.expires)

    @property
    def empty(self) -> bool:
        return self.held == 0 and self.in_flight == 0 and self.second is None
