"""Several machines behave as one relay (issue 16): two ``relayd serve`` on one Redis,
behind a real nginx round-robin (tests/fleet.py), seen as a user sees them.

The fake upstream answers gpt-5 with 11 input and 3 output tokens (44 micro-dollars
at the shipped price); a request asking for 3 output tokens is estimated at 49.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from relayd.config import Settings, updated
from relayd.store.redis import connect
from tests.conftest import OTHER_KEY, RELAY_KEY
from tests.fakes.openai import FakeOpenAI
from tests.filehost import PNG
from tests.fleet import BOUND, Fleet, Instance, all_served, fleet_of_two
from tests.oauthflow import bearer, login, refresh, register, tokens
from tests.redisserver import RedisServer
from tests.test_daemon import Start, start

__all__ = ["start"]  # the fixture, shared with test_daemon

pytestmark = pytest.mark.process

ASK = {"model": "gpt-5", "input": "hi", "max_output_tokens": 3}
ANSWER_MICRO = 44
RESERVATION_TTL = 5  # the shortest [spend] reservation_ttl relayd accepts
DOWNLOADS = "/v1/actions/downloads/{token}"
# A request that needs the store, with the store gone, is answered within this
# (relayd's own deadline is [store] timeout, 0.5 s by default).
REFUSAL_BOUND = 2.0


def _upstream(fake_server: TestServer) -> str:
    return str(fake_server.make_url("")).rstrip("/")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _post(http: aiohttp.ClientSession, url: str, key: str = RELAY_KEY) -> tuple[int, str]:
    async with http.post(url, json=ASK, headers=_auth(key)) as answer:
        body = await answer.json() if answer.status != 200 else {}
        return answer.status, (body.get("error") or {}).get("code", "")


async def _link(
    http: aiohttp.ClientSession, instance: Instance, public: str, key: str = RELAY_KEY
) -> str:
    """A signed download link for an image made through ``instance``: its path."""
    url = instance.url("/v1/actions/images/generations")
    async with http.post(url, json={"prompt": "p"}, headers=_auth(key)) as made:
        assert made.status == 200, await made.text()
        (link,) = (await made.json())["openaiFileResponse"]
    assert link.startswith(public + "/v1/actions/downloads/")
    return str(link).removeprefix(public)


async def test_an_image_made_through_a_is_fetched_by_its_link_through_b_and_the_front(
    start: Start, fake_server: TestServer, fake: FakeOpenAI, tmp_path: Path, redis_url: str
) -> None:
    fake.image_bytes = PNG
    async with (
        fleet_of_two(start, _upstream(fake_server), tmp_path, redis_url) as fleet,
        fleet.session() as http,
        asyncio.timeout(BOUND),
    ):
        path = await _link(http, fleet.a, fleet.public)
        async with http.get(fleet.b.url(path)) as got:  # no key: the link is the credential
            assert got.status == 200, await got.text()
            assert got.headers["Content-Type"] == "image/png"
            assert await got.read() == PNG
        for _ in range(2):  # round-robin: one of the two reaches each instance
            async with http.get(fleet.front(path)) as got:
                assert got.status == 200, await got.text()
                assert await got.read() == PNG
    assert await all_served(fleet.instances, DOWNLOADS, 3) == (1, 2)


async def test_an_oauth_grant_made_on_a_works_on_b_rotates_for_both_and_dies_with_its_key(
    start: Start, fake_server: TestServer, tmp_path: Path, redis_url: str
) -> None:
    async with (
        fleet_of_two(start, _upstream(fake_server), tmp_path, redis_url) as fleet,
        fleet.session(fleet.a.url("")) as on_a,
        fleet.session(fleet.b.url("")) as on_b,
        fleet.session(fleet.public) as front,
        asyncio.timeout(BOUND),
    ):
        client_id = await register(on_a)  # type: ignore[arg-type]
        done = await login(on_a, client_id, RELAY_KEY, scope="offline_access")
        status, granted = await tokens(on_a, done)
        assert status == 200, granted
        assert (await on_b.get("/v1/actions/ping", headers=bearer(granted["access_token"]))).ok

        # A refresh on B rotates the grant for both instances.
        status, renewed = await refresh(on_b, client_id, granted["refresh_token"])
        assert status == 200, renewed
        assert (await on_a.get("/v1/actions/ping", headers=bearer(renewed["access_token"]))).ok
        status, body = await refresh(on_a, client_id, granted["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")  # used up, on B
        # That reuse revoked the whole family, on both.
        for http in (on_a, on_b):
            ping = await http.get("/v1/actions/ping", headers=bearer(renewed["access_token"]))
            assert ping.status == 401
        assert (await refresh(on_b, client_id, renewed["refresh_token"]))[0] == 400

        # A login through the front: its page and its form reach different instances.
        done = await login(front, client_id, RELAY_KEY, scope="offline_access")
        status, granted = await tokens(front, done)
        assert status == 200, granted
        for http in (on_a, on_b):
            ping = await http.get("/v1/actions/ping", headers=bearer(granted["access_token"]))
            assert ping.status == 200
        # The key leaves the shared keys file; each instance reloads it.
        answers = await fleet.reload_keys(f"other:{OTHER_KEY}\n")
        assert all("removed: team" in line for line in answers), answers
        for http in (on_a, on_b):
            ping = await http.get("/v1/actions/ping", headers=bearer(granted["access_token"]))
            assert ping.status == 401
            assert (await refresh(http, client_id, granted["refresh_token"]))[0] == 400
    # The login on A (page and form), then through the front: one part on each.
    assert await all_served(fleet.instances, "/oauth/authorize", 4) == (3, 1)


SPEND = """
[spend]
backend = "store"

[spend.keys.team]
usd_total = {budget}

[spend.keys.other]
rpm = 10
"""


NO_USAGE = {"requests": 0, "refused": 0, "failed": 0, "micro_usd": 0}


async def _usage_by_key(instance: Instance) -> dict[str, dict[str, Any]]:
    """`relayd usage` run on ``instance``: its rows by key (one run: a process start)."""
    return {row["key"]: row for row in await instance.usage()}


async def _usage_of(instance: Instance, key: str) -> dict[str, Any]:
    return (await _usage_by_key(instance)).get(key, NO_USAGE)


async def test_a_budget_and_an_rpm_limit_hold_across_both_and_usage_reports_both(
    start: Start, fake_server: TestServer, tmp_path: Path, redis_url: str
) -> None:
    budget = 5 * ANSWER_MICRO  # fits about five answers
    config = SPEND.format(budget=budget / 1e6)
    async with (
        fleet_of_two(
            start, _upstream(fake_server), tmp_path, redis_url, configs=(config,) * 2
        ) as fleet,
        fleet.session() as http,
    ):
        async with asyncio.timeout(BOUND):
            spent = await asyncio.gather(
                *(_post(http, fleet.front("/v1/responses")) for _ in range(50))
            )
            limited = await asyncio.gather(
                *(_post(http, fleet.front("/v1/responses"), OTHER_KEY) for _ in range(40))
            )
        spread = await all_served(fleet.instances, "/v1/responses", 90)
        assert min(spread) >= 30, spread  # round-robin: both took their share

        admitted = sum(1 for status, _ in spent if status == 200)
        assert 1 <= admitted <= 5, spent
        refused = [code for status, code in spent if status != 200]
        assert set(refused) <= {"insufficient_quota", "rate_limit_exceeded"}, spent
        assert len(refused) == 50 - admitted
        assert sum(1 for status, _ in limited if status == 200) == 10  # rpm, exact
        assert {code for status, code in limited if status != 200} == {"rate_limit_exceeded"}

        # Settlements are written off the answer's path: wait (bounded) for them.
        async with asyncio.timeout(BOUND):
            while (await _usage_of(fleet.a, "team"))["requests"] < 50:
                await asyncio.sleep(0.2)
        for instance in fleet.instances:  # either machine's `relayd usage` sees both
            rows = await _usage_by_key(instance)
            team = rows["team"]
            assert (team["requests"], team["refused"]) == (50, 50 - admitted)
            # docs/spend.md, the overshoot bound: spent <= limit + sum(max(0, actual -
            # estimate)); every answer here costs less than its estimate, so no overshoot.
            assert team["micro_usd"] == admitted * ANSWER_MICRO <= budget
            other = rows["other"]
            assert (other["requests"], other["refused"]) == (40, 30)


OUTAGE = """
[spend]
backend = "store"
on_backend_error = "{mode}"
reservation_ttl = {ttl}

[spend.keys.team]
rpm = 100000
usd_total = 100.0
"""


def _answered(team: dict[str, Any]) -> int:
    """How many of the requests in a usage row passed."""
    return int(team["requests"] - team["refused"] - team["failed"])


async def _timed(http: aiohttp.ClientSession, method: str, url: str, key: str | None) -> int:
    """The status of one request, asserting it was answered within REFUSAL_BOUND."""
    started = time.monotonic()
    body = ASK if method == "POST" else None
    headers = _auth(key) if key else {}
    async with asyncio.timeout(REFUSAL_BOUND * 2):
        async with http.request(method, url, json=body, headers=headers) as answer:
            await answer.read()
            status = answer.status
    elapsed = time.monotonic() - started
    assert elapsed < REFUSAL_BOUND, f"{method} {url} took {elapsed:.2f} s"
    return status


async def _until_ok(http: aiohttp.ClientSession, method: str, url: str, key: str | None) -> None:
    """Retries (bounded by the caller) until the request answers 200."""
    while await _timed(http, method, url, key) != 200:
        await asyncio.sleep(0.1)


async def test_redis_lost_mid_run_closed_refuses_fast_open_passes_and_both_recover(
    start: Start, fake_server: TestServer, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A is closed, B open, on a Redis of this test's own that hangs (SIGSTOP), comes
    back, then dies (SIGKILL) and restarts empty (no persistence)."""
    fake.image_bytes = PNG
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    configs = tuple(OUTAGE.format(mode=m, ttl=RESERVATION_TTL) for m in ("closed", "open"))
    try:
        async with (
            fleet_of_two(
                start, _upstream(fake_server), tmp_path, redis.url, configs=configs, front=False
            ) as fleet,
            fleet.session(fleet.a.url("")) as on_a,
            asyncio.timeout(BOUND * 2),
        ):
            a, b = fleet.a, fleet.b
            link = await _link(on_a, a, fleet.public, OTHER_KEY)  # a key without limits
            client_id = await register(on_a)  # type: ignore[arg-type]
            done = await login(on_a, client_id, RELAY_KEY)
            status, granted = await tokens(on_a, done)
            assert status == 200, granted
            token = granted["access_token"]
            served_ok = 0
            for instance in (a, b):
                assert await _timed(on_a, "POST", instance.url("/v1/responses"), RELAY_KEY) == 200
                served_ok += 1

            assert redis.process is not None
            os.kill(redis.process.pid, signal.SIGSTOP)  # Redis hangs: no answer, no refusal
            stored = await _outage(on_a, fleet, link, token)
            served_ok += stored
            os.kill(redis.process.pid, signal.SIGCONT)
            resumed_at = time.monotonic()
            for instance in (a, b):  # back without a restart, nothing lost
                await _until_ok(on_a, "POST", instance.url("/v1/responses"), RELAY_KEY)
                served_ok += 1
                assert await _timed(on_a, "GET", instance.url(link), None) == 200
                assert await _timed(on_a, "GET", instance.url("/v1/actions/ping"), token) == 200
            await b.relayd.wait_line("spooled settlements recorded")
            while _answered(await _usage_of(a, "team")) < served_ok:
                await asyncio.sleep(0.2)  # B's spool replayed: every answer counted
            # Redis ran, when it resumed, the admissions it had queued while hung; their
            # requests were refused or passed long ago, so nobody settles them. They
            # must be let go, not charged at their estimates once their reservations
            # (reservation_ttl, and the upkeep's 1.7 s) expire: wait out that moment.
            await asyncio.sleep(max(0.0, resumed_at + RESERVATION_TTL + 2 - time.monotonic()))
            team = await _usage_of(b, "team")
            assert (_answered(team), team["failed"]) == (served_ok, 0)
            assert team["micro_usd"] == served_ok * ANSWER_MICRO

            redis.stop()  # Redis dies: now it refuses connections
            served_ok = await _outage(on_a, fleet, link, token)
            redis.start()  # empty: without persistence everything it held is gone
            for instance in (a, b):
                await _until_ok(on_a, "POST", instance.url("/v1/responses"), RELAY_KEY)
                served_ok += 1
                # The link's bytes and the OAuth grant were in Redis only.
                assert await _timed(on_a, "GET", instance.url(link), None) == 404
                assert await _timed(on_a, "GET", instance.url("/v1/actions/ping"), token) == 401
            # What was spent before is forgotten (a budget starts again from zero); what
            # B spooled while Redis was down is recorded in the new one.
            while _answered(await _usage_of(a, "team")) < served_ok:
                await asyncio.sleep(0.2)
            team = await _usage_of(b, "team")
            assert (_answered(team), team["micro_usd"]) == (served_ok, served_ok * ANSWER_MICRO)
    finally:
        if redis.process is not None:
            os.kill(redis.process.pid, signal.SIGCONT)
        redis.stop()


async def _outage(http: aiohttp.ClientSession, fleet: Fleet, link: str, token: str) -> int:
    """What each instance answers while the store is away (every answer within
    REFUSAL_BOUND); how many answers passed. Asked at once: each waits out a deadline."""
    a, b = fleet.a, fleet.b
    asks = [
        # closed: a request the spend ledger must admit is refused at once...
        *[("POST", a.url("/v1/responses"), RELAY_KEY, 503)] * 5,
        # ...open: it passes, its usage spooled.
        *[("POST", b.url("/v1/responses"), RELAY_KEY, 200)] * 3,
    ]
    for instance in (a, b):
        asks += [
            # Never a 401 for a token the store cannot look up, nor a 404 for a link.
            ("GET", instance.url("/v1/actions/ping"), token, 503),
            ("GET", instance.url(link), None, 503),
            # A relay key is in the keys file: it still authenticates.
            ("GET", instance.url("/v1/models"), RELAY_KEY, 200),
        ]
    answers = await asyncio.gather(*(_timed(http, m, url, key) for m, url, key, _ in asks))
    assert answers == [status for *_, status in asks]
    refusal = await _post(http, a.url("/v1/responses"))
    assert refusal == (503, "store_unavailable")
    return 3


async def test_after_redis_restarts_every_pooled_connection_works_at_once(tmp_path: Path) -> None:
    """Connections pooled before Redis died are stale when it is back: the first call
    on each must not fail (a 503 per stale connection, in a burst, after recovery)."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    settings = updated(Settings(), store={"backend": "redis", "redis_url": redis.url})
    client = connect(settings)
    try:
        async with asyncio.timeout(BOUND):
            await asyncio.gather(*(client.blpop(["relayd:probe"], timeout=0.05) for _ in range(4)))
            redis.stop()
            await asyncio.sleep(0.1)  # the loop sees the pooled sockets close
            redis.start()
            answers = await asyncio.gather(
                *(client.get("relayd:probe") for _ in range(4)), return_exceptions=True
            )
        assert answers == [None] * 4
    finally:
        await client.aclose()
        redis.stop()


async def test_more_calls_at_once_than_a_default_pool_holds_all_succeed(redis_url: str) -> None:
    """64 connections through relayd put well over 100 store calls in flight at once
    (admissions, settlements): past redis-py's default pool size (100) each extra
    call failed at once, and the request got a 503."""
    client = connect(updated(Settings(), store={"backend": "redis", "redis_url": redis_url}))
    try:
        async with asyncio.timeout(BOUND):
            answers = await asyncio.gather(
                *(client.get("relayd:probe") for _ in range(300)), return_exceptions=True
            )
        assert [a for a in answers if a is not None] == []
    finally:
        await client.aclose()
