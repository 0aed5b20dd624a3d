"""Spend control across real ``relayd serve`` processes: workers, restarts, kills.

The ledger is one SQLite file in the state directory ($XDG_STATE_HOME/relayd here,
set per test by tests/conftest.py) shared by every worker; these tests read it
directly. The fake upstream answers gpt-5 with 11 input and 3 output tokens (44
micro-dollars); a request asking for 3 output tokens is estimated at 49.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from relayd.store.ledger import LEDGER_FILE
from tests.conftest import RELAY_KEY
from tests.fakes.openai import FakeOpenAI
from tests.test_daemon import Start, _env, start

__all__ = ["start"]  # the fixture, shared with test_daemon

pytestmark = pytest.mark.process

AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
ASK = {"model": "gpt-5", "input": "hi", "max_output_tokens": 3}
ANSWER_MICRO = 44


def _config(tmp_path: Path, limits: str, spend: str = "") -> Path:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[models."slow"]\ninput = 1.25\noutput = 10.0\nsource = "test"\nchecked = 2026-01-01\n'
    )
    path = tmp_path / "relayd.toml"
    path.write_text(f'[spend]\nprices_file = "{prices}"\n{spend}\n[spend.keys.team]\n{limits}\n')
    return path


def _ledger() -> Path:
    return Path(os.environ["XDG_STATE_HOME"]) / "relayd" / LEDGER_FILE


def _query(sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(_ledger())
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def _settled(expected_events: int) -> None:
    """Settlements are written off the answer's path: wait (bounded) for them."""
    async with asyncio.timeout(5):
        while _query("SELECT count(*) FROM events")[0][0] < expected_events:
            await asyncio.sleep(0.05)


async def _serve(start: Start, fake_server: TestServer, config: Path, workers: str = "1") -> Any:
    env = _env(str(fake_server.make_url("")).rstrip("/"), RELAYD_CONFIG=str(config))
    relayd = await start(env=env, serve_args=("--workers", workers))
    if workers != "1":
        await relayd.wait_line(f"{workers} workers serving")
    return relayd


async def _post(session: aiohttp.ClientSession, url: str, body: Any = ASK) -> tuple[int, str]:
    async with session.post(url, json=body, headers=AUTH) as answer:
        payload = await answer.json() if answer.status != 200 else {}
        return answer.status, (payload.get("error") or {}).get("code", "")


async def test_budget_is_not_overshot_by_50_parallel_requests_on_2_workers(
    start: Start, fake_server: TestServer, tmp_path: Path
) -> None:
    budget = 5 * ANSWER_MICRO  # fits about five answers
    relayd = await _serve(
        start, fake_server, _config(tmp_path, f"usd_total = {budget / 1e6}"), workers="2"
    )
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        results = await asyncio.gather(
            *(_post(session, relayd.url("/v1/responses")) for _ in range(50))
        )
    admitted = sum(1 for status, _ in results if status == 200)
    refused = {code for status, code in results if status == 429}
    assert 1 <= admitted <= 5
    assert refused <= {"insufficient_quota", "rate_limit_exceeded"}
    assert admitted + sum(1 for status, _ in results if status == 429) == 50
    await _settled(50)
    (spent,) = _query("SELECT micro_usd FROM spent WHERE key = 'team' AND window = 'total'")[0]
    # The bound: each answer cost less than its estimate, so no overshoot at all.
    assert spent == admitted * ANSWER_MICRO <= budget


async def test_rpm_is_exact_across_2_workers(
    start: Start, fake_server: TestServer, tmp_path: Path
) -> None:
    relayd = await _serve(start, fake_server, _config(tmp_path, "rpm = 10"), workers="2")
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        results = await asyncio.gather(
            *(_post(session, relayd.url("/v1/responses")) for _ in range(40))
        )
    assert sum(1 for status, _ in results if status == 200) == 10
    assert {code for status, code in results if status != 200} == {"rate_limit_exceeded"}


async def test_spend_survives_sigterm_and_restart(
    start: Start, fake_server: TestServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, f"usd_total = {100 / 1e6}")
    first = await _serve(start, fake_server, config)
    async with aiohttp.ClientSession() as session:
        assert (await _post(session, first.url("/v1/responses")))[0] == 200
        assert (await _post(session, first.url("/v1/responses")))[0] == 200
    assert await first.stop() == 0
    second = await _serve(start, fake_server, config)
    async with aiohttp.ClientSession() as session:
        assert await _post(session, second.url("/v1/responses")) == (429, "insufficient_quota")


async def test_sigkill_mid_stream_leaves_a_reservation_that_expires_to_its_estimate(
    start: Start, fake_server: TestServer, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.pace = 0.5  # model "slow": one event every half second
    config = _config(tmp_path, "max_parallel = 1\nusd_total = 1.0", spend="reservation_ttl = 5")
    first = await _serve(start, fake_server, config)
    session = aiohttp.ClientSession()
    try:
        stream = await session.post(
            first.url("/v1/responses"), json={**ASK, "model": "slow", "stream": True}, headers=AUTH
        )
        assert stream.status == 200
        await stream.content.readany()
        os.killpg(first.process.pid, signal.SIGKILL)
        await first.process.wait()
    finally:
        await session.close()
    assert len(_query("SELECT id FROM reservations")) == 1
    second = await _serve(start, fake_server, config)
    async with aiohttp.ClientSession() as session, asyncio.timeout(15):
        # The dead stream still holds the key's one slot: never a free extra one.
        assert await _post(session, second.url("/v1/responses")) == (429, "rate_limit_exceeded")
        while (await _post(session, second.url("/v1/responses")))[0] != 200:
            await asyncio.sleep(0.5)  # the reservation expires within its TTL
        # The new process's upkeep charges the dead reservation at its estimate.
        query = "SELECT model, micro_usd, estimated FROM events WHERE outcome = 'expired'"
        while not (expired := _query(query)):
            await asyncio.sleep(0.2)
    assert len(expired) == 1
    model, micro, estimated = expired[0]
    assert model == "slow" and micro > 0 and estimated == 1
