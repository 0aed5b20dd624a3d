"""Spend control in one process: refusals, budgets, slots, prices, windows, the ledger.

relayd runs in-process in front of the fake upstream (tests/conftest.py); the fake's
answers carry ``usage`` (gpt-5: 11 input and 3 output tokens, 44 micro-dollars at
the shipped price). What the ledger recorded is read from its file after the
scheduled settlements are written (``SpendControl.drain``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relayd.config import KeyLimits
from relayd.spend.control import SpendControl
from relayd.state import SETTINGS, SPEND
from relayd.store import state_dir
from relayd.store.ledger import LEDGER_FILE
from tests.conftest import OTHER_KEY, RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI

# gpt-5 at the shipped price: 1.25 USD per million input tokens, 10 per million output.
FAKE_ANSWER_MICRO = 44  # 11 × 1.25 + 3 × 10 = 43.75, rounded up
AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
TEST_PRICES = """
[models."slow"]
input = 1.25
output = 10.0
source = "test"
checked = 2026-01-01
"""


def spend(*, prices: Path | None = None, **limits: Any) -> dict[str, Any]:
    """The [spend] section giving the relay key "team" these limits (dollars in
    micro-dollars, as KeyLimits keeps them)."""
    section: dict[str, Any] = {"keys": {"team": KeyLimits(**limits)}}
    if prices is not None:
        section["prices_file"] = str(prices)
    return section


async def ledger_rows(relay: TestClient, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    await relay.app[SPEND].drain()
    path = state_dir(relay.app[SETTINGS]) / LEDGER_FILE
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


async def wait_no_reservations(relay: TestClient) -> None:
    async with asyncio.timeout(3):
        while await ledger_rows(relay, "SELECT id FROM reservations"):
            await asyncio.sleep(0.02)


def ask(model: str = "gpt-5", **extra: Any) -> dict[str, Any]:
    return {"model": model, "input": "hi", "max_output_tokens": 3, **extra}


@pytest.fixture
def prices_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(TEST_PRICES)
    return path


# ----------------------------------------------------------------- refusals


async def test_budget_refusal_is_insufficient_quota_and_the_sdk_raises_once(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(spend=spend(usd_total=100))
    sdk = openai.AsyncOpenAI(
        base_url=str(relay.make_url("/v1")), api_key=RELAY_KEY, max_retries=3, timeout=10
    )
    async with sdk:
        for _ in range(2):  # 44 each, 49 reserved each: two fit in 100
            await sdk.responses.create(model="gpt-5", input="hi", max_output_tokens=3)
        calls = len(fake.seen)
        with pytest.raises(openai.RateLimitError) as raised:
            await sdk.responses.create(model="gpt-5", input="hi", max_output_tokens=3)
    assert raised.value.code == "insufficient_quota"
    assert raised.value.response.headers["x-should-retry"] == "false"
    message = raised.value.message
    assert "'team'" in message and "usd_total" in message and "never resets" in message
    # 88 of 100 spent: it is this request's estimate (49) that does not fit.
    assert "estimated cost does not fit in the $0.000012 left" in message
    assert RELAY_KEY not in message
    assert len(fake.seen) == calls  # nothing went upstream
    refused = await ledger_rows(
        relay, "SELECT reason FROM events WHERE outcome = 'refused' AND key = 'team'"
    )
    assert refused == [("insufficient_quota",)]  # the SDK did not retry
    spent = await ledger_rows(relay, "SELECT micro_usd FROM spent WHERE window = 'total'")
    assert spent == [(2 * FAKE_ANSWER_MICRO,)]


async def test_rpm_refusal_has_retry_after_and_relay_headers_apart_from_upstream_429(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(spend=spend(rpm=2))
    for _ in range(2):
        assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200
    refused = await relay.post("/v1/responses", json=ask(), headers=AUTH)
    assert refused.status == 429
    body = await refused.json()
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "'team'" in body["error"]["message"] and "rpm" in body["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-relay-ratelimit-limit-requests"] == "2"
    # Another key is not limited by team's rpm; upstream's own 429 passes unchanged.
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    upstream = await relay.post("/v1/responses", json=ask("error-429"), headers=other)
    assert upstream.status == 429
    assert not any(name.lower().startswith("x-relay-ratelimit") for name in upstream.headers)


async def test_model_rules_refuse_with_403_before_upstream(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(spend=spend(models=("gpt-5*",), usd_per_day=1_000_000))
    allowed = await relay.post("/v1/responses", json=ask("gpt-5-mini"), headers=AUTH)
    assert allowed.status == 200
    calls = len(fake.seen)
    denied = await relay.post("/v1/responses", json=ask("gpt-4o"), headers=AUTH)
    assert denied.status == 403
    assert (await denied.json())["error"]["code"] == "model_not_allowed"
    unpriced = await relay.post("/v1/responses", json=ask("gpt-5-unknown-x"), headers=AUTH)
    assert unpriced.status == 403
    assert (await unpriced.json())["error"]["code"] == "model_not_priced"
    assert len(fake.seen) == calls


async def test_allow_unpriced_lets_an_unknown_model_pass_counted_at_zero(
    relay_factory: RelayFactory,
) -> None:
    section = {**spend(usd_per_day=1_000_000), "allow_unpriced": True}
    relay = await relay_factory(spend=section)
    answer = await relay.post("/v1/responses", json=ask("gpt-5-unknown-x"), headers=AUTH)
    assert answer.status == 200
    rows = await ledger_rows(relay, "SELECT model, micro_usd, outcome FROM events")
    assert rows == [("gpt-5-unknown-x", 0, "ok")]


# ----------------------------------------------------------------- slots


async def _one_slot_free(relay: TestClient) -> None:
    await wait_no_reservations(relay)
    answer = await relay.post("/v1/responses", json=ask(), headers=AUTH)
    assert answer.status == 200, await answer.text()


async def test_parallel_slot_is_released_after_stream_end_5xx_and_timeout(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(spend=spend(max_parallel=1), upstream={"first_byte_timeout_s": 0.3})
    streamed = await relay.post("/v1/responses", json=ask(stream=True), headers=AUTH)
    assert streamed.status == 200
    await streamed.read()
    await _one_slot_free(relay)
    failed = await relay.post("/v1/responses", json=ask("error-500"), headers=AUTH)
    assert failed.status == 500
    await _one_slot_free(relay)
    timed_out = await relay.post("/v1/responses", json=ask("silent"), headers=AUTH)
    assert timed_out.status == 504
    await _one_slot_free(relay)
    outcomes = await ledger_rows(relay, "SELECT outcome, micro_usd FROM events ORDER BY id")
    assert ("failed", 0) in outcomes  # an upstream error is not charged


async def test_parallel_limit_refuses_while_a_stream_runs_and_a_hangup_frees_it(
    relay_factory: RelayFactory, fake: FakeOpenAI, prices_file: Path
) -> None:
    fake.pace = 0.5
    relay = await relay_factory(
        spend=spend(max_parallel=1, usd_total=1_000_000, prices=prices_file)
    )
    slow = await relay.post("/v1/responses", json=ask("slow", stream=True), headers=AUTH)
    assert slow.status == 200
    await slow.content.readany()
    busy = await relay.post("/v1/responses", json=ask(), headers=AUTH)
    assert busy.status == 429
    assert busy.headers["x-relay-ratelimit-limit-parallel"] == "1"
    slow.close()  # the client hangs up mid-stream
    await fake.wait_cancelled("/v1/responses", timeout=3)
    await _one_slot_free(relay)
    rows = await ledger_rows(
        relay, "SELECT outcome, estimated, input_tokens FROM events WHERE model = 'slow'"
    )
    assert len(rows) == 1
    outcome, estimated, input_tokens = rows[0]
    # The input was sent: charged at its estimate, flagged.
    assert outcome == "cancelled" and estimated == 1 and input_tokens > 0


# ----------------------------------------------------------------- budgets


async def test_a_stream_that_crosses_the_budget_completes_and_the_next_is_refused(
    relay_factory: RelayFactory,
) -> None:
    # Estimated at 15 input + 1 output tokens (29 micro-dollars): admitted under 40;
    # it costs 44, so it ends past the budget, whole.
    relay = await relay_factory(spend=spend(usd_total=40))
    streamed = await relay.post(
        "/v1/responses", json=ask(stream=True, max_output_tokens=1), headers=AUTH
    )
    text = (await streamed.read()).decode()
    assert streamed.status == 200 and "response.completed" in text
    refused = await relay.post("/v1/responses", json=ask(max_output_tokens=1), headers=AUTH)
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "insufficient_quota"
    rows = await ledger_rows(relay, "SELECT micro_usd, estimated FROM events WHERE outcome='ok'")
    assert rows == [(FAKE_ANSWER_MICRO, 0)]


async def test_cached_and_reasoning_tokens_are_priced_once(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    async def answer(request: web.Request) -> web.Response:
        usage = {
            "input_tokens": 1000,
            "input_tokens_details": {"cached_tokens": 800},
            "output_tokens": 500,
            "output_tokens_details": {"reasoning_tokens": 400},
            "total_tokens": 1500,
        }
        return web.json_response({"id": "resp_1", "model": "gpt-5", "usage": usage})

    fake.script("POST", "/v1/responses", answer)
    relay = await relay_factory(spend=spend(usd_total=1_000_000))
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200
    rows = await ledger_rows(
        relay,
        "SELECT micro_usd, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens"
        " FROM events",
    )
    # 200 fresh × 1.25 + 800 cached × 0.125 + 500 output × 10 (reasoning inside it).
    assert rows == [(250 + 100 + 5000, 1000, 800, 500, 400)]


async def test_day_budget_resets_at_midnight_in_the_configured_zone(
    relay_factory: RelayFactory,
) -> None:
    zone = ZoneInfo("America/New_York")
    # Ahead of the real clock, so the upkeep's first round (on the real clock) never
    # takes these reservations for expired ones.
    now = [datetime(2027, 3, 7, 23, 59, 50, tzinfo=zone).timestamp()]
    section = {**spend(usd_per_day=50), "timezone": "America/New_York"}
    relay = await relay_factory(spend=section)
    control: SpendControl = relay.app[SPEND]
    control.clock = lambda: now[0]
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200
    await control.drain()
    refused = await relay.post("/v1/responses", json=ask(), headers=AUTH)
    assert refused.status == 429
    message = (await refused.json())["error"]["message"]
    assert "usd_per_day" in message and "2027-03-08T00:00:00-05:00" in message
    assert int(refused.headers["retry-after"]) <= 10
    now[0] = datetime(2027, 3, 8, 0, 0, 1, tzinfo=zone).timestamp()  # a new day there
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200
    windows = await ledger_rows(relay, "SELECT window, micro_usd FROM spent ORDER BY window")
    assert ("day:2027-03-07", FAKE_ANSWER_MICRO) in windows
    assert ("day:2027-03-08", FAKE_ANSWER_MICRO) in windows
    assert ("month:2027-03", 2 * FAKE_ANSWER_MICRO) in windows


# ----------------------------------------------------------------- surfaces


async def test_every_metered_surface_counts(
    relay_factory: RelayFactory, fake: FakeOpenAI, auth: Mapping[str, str]
) -> None:
    relay = await relay_factory(spend=spend(usd_total=1_000_000), actions={"poll_interval_s": 0.05})
    calls = {
        "/v1/responses": ask(),
        "/v1/responses:stream": ask(),
        "/v1/chat/completions": {"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]},
        "/v1/embeddings": {"model": "text-embedding-3-small", "input": "hi"},
        "/v1/actions/responses": {"input": "hi", "model": "gpt-5"},
        "/v1/actions/responses/stream": {"input": "hi", "model": "gpt-5"},
        "/v1/proxy": {"method": "POST", "path": "/v1/responses", "body": ask()},
    }
    for path, body in calls.items():
        answer = await relay.post(path, json=body, headers=auth)
        assert answer.status == 200, (path, await answer.text())
        await answer.read()
    # A background response started by pass-through settles when a poll sees it end.
    started = await relay.post("/v1/responses", json=ask(background=True), headers=auth)
    rid = (await started.json())["id"]
    held = await ledger_rows(relay, "SELECT ref FROM reservations")
    assert held == [(rid,)]
    polled = await relay.get(f"/v1/responses/{rid}", headers=auth)
    assert (await polled.json())["status"] == "completed"
    await wait_no_reservations(relay)
    rows = await ledger_rows(
        relay, "SELECT operation, micro_usd > 0 FROM events WHERE outcome = 'ok' ORDER BY id"
    )
    operations = [op for op, paid in rows if paid]
    # JSON, the two Actions wrappers, the proxy envelope and the background response.
    assert operations.count("createResponse") == 5
    assert {"createResponseStream", "createChatCompletion", "createEmbedding"} <= set(operations)
    assert len(operations) == 8


async def test_store_locked_closed_refuses_with_503(relay_factory: RelayFactory) -> None:
    # rpm 5 leaves no room to lease: every admission asks the store
    # (docs/spend.md#leases).
    relay = await relay_factory(spend=spend(rpm=5), store={"busy_timeout_s": 0.1})
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200
    with _locked(relay):
        refused = await relay.post("/v1/responses", json=ask(), headers=AUTH)
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "store_unavailable"
    # Recovery without a restart.
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200


async def test_store_locked_open_passes_spools_and_replays(relay_factory: RelayFactory) -> None:
    section = {**spend(rpm=5), "on_backend_error": "open"}
    relay = await relay_factory(spend=section, store={"busy_timeout_s": 0.1})
    control: SpendControl = relay.app[SPEND]
    with _locked(relay):
        for _ in range(3):
            assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200
        await control.drain()
        assert control.spooled == 3
    await control.upkeep()
    assert control.spooled == 0
    rows = await ledger_rows(relay, "SELECT count(*), sum(micro_usd) FROM events")
    assert rows == [(3, 3 * FAKE_ANSWER_MICRO)]


class _locked:
    """Another process's write lock on the ledger, held past the busy timeout."""

    def __init__(self, relay: TestClient) -> None:
        self.path = state_dir(relay.app[SETTINGS]) / LEDGER_FILE

    def __enter__(self) -> None:
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("BEGIN EXCLUSIVE")

    def __exit__(self, *exc: object) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


async def test_settings_reload_applies_new_limits(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(spend=spend(rpm=1))
    control: SpendControl = relay.app[SPEND]
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 429
    from relayd.config import updated

    fresh = updated(control.settings, spend={"keys": {"team": KeyLimits(rpm=5)}})
    control.reload(fresh, control.prices)
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200


def test_json_of_a_request_never_reaches_the_ledger_text() -> None:
    # The ledger stores names and numbers only: a key or a prompt has no column.
    from relayd.store.ledger import MIGRATIONS

    assert "prompt" not in MIGRATIONS[0] and "secret" not in json.dumps(MIGRATIONS)


# ----------------------------------------------------------------- realtime

REALTIME = "/v1/realtime?model=gpt-realtime"
REALTIME_MICRO = 25 * 4 + 12 * 16  # the fake's response.done usage at gpt-realtime's price


async def _one_response(ws: Any) -> None:
    await ws.send_str(json.dumps({"type": "response.create"}))
    async with asyncio.timeout(3):
        while True:
            event = json.loads((await ws.receive()).data)
            if event["type"] == "response.done":
                return


async def test_realtime_prices_each_response_done_and_frees_its_slot_at_close(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(spend=spend(max_parallel=1, usd_total=1_000_000))
    async with relay.ws_connect(REALTIME, headers=AUTH) as ws:
        await _one_response(ws)
        await _one_response(ws)
        # At its parallel limit: the next session is refused before any upgrade.
        with pytest.raises(Exception) as refused:
            await relay.ws_connect(REALTIME, headers=AUTH)
        assert getattr(refused.value, "status", None) == 429
    await wait_no_reservations(relay)
    async with relay.ws_connect(REALTIME, headers=AUTH):
        pass  # the slot came back when the first session closed
    rows = await ledger_rows(
        relay, "SELECT operation, model, micro_usd FROM events WHERE outcome = 'ok'"
    )
    assert rows == [("connectRealtime", "gpt-realtime", REALTIME_MICRO)] * 2


async def test_realtime_over_budget_is_refused_before_the_upgrade(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(spend=spend(usd_total=REALTIME_MICRO))
    async with relay.ws_connect(REALTIME, headers=AUTH) as ws:
        await _one_response(ws)
    await relay.app[SPEND].drain()
    response = await relay.get(
        REALTIME,
        headers={
            **AUTH,
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert response.status == 429
    body = await response.json()
    assert body["error"]["code"] == "insufficient_quota"
    assert response.headers["x-should-retry"] == "false"


async def test_chat_streams_settle_their_usage_when_asked_else_the_estimate_flagged(
    relay_factory: RelayFactory,
) -> None:
    # relayd never changes a client's stream_options (docs/spend.md#chat-streams).
    relay = await relay_factory(spend=spend(usd_total=1_000_000))
    chat = {"model": "gpt-5", "messages": [{"role": "user", "content": "x"}], "stream": True}
    asked = {**chat, "stream_options": {"include_usage": True}, "max_completion_tokens": 9}
    for body in (asked, {**chat, "max_completion_tokens": 9}):
        answer = await relay.post("/v1/chat/completions", json=body, headers=AUTH)
        assert answer.status == 200
        text = (await answer.read()).decode()
        assert ('"usage"' in text) is (body is asked)  # the client's bytes, unchanged
    rows = await ledger_rows(
        relay, "SELECT input_tokens, output_tokens, estimated FROM events ORDER BY id"
    )
    assert rows[0] == (5, 3, 0)  # priced from the usage chunk
    assert rows[1][1:] == (9, 1)  # its own output cap, flagged as an estimate


async def test_tpm_counts_estimates_then_actual_tokens(relay_factory: RelayFactory) -> None:
    # Estimated 18 tokens (15 in, 3 out) fit 20; it used 14; 14 + 18 does not fit.
    relay = await relay_factory(spend=spend(tpm=20))
    assert (await relay.post("/v1/responses", json=ask(), headers=AUTH)).status == 200
    await relay.app[SPEND].drain()
    refused = await relay.post("/v1/responses", json=ask(), headers=AUTH)
    assert refused.status == 429
    assert refused.headers["x-relay-ratelimit-limit-tokens"] == "20"
    assert "tpm" in (await refused.json())["error"]["message"]


async def test_a_background_answer_of_a_key_without_limits_is_recorded_when_polled(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(actions={"poll_interval_s": 0.05})
    answer = await relay.post(
        "/v1/actions/responses", json={"input": "hi", "model": "gpt-5"}, headers=AUTH
    )
    assert (await answer.json())["status"] == "completed"
    await wait_no_reservations(relay)
    rows = await ledger_rows(relay, "SELECT key, operation, micro_usd FROM events")
    assert rows == [("team", "createResponse", FAKE_ANSWER_MICRO)]


async def test_images_without_usage_are_charged_their_flat_price(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(spend=spend(usd_total=1_000_000))
    body = {"model": "dall-e-3", "prompt": "a cat", "n": 2, "size": "1024x1024"}
    answer = await relay.post("/v1/images/generations", json=body, headers=AUTH)
    assert answer.status == 200
    rows = await ledger_rows(relay, "SELECT operation, micro_usd, estimated FROM events")
    assert rows == [("createImage", 2 * 40_000, 0)]  # dall-e-3, 1024x1024: $0.04 each


async def test_realtime_response_create_is_refused_mid_session_once_over_budget(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(spend=spend(usd_total=REALTIME_MICRO))
    async with relay.ws_connect(REALTIME, headers=AUTH) as ws:
        await _one_response(ws)  # spends the whole budget
        refused = None
        async with asyncio.timeout(5):
            while refused is None:  # the gate arms once the spend is written
                await ws.send_str(json.dumps({"type": "response.create", "event_id": "e9"}))
                while True:
                    event = json.loads((await ws.receive()).data)
                    if event["type"] == "error":
                        refused = event
                        break
                    if event["type"] == "response.done":
                        break
        # Audio and other events still pass both ways; only response.create is held.
        await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}))
    assert refused["error"]["code"] == "insufficient_quota"
    assert refused["error"]["event_id"] == "e9"
    sent = [json.loads(data) for _, data in fake.realtime.last().frames]
    creates = [e for e in sent if e.get("type") == "response.create"]
    done = await ledger_rows(relay, "SELECT count(*) FROM events WHERE outcome = 'ok'")
    assert len(creates) == done[0][0]  # the refused one never reached upstream
    async with asyncio.timeout(3):
        while not any(e.get("type") == "input_audio_buffer.append" for e in sent):
            await asyncio.sleep(0.02)
            sent = [json.loads(data) for _, data in fake.realtime.last().frames]


async def test_a_multipart_model_is_read_ahead_and_the_body_passes_unchanged(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(spend=spend(models=("gpt-4o-transcribe",), usd_total=1_000_000))
    audio = bytes(range(256)) * 1024  # 256 KiB: past the read-ahead
    sdk = openai.AsyncOpenAI(
        base_url=str(relay.make_url("/v1")), api_key=RELAY_KEY, max_retries=0, timeout=10
    )
    async with sdk:
        await sdk.audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("a.wav", audio, "audio/wav")
        )
        seen = fake.last("/v1/audio/transcriptions")
        assert [p["name"] for p in seen.parts] == ["model", "file"]
        assert next(p for p in seen.parts if p["name"] == "file")["size"] == len(audio)
        calls = len(fake.seen)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await sdk.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
    assert denied.value.code == "model_not_allowed"
    assert len(fake.seen) == calls
    rows = await ledger_rows(relay, "SELECT model, outcome FROM events ORDER BY id")
    assert rows == [("gpt-4o-transcribe", "ok"), ("whisper-1", "refused")]
