"""Realtime: the WebSocket bridge the official SDKs dial, and the realtime REST routes.

Every route here first applies the ``[realtime]`` policy (``realtime_policy.py``):
enabled, and only allowed models, wherever a model is named.

The frames are moved by :class:`relayd.streams.websocket.WebSocketBridge`, which
knows nothing of OpenAI. What is OpenAI's is decided here, all of it before the
client's upgrade is accepted, so every refusal is a plain HTTP answer in OpenAI's
error shape and never an accept-then-close (api7/aisix#721):

- the query names exactly one session selector, and upstream is dialled with that
  one parameter re-encoded, so a spelling relayd did not check (``Model=``,
  ``model[]=``) never reaches it;
- credentials: the relay key stays in relayd. Upstream is dialled with the
  upstream key, or with the client's own ephemeral secret (``ek_…``, from
  ``/v1/realtime/client_secrets``) when it sends one as Bearer or as an
  ``openai-insecure-api-key.`` subprotocol next to its relay key;
- subprotocols: credential-carrying ones are never forwarded; ``realtime`` is
  selected when offered (a browser fails a handshake in which the server picks
  none of the protocols it offered, RFC 6455 §4.1);
- token usage is summed from ``response.done`` events as they pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import ClientWSTimeout, WSCloseCode, WSMsgType, hdrs, web
from multidict import CIMultiDict

from relayd.auth import EPHEMERAL_PREFIX, WS_KEY_PREFIX
from relayd.errors import (
    BadRequestError,
    RelayRateLimitError,
    UpgradeRequiredError,
)
from relayd.handlers.realtime_policy import (
    admit,
    check_named_models,
    checked_call_form,
    checked_query,
    fill_default_model,
    refuse_if_disabled,
)
from relayd.headers import redact_secrets
from relayd.memory import Lease, buffer_lease, share_key
from relayd.metering import SessionMeter, open_session
from relayd.relay import checked_path, json_body, read_json_object, relay
from relayd.state import (
    KEY,
    KEYRING,
    METRICS,
    REALTIME_BRIDGES,
    REALTIME_USAGE,
    REQUEST_ID,
    ROUTE,
    SETTINGS,
    UPSTREAM,
)
from relayd.streams import BridgeStats, Leg, WebSocketBridge
from relayd.streams.websocket import MemoryHold

__all__ = [
    "accept_call",
    "bridge_realtime",
    "close_bridges",
    "create_call",
    "create_client_secret",
    "create_session",
    "end_revoked_sessions",
    "forward_realtime",
]

log = logging.getLogger("relayd.realtime")

# Ping each peer this often and drop it if no pong comes back within half of it
# (aiohttp heartbeat); the realtime protocol has no heartbeat of its own.
HEARTBEAT_S: Final = 30.0
# How long a closing handshake may wait for the peer's CLOSE reply.
CLOSE_TIMEOUT_S: Final = 5.0

_SUBPROTOCOL: Final = "realtime"
# Subprotocols that carry credentials or account choices: upstream gets relayd's own.
_CREDENTIAL_PROTOCOLS: Final = (WS_KEY_PREFIX, "openai-organization.", "openai-project.")
_EPHEMERAL_PROTOCOL: Final = WS_KEY_PREFIX + EPHEMERAL_PREFIX
_USAGE_EVENT: Final = b"response.done"


# --------------------------------------------------------------------------- bridge


async def bridge_realtime(request: web.Request) -> web.StreamResponse:
    """``GET /v1/realtime`` (and ``/v1/realtime/ws``): a WebSocket joined to OpenAI's.

    Refusals before the upgrade: realtime disabled (403), not a WebSocket
    handshake (426), a bad query or a model outside ``allowed_models`` (400), an
    upstream that refuses its handshake (that 4xx, else 502/504). The session then
    lasts until either peer closes (code and reason reach the other), a peer
    vanishes (the other gets 1011), the idle or session limit is reached, or
    relayd shuts down (1001). A client that drops its connection cancels this
    handler, and the upstream leg is closed with 1011.
    """
    settings = request.app[SETTINGS]
    refuse_if_disabled(settings)
    # Probing with the offered protocols: a probe that knows none of them makes
    # aiohttp warn on every browser handshake (listing them, the key one included).
    if not web.WebSocketResponse(protocols=_offered_protocols(request)).can_prepare(request).ok:
        raise UpgradeRequiredError(
            f"{request.path} only accepts WebSocket connections.",
            headers={"Upgrade": "websocket"},
        )
    name, value = checked_query(request, settings)
    model = value if name == "model" else None
    offered = _offered_protocols(request)
    # aiohttp refuses a message of max_msg_size bytes or more; the setting is the
    # largest message allowed.
    limit = settings.realtime.max_message_bytes + 1
    # Spend control: refused here, before the upgrade; the slot is held until the end.
    session = await open_session(request, model or settings.realtime.default_model)
    try:
        return await _bridge(request, name, value, model, offered, limit, session)
    finally:
        if session is not None:
            session.close()


async def _bridge(
    request: web.Request,
    name: str,
    value: str,
    model: str | None,
    offered: list[str],
    limit: int,
    session: SessionMeter | None,
) -> web.StreamResponse:
    """The bridge itself, once the session is admitted."""
    settings = request.app[SETTINGS]
    async with request.app[UPSTREAM].ws_connect(
        f"/v1/realtime?{urlencode({name: value})}",
        headers=_upstream_headers(request, _ephemeral_secret(request, offered)),
        protocols=[p for p in offered if not p.startswith(_CREDENTIAL_PROTOCOLS)],
        autoclose=False,
        heartbeat=HEARTBEAT_S,
        max_msg_size=limit,
        compress=0,  # no permessage-deflate: frames pass through as they come
        decode_text=False,
        timeout=ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S),
        key=share_key(request),
    ) as upstream:
        downstream = web.WebSocketResponse(
            protocols=_selected_protocol(offered, upstream.protocol),
            autoclose=False,
            heartbeat=HEARTBEAT_S,
            max_msg_size=limit,
            # Frames pass as they came; deflating audio costs CPU for little gain.
            compress=False,
            decode_text=False,
            timeout=CLOSE_TIMEOUT_S,
        )
        await downstream.prepare(request)
        usage = _UsageTap(session.response_done if session is not None else None)
        upstream_key = settings.upstream.api_key
        bridge = WebSocketBridge(
            downstream,
            upstream,
            idle_timeout=settings.realtime.idle_timeout_s,
            max_session=settings.realtime.max_session_s,
            observer=usage,
            observed=(Leg.UPSTREAM,),  # response.done comes from upstream only
            reason_filter=lambda reason: _redacted(reason, upstream_key),
            max_message_bytes=limit,
            hold=_memory_hold(buffer_lease(request)),
            gate=session,  # spend control: response.create refused once over budget
        )
        bridges = request.app[REALTIME_BRIDGES]
        metrics = request.app[METRICS]
        bridges[bridge] = request
        metrics.open_websockets.inc()
        try:
            await bridge.run()
        finally:
            # Synchronous on purpose (docs/design.md#accounting-in-finally-is-synchronous).
            bridges.pop(bridge, None)
            metrics.open_websockets.dec()
            _account(request, model, bridge.stats, usage)
    return downstream


def _memory_hold(lease: Lease) -> MemoryHold:
    """The session's unfinished messages count against its key's buffer budget and
    the relay's (relayd.memory); the lease is released when the handler returns."""

    def hold(size: int) -> str | None:
        refusal = lease.hold(size)
        if refusal is None:
            return None
        if isinstance(refusal, RelayRateLimitError):
            return "this relay key holds as much unfinished message data as it may; retry later"
        return "the relay holds as much unfinished message data as it may; retry later"

    return hold


async def close_bridges(app: web.Application) -> None:
    """``on_shutdown``: end every open bridge with 1001 "server shutting down".

    Returns once each upstream leg is closed; each handler then closes its client
    and ends, which aiohttp's shutdown waits for.
    """
    bridges: weakref.WeakKeyDictionary[WebSocketBridge, web.Request] = app[REALTIME_BRIDGES]
    await asyncio.gather(
        *(
            bridge.close(WSCloseCode.GOING_AWAY, "server shutting down", ended_by="shutdown")
            for bridge in list(bridges)
        )
    )


async def end_revoked_sessions(app: web.Application) -> int:
    """After a reload: end each session whose relay key is gone (issue 11, item 7).

    A key removed, its secret replaced, or its scopes no longer covering realtime:
    the session closes on both legs with 1008 (policy violation, RFC 6455 §7.4.1)
    and a reason that says so. A session opened in keyless mode ends once keys are
    required. Returns how many sessions were ended.
    """
    keyring = app[KEYRING]
    if app[SETTINGS].auth.disabled:
        return 0
    doomed = []
    for bridge, request in list(app[REALTIME_BRIDGES].items()):
        key = request.get(KEY)
        if key is None:
            if keyring.keys:
                doomed.append((bridge, "relay keys are now required"))
            continue
        held = keyring.current(key)
        if held is None or not held.allows(request[ROUTE].group):
            doomed.append((bridge, f"relay key '{key.name}' was revoked"))
    await asyncio.gather(
        *(
            bridge.close(WSCloseCode.POLICY_VIOLATION, reason, ended_by="key_revoked")
            for bridge, reason in doomed
        )
    )
    if doomed:
        log.warning("ended %d realtime session(s) whose relay key was revoked", len(doomed))
    return len(doomed)


def _offered_protocols(request: web.Request) -> list[str]:
    return [
        protocol.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for protocol in value.split(",")
        if protocol.strip()
    ]


def _selected_protocol(offered: list[str], upstream_choice: str | None) -> tuple[str, ...]:
    if _SUBPROTOCOL in offered:
        return (_SUBPROTOCOL,)
    if upstream_choice and upstream_choice in offered:
        return (upstream_choice,)
    return ()


def _ephemeral_secret(request: web.Request, offered: list[str]) -> str | None:
    """The client's own ``ek_…`` secret, from its Bearer header or a key subprotocol."""
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token.startswith(EPHEMERAL_PREFIX):
        return token
    for protocol in offered:
        if protocol.startswith(_EPHEMERAL_PROTOCOL):
            return protocol.removeprefix(WS_KEY_PREFIX)
    return None


def _upstream_headers(request: web.Request, secret: str | None) -> CIMultiDict[str]:
    headers = request.app[UPSTREAM].headers(request.headers)
    # A browser's Origin is relayd's business; upstream sees relayd as the client.
    headers.popall(hdrs.ORIGIN, None)
    if secret is not None:
        # The secret is bound to its own organisation and project upstream.
        headers[hdrs.AUTHORIZATION] = f"Bearer {secret}"
        headers.popall("OpenAI-Organization", None)
        headers.popall("OpenAI-Project", None)
    return headers


def _redacted(reason: str, upstream_key: str) -> str:
    # Close reasons are short free text; one that echoes a key never reaches a peer.
    return redact_secrets(reason.encode(), (upstream_key,)).decode("utf-8", "replace")


class _UsageTap:
    """Sums token usage from ``response.done`` events (the bridge's frame observer).

    Per frame: two comparisons and, for upstream TEXT frames, one substring search;
    only a frame containing ``response.done`` is parsed, and none is ever re-encoded.
    """

    __slots__ = ("input_tokens", "on_response", "output_tokens", "responses", "total_tokens")

    def __init__(self, on_response: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_response = on_response  # spend control prices each response
        self.responses = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.total_tokens = 0

    def __call__(self, leg: Leg, kind: WSMsgType, data: bytes) -> None:
        if leg is not Leg.UPSTREAM or kind is not WSMsgType.TEXT or _USAGE_EVENT not in data:
            return
        try:
            event = json.loads(data)
        except ValueError:  # includes invalid UTF-8
            return
        if not isinstance(event, dict) or event.get("type") != "response.done":
            return
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return
        self.responses += 1
        self.input_tokens += _count(usage, "input_tokens")
        self.output_tokens += _count(usage, "output_tokens")
        self.total_tokens += _count(usage, "total_tokens")
        if self.on_response is not None:
            self.on_response(response)  # type: ignore[arg-type]

    def totals(self) -> dict[str, int]:
        return {
            "responses": self.responses,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }


def _count(usage: dict[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _account(request: web.Request, model: str | None, stats: BridgeStats, usage: _UsageTap) -> None:
    """The session's one log line, its usage on the request, its tokens in metrics."""
    request[REALTIME_USAGE] = usage.totals()
    key = request.get(KEY)
    key_name = key.name if key is not None else "-"
    if usage.responses:
        request.app[METRICS].count_tokens(
            key_name, model or "unknown", usage.input_tokens, usage.output_tokens
        )
    fields = {
        "request_id": request.get(REQUEST_ID),
        "key": key_name,
        "model": model,
        "duration_ms": round(stats.duration * 1000, 2),
        "ended_by": stats.ended_by,
        "frames_in": stats.downstream.frames,
        "bytes_in": stats.downstream.bytes,
        "frames_out": stats.upstream.frames,
        "bytes_out": stats.upstream.bytes,
        "client_close": stats.downstream.close_code,
        "upstream_close": stats.upstream.close_code,
        **usage.totals(),
    }
    log.info("realtime session", extra={"fields": fields})


# --------------------------------------------------------------------------- REST


async def _relay_checked_json(
    request: web.Request, *, session_key: str | None, fill: bool
) -> web.StreamResponse:
    """Check (and, while models are restricted, complete) a JSON body, then relay it.

    ``session_key`` names where the session sits (``None``: the body is the
    session). Unrestricted, a body that needs no default passes untouched.
    """
    path = checked_path(request)
    settings = admit(request)
    if not (settings.realtime.allowed_models or fill):
        return await relay(request, request.method, path)
    # No body is a session with upstream's defaults: completed like an empty one.
    payload = await read_json_object(request) if request.body_exists else {}
    check_named_models(payload, settings)
    session: Any = payload
    if session_key is not None:
        session = payload.setdefault(session_key, {"type": "realtime"})
    if isinstance(session, dict):
        fill_default_model(session, settings)
    return await relay(request, request.method, path, data=json_body(payload))


async def forward_realtime(request: web.Request) -> web.StreamResponse:
    """Realtime REST routes without a session to complete (translation secrets, the
    legacy transcription sessions, call hangup/refer/reject): policy, then relay."""
    path = checked_path(request)
    settings = admit(request)
    if not settings.realtime.allowed_models or request.content_type != "application/json":
        return await relay(request, request.method, path)
    payload = await read_json_object(request)
    check_named_models(payload, settings)
    return await relay(request, request.method, path, data=json_body(payload))


async def create_client_secret(request: web.Request) -> web.StreamResponse:
    """``POST /v1/realtime/client_secrets``: the ``ek_`` secret fixes its session's
    model, so ``session.model`` is checked (and the default filled in while models
    are restricted) before the secret exists."""
    return await _relay_checked_json(request, session_key="session", fill=False)


async def accept_call(request: web.Request) -> web.StreamResponse:
    """``POST /v1/realtime/calls/{call_id}/accept``: the body is the call's session."""
    return await _relay_checked_json(request, session_key=None, fill=False)


async def create_session(request: web.Request) -> web.StreamResponse:
    """``POST /v1/realtime/sessions`` (legacy): model checked, default model filled in.

    A body without ``model`` gets ``[realtime] default_model``; a model outside
    ``[realtime] allowed_models`` (when that list is set) is a 400 with
    ``param: "model"``. Everything else passes through unchanged.
    """
    return await _relay_checked_json(request, session_key=None, fill=True)


async def create_call(request: web.Request) -> web.StreamResponse:
    """``POST /v1/realtime/calls``: a WebRTC call, its model in the ``session`` part.

    Unrestricted, the body (SDP, or a form with ``sdp`` and ``session``) streams
    through. While models are restricted the form is read (under the JSON cap),
    its ``session`` checked and completed, and sent on as relayd rebuilt it; a
    bare SDP body names no model relayd can check, so it is refused.
    """
    path = checked_path(request)
    settings = admit(request)
    if not settings.realtime.allowed_models:
        return await relay(request, "POST", path)
    if request.content_type != "multipart/form-data":
        raise BadRequestError(
            "This relay restricts realtime models: start the call with a "
            "multipart/form-data body whose 'session' part names the model.",
            code="model_required",
            param="model",
        )
    form = await checked_call_form(request, settings)
    headers = request.app[UPSTREAM].headers(request.headers, keep_length=False)
    headers[hdrs.CONTENT_TYPE] = form.content_type
    return await relay(request, "POST", path, data=form, headers=headers)
