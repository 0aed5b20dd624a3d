"""The ledger's operations, one by one: the contract a second backend (Redis, issue 16)
must keep too. Every test takes a ``ledger`` fixture; parametrise it over backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relayd.config import Settings, updated
from relayd.store.ledger import Admission, Event, Ledger, Refusal, SqliteLedger
from relayd.store.ledger_redis import RedisLedger
from relayd.store.redis import connect

NOW = 1_800_000_000.0
WINDOWS = ("day:2027-01-15", "month:2027-01", "total")


@pytest.fixture(params=["sqlite", "redis"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    """Each backend in turn: the SQLite file, and a real redis-server."""
    store: SqliteLedger | RedisLedger
    if request.param == "sqlite":
        store = SqliteLedger(tmp_path / "ledger.sqlite3", busy_timeout_s=0.2)
    else:
        settings = redis_settings(request.getfixturevalue("redis_url"), tmp_path)
        store = RedisLedger(connect(settings), settings, own_client=True)
    await store.open()
    yield store
    await store.close()


def redis_settings(url: str, tmp_path: Path) -> Settings:
    return updated(
        Settings(), store={"backend": "redis", "redis_url": url, "dir": str(tmp_path / "state")}
    )


def admission(n: int, *, now: float = NOW, **limits: Any) -> Admission:
    return Admission(
        key="alice",
        reservation=f"r{n}",
        model="gpt-5",
        operation="createResponse",
        now=now,
        expires=now + 60,
        micro_usd=limits.pop("micro_usd", 50),
        input_tokens=10,
        output_tokens=5,
        windows=WINDOWS,
        **limits,
    )


def event(micro: int, *, now: float = NOW) -> Event:
    return Event(
        at=now,
        key="alice",
        model="gpt-5",
        operation="createResponse",
        outcome="ok",
        micro_usd=micro,
        windows=WINDOWS,
    )


async def test_a_budget_admits_what_fits_with_what_is_in_flight(ledger: Ledger) -> None:
    budget = (("total", 140),)
    assert await ledger.admit(admission(1, budgets=budget), hold=True) is None
    assert await ledger.admit(admission(2, budgets=budget), hold=True) is None
    held = await ledger.admit(admission(3, budgets=budget), hold=True)
    assert isinstance(held, Refusal) and held.reason == "rate_limit_exceeded"  # in flight
    assert await ledger.settle(event(40), reservation="r1", hit=None, tokens=0)
    # 40 spent + 50 in flight + 50 asked fits 140 now.
    assert await ledger.admit(admission(3, budgets=budget), hold=True) is None
    spent = await ledger.spent("alice", ["total"])
    assert spent == {"total": 40}


async def test_a_spent_budget_is_insufficient_quota(ledger: Ledger) -> None:
    budget = (("day:2027-01-15", 100),)
    assert await ledger.admit(admission(1, budgets=budget), hold=True) is None
    assert await ledger.settle(event(100), reservation="r1", hit=None, tokens=0)
    refused = await ledger.admit(admission(2, budgets=budget), hold=True)
    assert isinstance(refused, Refusal)
    assert (refused.reason, refused.used, refused.limit) == ("insufficient_quota", 100, 100)


async def test_parallel_slots_count_live_reservations_only(ledger: Ledger) -> None:
    assert await ledger.admit(admission(1, max_parallel=1), hold=True) is None
    refused = await ledger.admit(admission(2, max_parallel=1), hold=True)
    assert isinstance(refused, Refusal) and refused.limit_name == "max_parallel"
    later = NOW + 61  # r1 expired: its slot is free even before it is charged
    assert await ledger.admit(admission(2, now=later, max_parallel=1), hold=True) is None


async def test_rpm_slides_over_sixty_seconds(ledger: Ledger) -> None:
    for n in range(3):
        assert isinstance(await ledger.admit(admission(n, rpm=3), hold=False), int)
    refused = await ledger.admit(admission(9, now=NOW + 59, rpm=3), hold=False)
    assert isinstance(refused, Refusal) and refused.limit_name == "rpm"
    assert 1 <= refused.retry_after_s <= 60
    assert isinstance(await ledger.admit(admission(9, now=NOW + 60, rpm=3), hold=False), int)


async def test_an_expired_reservation_is_charged_once_at_its_estimate(
    ledger: Ledger,
) -> None:
    assert await ledger.admit(admission(1, budgets=(("total", 10**6),)), hold=True) is None
    assert await ledger.expire(NOW + 61) == 1
    # The request settles late: never counted a second time.
    assert not await ledger.settle(event(45), reservation="r1", hit=None, tokens=0)
    assert await ledger.spent("alice", ["total"]) == {"total": 50}
    assert await ledger.expire(NOW + 120) == 0


async def test_a_carried_reservation_settles_once_by_its_upstream_id(
    ledger: Ledger,
) -> None:
    first = admission(1, budgets=(("total", 10**6),))
    assert await ledger.admit(first, hold=True) is None
    await ledger.carry("r1", "resp_1", NOW + 600, first)
    assert await ledger.settle_ref("resp_1", event(30), NOW)
    assert not await ledger.settle_ref("resp_1", event(30), NOW)  # a second poll
    assert await ledger.spent("alice", ["total"]) == {"total": 30}


async def test_two_workers_leasing_one_file_never_admit_past_rpm_or_budget(
    tmp_path: Path,
) -> None:
    # Each worker leases room for more than the one request it asks for
    # (docs/spend.md#leases); together they still admit at most the limits.
    path = tmp_path / "ledger.sqlite3"
    first = SqliteLedger(path, busy_timeout_s=0.2)
    second = SqliteLedger(path, busy_timeout_s=0.2)
    await first.open()
    await second.open()
    try:
        admitted = 0
        for n in range(120):
            worker = (first, second)[n % 2]
            verdict = await worker.admit(admission(n, rpm=100), hold=False)
            admitted += not isinstance(verdict, Refusal)
        assert admitted == 100
        budget = (("total", 50 * 40),)  # forty requests' estimates
        admitted = 0
        for n in range(200, 260):
            worker = (first, second)[n % 2]
            verdict = await worker.admit(admission(n, budgets=budget), hold=True)
            admitted += not isinstance(verdict, Refusal)
        assert 30 <= admitted <= 40  # the other's unused room may refuse a few early
    finally:
        await first.close()
        await second.close()


async def test_a_lease_settles_its_requests_and_gives_back_its_room(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", busy_timeout_s=0.2)
    await ledger.open()
    budget = (("total", 10**6),)
    for n in range(10):
        assert await ledger.admit(admission(n, budgets=budget), hold=True) is None
    for n in range(10):
        assert await ledger.settle(event(40), reservation=f"r{n}", hit=None, tokens=0)
    assert await ledger.spent("alice", ["total"]) == {"total": 400}
    await ledger.close()  # the lease goes back: nothing held, nothing charged
    reopened = SqliteLedger(ledger.path)
    await reopened.open()
    try:
        assert await reopened.expire(NOW + 10**6) == 0
        assert await reopened.spent("alice", ["total"]) == {"total": 400}
    finally:
        await reopened.close()
