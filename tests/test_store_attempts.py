"""Attempts per address (wrong relay keys on the login page, registrations), on both
backends: each process's memory, and a real redis-server counted by every instance."""

from __future__ import annotations

import asyncio

import pytest

from relayd.config import Settings, updated
from relayd.store.attempts import AttemptLimit, attempt_limit
from relayd.store.redis import connect


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_an_address_is_refused_past_its_attempts_until_the_window_passes(
    request: pytest.FixtureRequest, backend: str
) -> None:
    store: dict[str, object] = {}
    if backend == "redis":
        store = {"backend": "redis", "redis_url": request.getfixturevalue("redis_url")}
    settings = updated(Settings(), store=store)
    client = connect(settings) if backend == "redis" else None
    try:
        limit: AttemptLimit = attempt_limit(settings, client, "login", 2, 0.3)
        for _ in range(2):
            assert await limit.retry_after("192.0.2.1") is None
            await limit.record("192.0.2.1")
        wait = await limit.retry_after("192.0.2.1")
        assert wait is not None and wait >= 1.0  # said in whole seconds, never "0"
        assert await limit.retry_after("192.0.2.2") is None  # another address is not
        async with asyncio.timeout(3):
            while await limit.retry_after("192.0.2.1") is not None:
                await asyncio.sleep(0.05)
    finally:
        if client is not None:
            await client.aclose()


async def test_on_redis_every_instance_counts_together(redis_url: str) -> None:
    settings = updated(Settings(), store={"backend": "redis", "redis_url": redis_url})
    first, second = connect(settings), connect(settings)
    try:
        here = attempt_limit(settings, first, "login", 3, 60)
        there = attempt_limit(settings, second, "login", 3, 60)
        await here.record("2001:db8::1")
        await there.record("2001:db8::1")
        assert await here.retry_after("2001:db8::1") is None
        await here.record("2001:db8::1")
        assert await there.retry_after("2001:db8::1") is not None
        ttl = await first.pttl("relayd:attempts:login:2001:db8::1")
        assert 0 < ttl <= 60_000  # the counter goes away with its window
    finally:
        await first.aclose()
        await second.aclose()
