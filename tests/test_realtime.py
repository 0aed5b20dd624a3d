"""Realtime: the WebSocket bridge (SDK and browser clients) and the realtime REST routes."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from relayd.config import ConfigError, RelayKey, load_settings
from relayd.handlers import realtime as realtime_handler
from relayd.routes import TABLE
from relayd.state import KEYRING, METRICS
from relayd.streams.websocket import sendable_close_code
from tests.conftest import OTHER_KEY, RELAY_KEY, RelayFactory
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI
from tests.fakes.realtime import USAGE
from tests.rawhttp import head, open_raw, read_head, websocket_upgrade

BOUND = 5.0  # seconds any single wait in this file may take
URL = "/v1/realtime?model=gpt-realtime"
AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
KEY_PROTOCOL = f"openai-insecure-api-key.{RELAY_KEY}"
EPHEMERAL = "ek_canary_ephemeral_0123456789"


async def until(predicate: Callable[[], Any]) -> None:
    async with asyncio.timeout(BOUND):
        while not predicate():
            await asyncio.sleep(0.01)


async def raw_handshake(
    relay: TestClient, path: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    """A WebSocket handshake sent as a plain GET, so a refusal's body can be read."""
    async with asyncio.timeout(BOUND):
        response = await relay.get(path, headers={**websocket_upgrade(), **(headers or {})})
        await response.read()
    return response


def realtime_log(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "relayd.realtime" and r.getMessage() == "realtime session"
    ]


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No traceback from aiohttp's server and no lost task exception, in any test."""
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


# --------------------------------------------------------------------------- SDK


async def test_sdk_session_update_round_trips_through_the_bridge(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(BOUND):
        async with sdk.realtime.connect(model="gpt-realtime") as connection:
            await connection.session.update(
                session={"type": "realtime", "instructions": "Answer briefly."}
            )
            event = await connection.recv()
    assert event.type == "session.updated"
    assert event.session.instructions == "Answer briefly."  # type: ignore[union-attr]
    handshake = fake.realtime.last()
    assert handshake.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert handshake.query == {"model": "gpt-realtime"}
    assert RELAY_KEY not in str(handshake)
    await until(lambda: fake.realtime.last().close_code is not None)
    assert fake.realtime.last().close_code == 1000  # the SDK's own close, passed on


# --------------------------------------------------------------------------- frames and closes


async def test_browser_subprotocol_auth_selects_realtime_and_never_forwards_the_key(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, protocols=("realtime", KEY_PROTOCOL)) as ws:
            assert ws.protocol == "realtime"
    handshake = fake.realtime.last()
    assert handshake.protocols == ["realtime"]
    assert handshake.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert RELAY_KEY not in str(handshake)


async def test_text_and_binary_frames_pass_both_ways_unchanged(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    # Odd spacing and non-ASCII text: a bridge that re-serialised would change them.
    text = '{"type": "conversation.item.create",  "item": {"text": "héllo ✓", "x": ""} }'
    blob = bytes(range(256)) * 64
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            await ws.send_str(text)
            echoed = await ws.receive()
            assert (echoed.type, echoed.data) == (WSMsgType.TEXT, text)
            await ws.send_bytes(blob)
            echoed = await ws.receive()
            assert (echoed.type, echoed.data) == (WSMsgType.BINARY, blob)
    assert fake.realtime.last().frames == [(WSMsgType.TEXT, text), (WSMsgType.BINARY, blob)]


async def test_client_close_code_and_reason_reach_upstream(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(BOUND):
        ws = await relay.ws_connect(URL, headers=AUTH)
        await ws.close(code=4001, message=b"bye now")
    await until(lambda: fake.realtime.last().close_code is not None)
    session = fake.realtime.last()
    assert (session.close_code, session.close_reason) == (4001, "bye now")
    assert ws.close_code == 4001  # relayd answered the client's close in kind


async def test_upstream_close_code_and_reason_reach_the_client(relay: TestClient) -> None:
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            await ws.send_str(json.dumps({"type": "test.close", "code": 4003, "reason": "kicked"}))
            msg = await ws.receive()
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4003, "kicked")


async def test_upstream_that_vanishes_closes_the_client_with_1011(
    relay: TestClient, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            await ws.send_str(json.dumps({"type": "test.vanish"}))
            msg = await ws.receive()
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)
    await until(lambda: realtime_log(caplog))
    line = realtime_log(caplog)[0]
    assert (line["ended_by"], line["upstream_close"], line["client_close"]) == (
        "upstream_lost",
        1006,
        1011,
    )


async def test_client_that_vanishes_leaves_upstream_with_1011(
    relay: TestClient, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    upgrade = {**AUTH, **websocket_upgrade()}
    async with asyncio.timeout(BOUND):
        reader, writer = await open_raw(relay)
        writer.write(head("GET", URL, upgrade))
        status, _ = await read_head(reader)
        assert status == 101
        await until(lambda: fake.realtime.sessions and fake.realtime.last().accepted)
        writer.transport.abort()  # no CLOSE frame, no FIN handshake
    await until(lambda: fake.realtime.last().close_code is not None)
    session = fake.realtime.last()
    assert (session.close_code, session.close_reason) == (1011, "downstream connection lost")
    await until(lambda: realtime_log(caplog))
    assert realtime_log(caplog)[0]["ended_by"] == "downstream_lost"


async def test_upstream_that_stops_answering_pings_is_dropped(
    relay: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(realtime_handler, "HEARTBEAT_S", 0.5)  # pong due within 0.25 s
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect("/v1/realtime?model=deaf", headers=AUTH) as ws:
            msg = await ws.receive()
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)


async def test_older_path_bridges_to_the_same_upstream(relay: TestClient, fake: FakeOpenAI) -> None:
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect("/v1/realtime/ws?model=gpt-realtime", headers=AUTH) as ws:
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive()).data == b"\x00\x01"
    assert fake.realtime.last().query == {"model": "gpt-realtime"}


@pytest.mark.parametrize(
    "query", ["call_id=rtc_0123", "intent=transcription"], ids=["call_id", "intent"]
)
async def test_call_id_and_intent_are_forwarded(
    relay: TestClient, fake: FakeOpenAI, query: str
) -> None:
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(f"/v1/realtime?{query}", headers=AUTH):
            pass
    name, value = query.split("=")
    assert fake.realtime.last().query == {name: value}


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    ("headers", "protocols"),
    [
        (AUTH, ("realtime", f"openai-insecure-api-key.{EPHEMERAL}")),
        ({"X-Relay-Key": RELAY_KEY, "Authorization": f"Bearer {EPHEMERAL}"}, ()),
        ({}, ("realtime", f"openai-insecure-api-key.{EPHEMERAL}", KEY_PROTOCOL)),
    ],
    ids=["bearer-key-subprotocol-secret", "header-key-bearer-secret", "browser-both"],
)
async def test_ephemeral_secret_goes_upstream_instead_of_the_upstream_key(
    relay_factory: RelayFactory,
    fake: FakeOpenAI,
    headers: dict[str, str],
    protocols: tuple[str, ...],
) -> None:
    relay = await relay_factory(upstream={"organization": "org-team"})
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=headers, protocols=protocols) as ws:
            await ws.send_str("ping")
            assert (await ws.receive()).data == "ping"
    handshake = fake.realtime.last()
    assert handshake.headers["Authorization"] == f"Bearer {EPHEMERAL}"
    assert "OpenAI-Organization" not in handshake.headers  # the secret carries its own
    assert not any(p.startswith("openai-insecure-api-key.") for p in handshake.protocols)
    assert RELAY_KEY not in str(handshake) and UPSTREAM_KEY not in str(handshake)


async def test_upstream_key_dials_with_the_configured_organization(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(upstream={"organization": "org-team"})
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers={**AUTH, "Origin": "https://app.example"}):
            pass
    handshake = fake.realtime.last()
    assert handshake.headers["OpenAI-Organization"] == "org-team"
    assert "Origin" not in handshake.headers


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer rk-wrong-key-0123456789abcdef"},
        {"Authorization": f"Bearer {EPHEMERAL}"},
    ],
    ids=["missing", "wrong", "ephemeral-only"],
)
async def test_without_a_relay_key_the_handshake_is_a_401_and_nothing_goes_upstream(
    relay: TestClient, fake: FakeOpenAI, headers: dict[str, str]
) -> None:
    response = await raw_handshake(relay, URL, headers)
    assert response.status == 401
    assert (await response.json())["error"]["type"] == "invalid_request_error"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with asyncio.timeout(BOUND):
            await relay.ws_connect(URL, headers=headers)
    assert refused.value.status == 401
    assert fake.realtime.sessions == []


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_upstream_refusal_is_an_http_error_not_an_upgrade(
    relay: TestClient, fake: FakeOpenAI, status: int
) -> None:
    path = f"/v1/realtime?model=refuse-{status}"
    response = await raw_handshake(relay, path, AUTH)
    assert response.status == status
    error = (await response.json())["error"]
    assert str(status) in error["message"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with asyncio.timeout(BOUND):
            await relay.ws_connect(path, headers=AUTH)
    assert refused.value.status == status
    assert all(not s.accepted for s in fake.realtime.sessions)


async def test_disabled_realtime_is_a_403_before_the_upgrade(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(realtime={"enabled": False})
    response = await raw_handshake(relay, URL, AUTH)
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "realtime_disabled"
    assert fake.realtime.sessions == []


@pytest.mark.parametrize(
    "query",
    [
        "",
        "model=gpt-realtime&intent=transcription",
        "model=gpt-realtime&call_id=rtc_1",
        "model=",
        "model=a&model=b",
    ],
    ids=["none", "model-and-intent", "model-and-call_id", "empty", "repeated"],
)
async def test_a_query_that_names_no_single_session_is_a_400(
    relay: TestClient, fake: FakeOpenAI, query: str
) -> None:
    response = await raw_handshake(relay, f"/v1/realtime?{query}", AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_realtime_query"
    assert fake.realtime.sessions == []


@pytest.mark.parametrize(
    "query",
    [
        "Model=gpt-4o-realtime-preview",
        "model[]=gpt-4o-realtime-preview",
        "model=gpt-realtime&Model=gpt-4o-realtime-preview",
        "model=gpt-realtime&debug=1",
        "call_id=rtc_1&call_id=rtc_2",
        "intent=transcription&intent=transcription",
    ],
    ids=["capitalised", "array", "shadowed", "unknown", "repeated-call_id", "repeated-intent"],
)
async def test_unknown_or_repeated_query_parameters_on_the_bridge_are_a_400(
    relay_factory: RelayFactory, fake: FakeOpenAI, query: str
) -> None:
    relay = await relay_factory(realtime={"allowed_models": ("gpt-realtime",)})
    response = await raw_handshake(relay, f"/v1/realtime?{query}", AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_realtime_query"
    assert fake.realtime.sessions == []


async def test_a_call_id_bridge_is_allowed_when_models_are_restricted(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    # The call's model was checked when the call was created or accepted through
    # relayd (or fixed by a client secret relayd minted and checked).
    relay = await relay_factory(realtime={"allowed_models": ("gpt-realtime",)})
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect("/v1/realtime?call_id=rtc_0123", headers=AUTH):
            pass
    assert fake.realtime.last().query == {"call_id": "rtc_0123"}


async def test_a_model_outside_allowed_models_is_a_400_before_the_upgrade(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(realtime={"allowed_models": ("gpt-realtime",)})
    response = await raw_handshake(relay, "/v1/realtime?model=gpt-4o-realtime-preview", AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "model"
    assert fake.realtime.sessions == []


async def test_a_plain_get_is_told_to_upgrade(relay: TestClient) -> None:
    async with asyncio.timeout(BOUND):
        response = await relay.get(URL, headers=AUTH)
    assert response.status == 426
    assert response.headers["Upgrade"] == "websocket"


async def test_oversized_client_message_closes_with_1009_and_upstream_with_1011(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(realtime={"max_message_bytes": 1024})
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            for _ in range(3):  # the limit itself is allowed, on either path of the bridge
                await ws.send_str("x" * 1024)
                assert (await ws.receive()).data == "x" * 1024
            await ws.send_str("x" * 1025)
            msg = await ws.receive()
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    await until(lambda: fake.realtime.last().close_code is not None)
    assert fake.realtime.last().close_code == 1011


async def test_unreachable_upstream_is_a_502_before_the_upgrade(
    relay_factory: RelayFactory,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = await relay_factory(upstream={"url": f"http://127.0.0.1:{port}"})
    response = await raw_handshake(relay, URL, AUTH)
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_unreachable"


async def test_a_full_upstream_pool_is_a_503_before_the_upgrade(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(upstream={"max_connections": 1})
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH):
            response = await raw_handshake(relay, URL, AUTH)
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
        assert len(fake.realtime.sessions) == 1
        async with relay.ws_connect(URL, headers=AUTH):  # the slot is free again
            pass


@pytest.mark.parametrize(
    ("received", "sent"),
    [(4001, 4001), (1000, 1000), (0, 1000), (1005, 1000), (1006, 1011), (1015, 1011), (None, 1011)],
)
def test_close_codes_that_cannot_be_sent_are_mapped(received: int | None, sent: int) -> None:
    assert sendable_close_code(received) == sent


# --------------------------------------------------------------------------- limits and shutdown


async def test_idle_session_is_closed_on_both_legs(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(realtime={"idle_timeout_s": 0.5})
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            started = loop.time()
            for _ in range(4):  # frames keep the session alive past the idle limit
                await asyncio.sleep(0.1)
                await ws.send_str("tick")
                assert (await ws.receive()).data == "tick"
            msg = await ws.receive()
            lasted = loop.time() - started
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
    assert lasted > 0.8  # four ticks, then a full idle period
    await until(lambda: fake.realtime.last().close_code is not None)
    assert fake.realtime.last().close_code == 1001


async def test_session_is_closed_at_the_time_limit(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(realtime={"max_session_s": 0.3})
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            msg = await ws.receive()
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1008)
    await until(lambda: fake.realtime.last().close_code is not None)
    assert fake.realtime.last().close_code == 1008


async def test_shutdown_closes_open_bridges_with_1001(relay: TestClient, fake: FakeOpenAI) -> None:
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            await ws.send_str("hello")
            await ws.receive()
            await relay.app.shutdown()
            msg = await ws.receive()
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "server shutting down")
    await until(lambda: fake.realtime.last().close_code is not None)
    assert fake.realtime.last().close_code == 1001


# --------------------------------------------------------------------------- accounting


async def test_one_log_line_per_session_with_usage_from_response_done(
    relay: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, headers=AUTH) as ws:
            for _ in range(2):
                await ws.send_str(json.dumps({"type": "response.create"}))
                assert json.loads((await ws.receive()).data)["type"] == "response.created"
                assert json.loads((await ws.receive()).data)["type"] == "response.done"
    await until(lambda: realtime_log(caplog))
    [line] = realtime_log(caplog)
    assert line["key"] == "team" and line["model"] == "gpt-realtime"
    assert (line["frames_in"], line["frames_out"]) == (2, 4)
    assert line["bytes_in"] == 2 * len(json.dumps({"type": "response.create"}))
    assert (line["ended_by"], line["client_close"], line["upstream_close"]) == (
        "downstream",
        1000,
        1000,
    )
    assert line["responses"] == 2
    assert line["input_tokens"] == 2 * USAGE["input_tokens"]
    assert line["output_tokens"] == 2 * USAGE["output_tokens"]
    assert line["total_tokens"] == 2 * USAGE["total_tokens"]
    access = [r for r in caplog.records if r.name == "relayd.access"]
    assert access[-1].fields["status"] == 101  # type: ignore[attr-defined]
    exposition = relay.app[METRICS].exposition().decode()
    assert 'direction="input",key="team",model="gpt-realtime"} 50.0' in exposition


# --------------------------------------------------------------------------- REST


@pytest.mark.parametrize(
    "path",
    [
        "/v1/realtime/client_secrets",
        "/v1/realtime/translations/client_secrets",
        "/v1/realtime/calls/rtc_1/accept",
        "/v1/realtime/calls/rtc_1/hangup",
        "/v1/realtime/calls/rtc_1/refer",
        "/v1/realtime/calls/rtc_1/reject",
    ],
)
async def test_realtime_rest_routes_pass_through(
    relay: TestClient, fake: FakeOpenAI, path: str
) -> None:
    async with asyncio.timeout(BOUND):
        response = await relay.post(path, json={"session": {"type": "realtime"}}, headers=AUTH)
    assert response.status == 200
    seen = fake.last(path)
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert json.loads(seen.body) == {"session": {"type": "realtime"}}


def _concrete(path: str) -> str:
    return path.replace("{call_id}", "rtc_1")


_REALTIME_ROUTES = [route for route in TABLE if route.group == "realtime"]


@pytest.mark.parametrize("route", _REALTIME_ROUTES, ids=[r.operation_id for r in _REALTIME_ROUTES])
async def test_disabled_realtime_refuses_every_realtime_route(
    relay_factory: RelayFactory, fake: FakeOpenAI, route: Any
) -> None:
    relay = await relay_factory(realtime={"enabled": False})
    path = _concrete(route.path)
    async with asyncio.timeout(BOUND):
        if route.method == "GET":
            response = await relay.get(
                f"{path}?model=gpt-realtime", headers={**websocket_upgrade(), **AUTH}
            )
        else:
            response = await relay.post(path, json={"session": {"type": "realtime"}}, headers=AUTH)
        error = (await response.json())["error"]
    assert response.status == 403
    assert error["code"] == "realtime_disabled"
    assert fake.seen == [] and fake.realtime.sessions == []


@pytest.mark.parametrize(
    "path",
    ["/v1/realtime/unlisted_secrets", "/v1/REALTIME/client_secrets", "/v1/realtime/calls/rtc_1"],
    ids=["unlisted", "capitalised", "call"],
)
async def test_disabled_realtime_refuses_realtime_paths_the_catch_all_would_pass(
    relay_factory: RelayFactory, fake: FakeOpenAI, path: str
) -> None:
    relay = await relay_factory(realtime={"enabled": False}, policy={"allow": ("/v1/*",)})
    async with asyncio.timeout(BOUND):
        response = await relay.post(path, json={"session": {"type": "realtime"}}, headers=AUTH)
        error = (await response.json())["error"]
    assert response.status == 403
    assert error["code"] == "realtime_disabled"
    assert fake.seen == []


async def test_restricted_models_refuse_realtime_paths_relayd_cannot_check(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        realtime={"allowed_models": ("gpt-realtime",)},
        policy={"allow": ("/v1/*",)},
    )
    async with asyncio.timeout(BOUND):
        response = await relay.post(
            "/v1/realtime/unlisted_secrets", json={"model": "gpt-4o"}, headers=AUTH
        )
        await response.read()
    assert response.status == 403
    assert fake.seen == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/realtime/client_secrets", {"session": {"type": "realtime", "model": "gpt-4o-rt"}}),
        ("/v1/realtime/client_secrets?model=gpt-4o-rt", {"session": {"type": "realtime"}}),
        ("/v1/realtime/client_secrets?Model=gpt-4o-rt", {"session": {"type": "realtime"}}),
        ("/v1/realtime/translations/client_secrets", {"session": {"model": "gpt-4o-rt"}}),
        ("/v1/realtime/calls/rtc_1/accept", {"type": "realtime", "model": "gpt-4o-rt"}),
        ("/v1/realtime/transcription_sessions", {"model": "gpt-4o-rt"}),
        ("/v1/realtime/sessions", {"model": "gpt-4o-rt"}),
        ("/v1/realtime/calls/rtc_1/hangup?model=gpt-4o-rt", {}),
        ("/v1/realtime/client_secrets", {"session": {"type": "realtime", "model": 7}}),
    ],
    ids=[
        "client_secrets",
        "query",
        "query-variant",
        "translations",
        "accept",
        "transcription",
        "sessions",
        "hangup-query",
        "not-a-string",
    ],
)
async def test_every_realtime_route_checks_the_models_it_names(
    relay_factory: RelayFactory, fake: FakeOpenAI, path: str, body: dict[str, Any]
) -> None:
    relay = await relay_factory(realtime={"allowed_models": ("gpt-realtime",)})
    async with asyncio.timeout(BOUND):
        response = await relay.post(path, json=body, headers=AUTH)
        error = (await response.json())["error"]
    assert response.status == 400
    assert error["param"] == "model"
    assert fake.seen == []


async def test_client_secrets_get_the_default_model_when_models_are_restricted(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        realtime={
            "allowed_models": ("gpt-realtime", "gpt-realtime-mini"),
            "default_model": "gpt-realtime-mini",
        },
    )
    async with asyncio.timeout(BOUND):
        for body in ({}, {"session": {"type": "realtime", "instructions": "hi"}}):
            response = await relay.post("/v1/realtime/client_secrets", json=body, headers=AUTH)
            assert response.status == 200
        allowed = await relay.post(
            "/v1/realtime/client_secrets",
            json={"session": {"type": "realtime", "model": "gpt-realtime"}},
            headers=AUTH,
        )
        assert allowed.status == 200
        bodiless = await relay.post("/v1/realtime/client_secrets", headers=AUTH)
        assert bodiless.status == 200
    sent = [json.loads(s.body) for s in fake.seen]
    assert [body["session"]["model"] for body in sent] == [
        "gpt-realtime-mini",
        "gpt-realtime-mini",
        "gpt-realtime",
        "gpt-realtime-mini",
    ]
    assert sent[1]["session"]["instructions"] == "hi"


async def test_realtime_calls_check_the_session_model_when_models_are_restricted(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(realtime={"allowed_models": ("gpt-realtime",)})
    sdp = b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n"

    def form(model: str) -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("sdp", sdp.decode(), content_type="application/sdp")
        session = json.dumps({"type": "realtime", "model": model})
        data.add_field("session", session, content_type="application/json")
        return data

    async with asyncio.timeout(BOUND):
        refused = await relay.post("/v1/realtime/calls", data=form("gpt-4o-rt"), headers=AUTH)
        assert refused.status == 400
        unnamed = await relay.post(
            "/v1/realtime/calls", data=sdp, headers={**AUTH, "Content-Type": "application/sdp"}
        )
        assert unnamed.status == 400
        assert fake.seen == []
        allowed = await relay.post("/v1/realtime/calls", data=form("gpt-realtime"), headers=AUTH)
        assert allowed.status == 200
    parts = {p["name"]: p["data"] for p in fake.last("/v1/realtime/calls").parts}
    assert parts["sdp"] == sdp
    assert json.loads(parts["session"])["model"] == "gpt-realtime"


async def test_realtime_calls_pass_sdp_through(relay: TestClient, fake: FakeOpenAI) -> None:
    sdp = b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n"
    async with asyncio.timeout(BOUND):
        response = await relay.post(
            "/v1/realtime/calls",
            data=sdp,
            headers={**AUTH, "Content-Type": "application/sdp"},
        )
    assert response.status == 200
    assert fake.last("/v1/realtime/calls").body == sdp


async def test_legacy_sessions_fill_in_the_default_model(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(BOUND):
        response = await relay.post("/v1/realtime/sessions", json={"voice": "alloy"}, headers=AUTH)
    assert response.status == 200
    assert json.loads(fake.last("/v1/realtime/sessions").body) == {
        "voice": "alloy",
        "model": "gpt-realtime",
    }


async def test_legacy_sessions_allow_any_model_by_default(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(BOUND):
        response = await relay.post(
            "/v1/realtime/sessions", json={"model": "gpt-realtime-next"}, headers=AUTH
        )
    assert response.status == 200
    assert json.loads(fake.last("/v1/realtime/sessions").body)["model"] == "gpt-realtime-next"


async def test_legacy_sessions_refuse_a_model_outside_allowed_models(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        realtime={
            "allowed_models": ("gpt-realtime", "gpt-realtime-mini"),
            "default_model": "gpt-realtime-mini",
        },
    )
    async with asyncio.timeout(BOUND):
        refused = await relay.post(
            "/v1/realtime/sessions", json={"model": "gpt-4o-realtime-preview"}, headers=AUTH
        )
        error = (await refused.json())["error"]
        defaulted = await relay.post("/v1/realtime/sessions", json={}, headers=AUTH)
    assert refused.status == 400
    assert (error["param"], error["code"]) == ("model", "model_not_allowed")
    assert defaulted.status == 200
    sent = [json.loads(s.body) for s in fake.seen if s.path == "/v1/realtime/sessions"]
    assert [body["model"] for body in sent] == ["gpt-realtime-mini"]


async def test_realtime_log_never_holds_a_secret(
    relay: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(BOUND):
        async with relay.ws_connect(URL, protocols=("realtime", KEY_PROTOCOL)) as ws:
            close = {"type": "test.close", "code": 4000, "reason": UPSTREAM_KEY}
            await ws.send_str(json.dumps(close))
            msg = await ws.receive()
    assert msg.data == 4000
    assert UPSTREAM_KEY not in (msg.extra or "")  # close reasons are redacted too
    await until(lambda: realtime_log(caplog))


# --------------------------------------------------------------------------- config


def test_realtime_table_is_read_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text(
        "[realtime]\n"
        "enabled = false\n"
        'allowed_models = ["gpt-realtime", "gpt-realtime-mini"]\n'
        'default_model = "gpt-realtime-mini"\n'
        "max_message_bytes = 1048576\n"
        "idle_timeout = 30\n"
        "max_session = 1800\n"
    )
    settings = load_settings(config, {"OPENAI_API_KEY": UPSTREAM_KEY})
    assert settings.realtime.enabled is False
    assert settings.realtime.allowed_models == ("gpt-realtime", "gpt-realtime-mini")
    assert settings.realtime.default_model == "gpt-realtime-mini"
    assert settings.realtime.max_message_bytes == 1048576
    assert (settings.realtime.idle_timeout_s, settings.realtime.max_session_s) == (30.0, 1800.0)


def test_realtime_defaults_allow_any_model() -> None:
    settings = load_settings(None, {"OPENAI_API_KEY": UPSTREAM_KEY})
    assert settings.realtime.enabled is True
    assert settings.realtime.allowed_models == ()
    assert settings.realtime.default_model == "gpt-realtime"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('allowed_models = ["gpt-realtime"]\ndefault_model = "other"\n', "default_model"),
        ("max_message_bytes = 0\n", "max_message_bytes"),
        ("idle_timeout = -1\n", "idle_timeout"),
        ('allowed_models = "gpt-realtime"\n', "allowed_models"),
        ('enabled = "yes"\n', "enabled"),
    ],
    ids=["default-not-allowed", "zero-bytes", "negative-idle", "models-not-a-list", "not-bool"],
)
def test_bad_realtime_settings_are_refused(tmp_path: Path, table: str, problem: str) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text("[realtime]\n" + table)
    with pytest.raises(ConfigError, match=problem):
        load_settings(config, {"OPENAI_API_KEY": UPSTREAM_KEY})


# --------------------------------------------------------------------------- revoked keys


async def test_a_reload_ends_the_sessions_of_revoked_keys_only(
    relay: TestClient, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 11, item 7: a removed key's realtime sessions stayed open.
    app = relay.server.app
    keyring = app[KEYRING]
    team, other = keyring.keys
    async with asyncio.timeout(BOUND):
        async with (
            relay.ws_connect(URL, headers=AUTH) as kept,
            relay.ws_connect(URL, headers={"Authorization": f"Bearer {OTHER_KEY}"}) as ended,
        ):
            keyring.replace([team, other])
            assert await realtime_handler.end_revoked_sessions(app) == 0  # nothing changed
            # Still a key, but no longer one that may use realtime.
            keyring.replace([team, RelayKey("other", other.digest, frozenset({"models"}))])
            assert await realtime_handler.end_revoked_sessions(app) == 1
            closing = await ended.receive()
            assert closing.type is WSMsgType.CLOSE and ended.close_code == 1008
            assert closing.extra == "relay key 'other' was revoked"
            await kept.send_str("still here")
            assert (await kept.receive()).data == "still here"
    await until(lambda: any(s.close_code == 1008 for s in fake.realtime.sessions))
    await until(lambda: len(realtime_log(caplog)) == 2)
    assert sorted(e["ended_by"] for e in realtime_log(caplog)) == ["downstream", "key_revoked"]
