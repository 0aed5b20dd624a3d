"""The spend ledger on a real redis-server, where several instances share it.

Two :class:`RedisLedger` objects with two clients and two state directories stand
for two relayd processes on two machines (the contract every backend keeps is
tests/test_spend_ledger.py; this file checks what only sharing can break).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis import asyncio as aioredis

from relayd.app import create_app
from relayd.config import ConfigError, KeyLimits, Settings, load_settings, updated
from relayd.spend import report
from relayd.spend.windows import windows_at
from relayd.state import SPEND, STORE_CLIENT
from relayd.store.ledger import Admission, Event, LedgerUnavailableError, Refusal
from relayd.store.ledger_lua import HELD_FIELD, SEP
from relayd.store.ledger_redis import RedisLedger
from relayd.store.redis import connect, tagged
from relayd.store.usage_rows import usage_cells
from relayd.tasks import spawn
from tests.conftest import RELAY_KEY, RelayFactory
from tests.redisserver import RedisServer

ESTIMATE = 100  # micro-dollars each admission reserves
SIGNING_SECRET = "s" * 40  # every instance on one store signs links alike
# Keeps the server busy for 0.6 s, so that calls queue behind it.
BUSY_LUA = """
local t = redis.call('TIME')
repeat
  local n = redis.call('TIME')
until (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 600000
return 1
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def settings_for(url: str, state: Path, **spend: Any) -> Settings:
    return updated(
        Settings(),
        store={"backend": "redis", "redis_url": url, "dir": str(state), "timeout_s": 0.5},
        spend=spend,
    )


@pytest.fixture
async def pair(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[RedisLedger, RedisLedger]]:
    """Two instances' ledgers on one server."""
    ledgers = []
    for name in ("a", "b"):
        settings = settings_for(redis_url, tmp_path / name)
        ledger = RedisLedger(connect(settings), settings, own_client=True)
        await ledger.open()
        ledgers.append(ledger)
    yield ledgers[0], ledgers[1]
    for ledger in ledgers:
        await ledger.close()


def admission(n: int, now: float, **limits: Any) -> Admission:
    windows = tuple(w.name for w in windows_at(now, "UTC"))
    return Admission(
        key="alice",
        reservation=f"r{n}",
        model="gpt-5",
        operation="createResponse",
        now=now,
        expires=now + 60,
        micro_usd=ESTIMATE,
        input_tokens=10,
        output_tokens=5,
        windows=windows,
        **limits,
    )


def event(key: str, micro: int, now: float, **extra: Any) -> Event:
    found = Event(
        at=now,
        key=key,
        model="gpt-5",
        operation="createResponse",
        outcome="ok",
        input_tokens=11,
        output_tokens=3,
        micro_usd=micro,
        windows=tuple(w.name for w in windows_at(now, "UTC")),
    )
    return dataclasses.replace(found, **extra)


async def in_flight(client: aioredis.Redis, settings: Settings, window: str) -> int:
    """Spent plus held of alice, read in one atomic step (MULTI/EXEC)."""
    pipe = client.pipeline(transaction=True)
    pipe.get(tagged(settings, "alice", f"spent:{window}"))
    pipe.zrange(tagged(settings, "alice", "held"), 0, -1)
    pipe.hgetall(tagged(settings, "alice", "res"))
    spent, ids, records = await pipe.execute()
    return int(spent or 0) + sum(int(records[i].decode().split(SEP)[0]) for i in ids)


async def test_fifty_admissions_on_two_instances_never_overfill_a_budget(
    pair: tuple[RedisLedger, RedisLedger], redis_url: str, tmp_path: Path
) -> None:
    limit = 5 * ESTIMATE + ESTIMATE // 2  # about 5 requests
    now = time.time()
    budget = (("total", limit),)
    settings = settings_for(redis_url, tmp_path / "watch")
    watcher = connect(settings)
    done = asyncio.Event()
    seen: list[int] = []
    outcomes: list[str] = []

    async def watch() -> None:
        while not done.is_set():
            seen.append(await in_flight(watcher, settings, "total"))
            await asyncio.sleep(0)

    async def one(n: int) -> None:
        ledger = pair[n % 2]
        while True:
            verdict = await ledger.admit(admission(n, time.time(), budgets=budget), hold=True)
            if not isinstance(verdict, Refusal):
                break
            if verdict.reason == "insufficient_quota":
                outcomes.append("refused")
                return
            await asyncio.sleep(0.001)  # in flight may settle for less: retry soon
        await asyncio.sleep(random.random() / 100)
        actual = random.randint(ESTIMATE // 2, ESTIMATE)  # caps honoured: at most the estimate
        settled = ledger.settle(
            event("alice", actual, now), reservation=f"r{n}", hit=None, tokens=0
        )
        assert await settled
        outcomes.append("admitted")

    try:
        async with asyncio.timeout(20):
            watching = spawn(watch(), name="test.watch")
            await asyncio.gather(*(one(n) for n in range(50)))
            done.set()
            await watching
        spent = (await pair[0].spent("alice", ["total"]))["total"]
    finally:
        await watcher.aclose()
    assert limit - ESTIMATE < max(seen) <= limit  # spent + reserved, at every moment seen
    assert spent <= limit  # actual ≤ estimate: no overshoot at all
    assert limit - spent < ESTIMATE  # and the budget was used up
    assert outcomes.count("admitted") >= 5 and "refused" in outcomes


async def test_rpm_is_exact_across_two_instances(pair: tuple[RedisLedger, RedisLedger]) -> None:
    now = time.time()
    verdicts = await asyncio.gather(
        *(pair[n % 2].admit(admission(n, now, rpm=10), hold=False) for n in range(40))
    )
    admitted = [v for v in verdicts if isinstance(v, int)]
    refused = [v for v in verdicts if isinstance(v, Refusal)]
    assert len(admitted) == 10
    assert len(refused) == 30 and {r.limit_name for r in refused} == {"rpm"}


async def test_scripts_the_server_lost_are_loaded_again(
    pair: tuple[RedisLedger, RedisLedger], redis_url: str, tmp_path: Path
) -> None:
    client = connect(settings_for(redis_url, tmp_path))
    try:
        await client.script_flush()  # as a restarted or failed-over server has none
    finally:
        await client.aclose()
    now = time.time()
    # Concurrent calls go out together, in one pipeline: each is retried once loaded.
    verdicts = await asyncio.gather(
        *(pair[0].admit(admission(n, now, rpm=100), hold=False) for n in range(10))
    )
    assert all(isinstance(v, int) for v in verdicts)
    assert await pair[1].settle(event("alice", 7, now), reservation=None, hit=None, tokens=0)


async def test_an_admission_whose_answer_was_lost_is_let_go_not_charged(
    redis_url: str, tmp_path: Path
) -> None:
    settings = updated(settings_for(redis_url, tmp_path / "a"), store={"timeout_s": 0.2})
    ledger = RedisLedger(connect(settings), settings, own_client=True)
    other = aioredis.Redis.from_url(redis_url)  # no deadline: it runs the busy script
    try:
        await ledger.open()
        now = time.time()
        budget = (("total", 10**6),)
        assert await ledger.admit(admission(0, now, budgets=budget), hold=True) is None
        assert await ledger.settle(None, reservation="r0", hit=None, tokens=0)
        # The server takes the call but runs it after the deadline (busy with another
        # script): the caller is told the ledger is unavailable, yet it is held.
        busy = spawn(other.eval(BUSY_LUA, 0), name="test.busy")
        await asyncio.sleep(0.1)
        with pytest.raises(LedgerUnavailableError):
            await ledger.admit(admission(1, now, budgets=budget, max_parallel=1), hold=True)
        await busy
        async with asyncio.timeout(5):
            while not await other.hexists(tagged(settings, "alice", "res"), "r1"):
                await asyncio.sleep(0.05)
        await ledger.expire(time.time())  # the upkeep lets it go: no charge, slot free
        assert await ledger.spent("alice", ["total"]) == {"total": 0}
        assert await ledger.admit(admission(2, now, max_parallel=1), hold=True) is None
    finally:
        await other.aclose()
        await ledger.close()


async def test_a_dead_instances_reservation_is_charged_once_by_the_first_upkeep(
    pair: tuple[RedisLedger, RedisLedger], redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    settings = settings_for(redis_url, tmp_path / "dead")
    dead = RedisLedger(connect(settings), settings, own_client=True)
    budget = (("total", 10**6),)
    assert await dead.admit(admission(1, now, budgets=budget, max_parallel=1), hold=True) is None
    await dead.close()  # the process dies holding r1: nothing settles it
    # Its slot is held until it expires, on every instance.
    refused = await pair[0].admit(admission(2, now, max_parallel=1), hold=True)
    assert isinstance(refused, Refusal) and refused.limit_name == "max_parallel"
    later = now + 61
    charged = await asyncio.gather(pair[0].expire(later), pair[1].expire(later))
    assert sorted(charged) == [0, 1]
    assert await pair[0].spent("alice", ["total"]) == {"total": ESTIMATE}
    assert await pair[1].expire(later + 1) == 0
    # The instance that charged it keeps the detail event, flagged as expired.
    await asyncio.gather(*(ledger.close() for ledger in pair))
    state = tmp_path / ("a" if charged[0] else "b")
    cells = usage_cells(state / "ledger.sqlite3", None, None)
    assert cells is not None
    assert [(c.outcome, c.estimated, c.micro_usd) for c in cells] == [("expired", 1, ESTIMATE)]


async def test_a_live_reservation_extended_by_its_holder_outlives_its_ttl_everywhere(
    pair: tuple[RedisLedger, RedisLedger],
) -> None:
    now = time.time()
    holder, other = pair
    assert await holder.admit(admission(1, now, max_parallel=1), hold=True) is None
    await holder.extend(["r1"], now + 600)  # the holder's upkeep: its request still runs
    assert await other.expire(now + 61) == 0  # past the first expiry: not charged
    refused = await other.admit(admission(2, now + 61, max_parallel=1), hold=True)
    assert isinstance(refused, Refusal) and refused.limit_name == "max_parallel"
    assert await holder.settle(event("alice", 30, now), reservation="r1", hit=None, tokens=0)
    assert await other.admit(admission(3, now + 61, max_parallel=1), hold=True) is None


async def test_money_in_flight_counts_live_reservations_only(
    pair: tuple[RedisLedger, RedisLedger], redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    budget = (("total", 2 * ESTIMATE),)
    assert await pair[0].admit(admission(1, now, budgets=budget), hold=True) is None
    assert await pair[1].admit(admission(2, now, budgets=budget), hold=True) is None
    full = await pair[0].admit(admission(3, now, budgets=budget), hold=True)
    assert isinstance(full, Refusal) and full.reason == "rate_limit_exceeded"
    # r1 and r2 expired (their holders died) but are not charged yet: not in flight.
    later = now + 61
    assert await pair[0].admit(admission(4, later, budgets=budget), hold=True) is None
    assert await pair[1].expire(later) == 2  # now they are spent
    spent = await pair[1].admit(admission(5, later, budgets=budget), hold=True)
    assert isinstance(spent, Refusal) and spent.reason == "insufficient_quota"
    assert await pair[0].settle(event("alice", 0, now), reservation="r4", hit=None, tokens=0)
    settings = settings_for(redis_url, tmp_path)
    client = connect(settings)
    try:  # nothing held any more: the running sum is back to zero
        held = await client.hget(tagged(settings, "alice", "res"), HELD_FIELD)
        assert int(held or 0) == 0
    finally:
        await client.aclose()


async def test_a_background_response_carried_on_one_instance_settles_on_another(
    pair: tuple[RedisLedger, RedisLedger],
) -> None:
    now = time.time()
    first = admission(1, now, budgets=(("total", 10**6),))
    assert await pair[0].admit(first, hold=True) is None
    await pair[0].carry("r1", "resp_1", now + 600, first)
    assert await pair[1].settle_ref("resp_1", event("alice", 30, now), now)  # a poll on B
    assert not await pair[0].settle_ref("resp_1", event("alice", 30, now), now)
    assert await pair[0].spent("alice", ["total"]) == {"total": 30}


async def test_every_key_the_ledger_writes_is_tagged_and_temporary_keys_expire(
    pair: tuple[RedisLedger, RedisLedger], redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    budget = (("total", 10**6),)
    assert isinstance(await pair[0].admit(admission(1, now, rpm=5, budgets=budget), hold=True), int)
    assert isinstance(await pair[0].admit(admission(2, now, rpm=5, budgets=budget), hold=True), int)
    assert await pair[0].settle(event("alice", 40, now), reservation="r1", hit=None, tokens=0)
    client = connect(settings_for(redis_url, tmp_path))
    try:
        ttls = {}
        for name in await client.keys("*"):
            text = name.decode()
            ttls[text.split("}:", 1)[-1]] = await client.ttl(name)
            assert text == "relayd:ledger:keys" or text.startswith("relayd:{alice}:")
    finally:
        await client.aclose()
    day, month, _ = windows_at(now, "UTC")
    assert 0 < ttls["hits"] <= 120
    assert 60 < ttls["held"] <= 60 + 86400 + 1  # its expiry and a day's grace for upkeep
    assert 2 * 86400 < ttls[f"spent:{day.name}"] <= 3 * 86400
    assert 31 * 86400 < ttls[f"spent:{month.name}"] <= 35 * 86400
    assert 399 * 86400 < ttls[f"usage:{day.name[4:]}"] <= 400 * 86400
    assert ttls["spent:total"] == -1  # the one that never ends


async def test_relayd_usage_on_any_instance_reports_every_instance(
    pair: tuple[RedisLedger, RedisLedger],
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = time.time()
    assert await pair[0].settle(event("alice", 1_000, now), reservation=None, hit=None, tokens=0)
    assert await pair[1].settle(event("bob", 2_500, now), reservation=None, hit=None, tokens=0)
    await pair[1].record([event("bob", 0, now, outcome="refused", reason="rate_limit_exceeded")])
    config = tmp_path / "relayd.toml"
    config.write_text(
        f'[store]\nbackend = "redis"\nredis_url = "{redis_url}"\n'
        "[spend.keys.alice]\nusd_per_day = 1.0\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    env.update(RELAYD_CONFIG=str(config), RELAYD_STATE_DIR=str(tmp_path / "third"))

    def usage(*args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "relayd", "usage", "--format", "json", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    # Each instance keeps its own detail events, locally.
    await asyncio.gather(*(ledger.close() for ledger in pair))
    local = [usage_cells(tmp_path / name / "ledger.sqlite3", None, None) for name in "ab"]
    assert [{c.key for c in cells or ()} for cells in local] == [{"alice"}, {"bob"}]
    by_key = {row["key"]: row for row in usage()}
    assert by_key["alice"]["micro_usd"] == 1_000 and by_key["alice"]["requests"] == 1
    assert by_key["bob"]["micro_usd"] == 2_500 and by_key["bob"]["requests"] == 2
    assert by_key["bob"]["refusals"] == {"rate_limit_exceeded": 1}
    assert by_key["alice"]["input_tokens"] == 11
    [line] = by_key["alice"]["budgets"]
    assert (line["limit"], line["spent_micro_usd"]) == ("usd_per_day", 1_000)
    # The same aggregates by day (in-process, in a thread as the CLI is synchronous).
    out = io.StringIO()
    shared = load_settings(str(config), require_upstream_key=False)
    by_day = functools.partial(report.usage, shared, since=None, until=None, by=["day"])
    assert await asyncio.to_thread(by_day, fmt="json", html=None, now=now, out=out) == 0
    [day] = json.loads(out.getvalue())
    assert (day["day"], day["micro_usd"]) == (windows_at(now, "UTC")[0].name[4:], 3_500)
    # The HTML page from the same aggregates.
    page = tmp_path / "usage.html"
    html = functools.partial(report.usage, shared, since=None, until=None, by=["key"])
    assert await asyncio.to_thread(html, fmt="table", html=str(page), now=now) == 0
    assert "alice" in page.read_text() and "bob" in page.read_text()
    # An instant selects its whole day there, and the report says so.
    out = io.StringIO()
    later = datetime.fromtimestamp(now, UTC).replace(hour=23, minute=59).isoformat()
    in_day = functools.partial(report.usage, shared, since=later, until=None, by=["key"])
    assert await asyncio.to_thread(in_day, fmt="json", html=None, now=now, out=out) == 0
    assert len(json.loads(out.getvalue())) == 2
    assert "select whole days" in capsys.readouterr().err
    # relayd prices check sees the models every instance used.
    out = io.StringIO()
    check = functools.partial(report.prices_check, shared, older_than_days=10**5)
    assert await asyncio.to_thread(check, today=date.today(), out=out) == 0
    out = io.StringIO()
    unknown = dataclasses.replace(event("bob", 0, now), model="gpt-unknown-test")
    settings = settings_for(redis_url, tmp_path / "c")
    third = RedisLedger(connect(settings), settings, own_client=True)
    await third.record([unknown])
    await third.close()
    assert await asyncio.to_thread(check, today=date.today(), out=out) == 1
    assert "unpriced  gpt-unknown-test  (1 events" in out.getvalue()


def _relay_sections(url: str, on_error: str) -> dict[str, Any]:
    return {
        "store": {"backend": "redis", "redis_url": url, "timeout_s": 0.3},
        "actions": {"signing_secret": SIGNING_SECRET},
        "spend": {
            "on_backend_error": on_error,
            "keys": {"team": KeyLimits(usd_per_day=10**6)},
        },
    }


async def _ask(relay: TestClient) -> int:
    body = {"model": "gpt-5", "input": "hi", "max_output_tokens": 3}
    headers = {"Authorization": f"Bearer {RELAY_KEY}"}
    async with asyncio.timeout(5):
        response = await relay.post("/v1/responses", json=body, headers=headers)
        await response.read()
    return response.status


@pytest.mark.parametrize("on_error", ["closed", "open"])
async def test_redis_stopped_then_back(
    relay_factory: RelayFactory, tmp_path: Path, on_error: str
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        relay = await relay_factory(
            _relay_sections(server.url, on_error), store={"dir": str(tmp_path)}
        )
        control = relay.app[SPEND]
        assert await _ask(relay) == 200
        await control.drain()
        server.stop()
        started = time.monotonic()
        status = await _ask(relay)
        assert time.monotonic() - started < 2.0  # bounded by [store] timeout, never a hang
        await control.drain()
        if on_error == "closed":
            assert status == 503
        else:
            assert status == 200 and control.spooled == 1
        server.start()  # an empty server on the same port: scripts are loaded again
        await control.upkeep()  # the spool is replayed; nothing restarted
        assert control.spooled == 0
        assert await _ask(relay) == 200
        await control.drain()
        windows = tuple(w.name for w in windows_at(time.time(), "UTC"))
        spent = await control.ledger.spent("team", windows[:1])  # type: ignore[union-attr]
        # What reached the new server: the spooled request (open) and the last one.
        assert spent[windows[0]] == (2 if on_error == "open" else 1) * 44
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("spend_backend", "store_backend", "ledger"),
    [
        (None, "local", "SqliteLedger"),
        (None, "redis", "RedisLedger"),
        ("sqlite", "local", "SqliteLedger"),  # the old name of "store"
        ("store", "redis", "RedisLedger"),
        ("off", "redis", None),
    ],
)
async def test_the_ledger_lives_where_the_store_is(
    spend_backend: str | None, store_backend: str, ledger: str | None, tmp_path: Path
) -> None:
    secret = write(tmp_path / "secret", SIGNING_SECRET)
    environ = {
        "OPENAI_API_KEY": "sk-test",
        "RELAYD_REDIS_URL": "redis://127.0.0.1:1/0",
        "RELAYD_SIGNING_SECRET_FILE": str(secret),
        **({"RELAYD_SPEND_BACKEND": spend_backend} if spend_backend else {}),
    }
    text = f'[store]\nbackend = "{store_backend}"\ndir = "{tmp_path}"\n'
    settings = load_settings(write(tmp_path / "relayd.toml", text), environ)
    app = create_app(settings)
    control = app[SPEND]
    assert type(control.ledger).__name__ == (ledger or "NoneType")
    if control.ledger is not None:
        await control.ledger.close()
    if (client := app[STORE_CLIENT]) is not None:
        await client.aclose()


def test_a_machine_ledger_under_a_shared_store_is_refused(tmp_path: Path) -> None:
    environ = {
        "OPENAI_API_KEY": "sk-test",
        "RELAYD_REDIS_URL": "redis://127.0.0.1:1/0",
        "RELAYD_SPEND_BACKEND": "sqlite",
    }
    with pytest.raises(ConfigError, match="set \\[spend\\] backend = 'store'"):
        load_settings(write(tmp_path / "relayd.toml", '[store]\nbackend = "redis"\n'), environ)
