"""The fake OpenAI realtime WebSocket (``GET /v1/realtime`` with an upgrade).

:class:`tests.fakes.openai.FakeOpenAI` hands it every WebSocket handshake to
``/v1/realtime``. It records each handshake (headers, query, offered
subprotocols) and what happened on the connection, and behaves like the GA
realtime API as far as relayd's tests need:

=========================================  ===========================================
client sends                               the fake
=========================================  ===========================================
``?model=refuse-<status>``                 answers the handshake with that HTTP status
a key other than the upstream key/``ek_``  answers the handshake with OpenAI's 401
``{"type": "session.update", ...}``        sends ``session.updated`` with that session
``{"type": "response.create"}``            sends ``response.created``, ``response.done``
                                           with usage (``USAGE``)
``{"type": "test.close", "code", "reason"}``  closes with that code and reason
``{"type": "test.vanish"}``                aborts the TCP connection, no CLOSE frame
``?model=deaf``                            never answers a ping (heartbeat tests)
any other TEXT or BINARY frame             echoes it unchanged
CLOSE                                      records code and reason, answers in kind
=========================================  ===========================================
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import WSMsgType, web

__all__ = ["USAGE", "FakeRealtime", "RealtimeSession"]

USAGE: Final[dict[str, Any]] = {
    "total_tokens": 37,
    "input_tokens": 25,
    "output_tokens": 12,
    "input_token_details": {"text_tokens": 25, "audio_tokens": 0, "cached_tokens": 0},
    "output_token_details": {"text_tokens": 12, "audio_tokens": 0},
}

_ids = itertools.count(1)


def _event_id() -> str:
    return f"event_{next(_ids):06d}"


@dataclass
class RealtimeSession:
    """One handshake the fake saw, and what happened on it afterwards."""

    query: dict[str, str]
    headers: dict[str, str]
    protocols: list[str]
    accepted: bool = False
    selected_protocol: str | None = None
    frames: list[tuple[WSMsgType, str | bytes]] = field(default_factory=list)
    close_code: int | None = None  # the code relayd closed with (received here)
    close_reason: str | None = None
    ended: bool = False


class FakeRealtime:
    def __init__(self, key: str, notify: Callable[[], None], record: bool = True) -> None:
        self.key = key
        self.record = record  # False (bench): keep no sessions or frames
        self.sessions: list[RealtimeSession] = []
        self._notify = notify

    def last(self) -> RealtimeSession:
        assert self.sessions, "the fake saw no realtime handshake"
        return self.sessions[-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        offered = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        session = RealtimeSession(dict(request.query), dict(request.headers), offered)
        if self.record:
            self.sessions.append(session)
        self._notify()
        try:
            return await self._serve(request, session)
        finally:
            session.ended = True
            self._notify()

    async def _serve(self, request: web.Request, session: RealtimeSession) -> web.StreamResponse:
        authorization = request.headers.get("Authorization", "")
        if authorization != f"Bearer {self.key}" and not authorization.startswith("Bearer ek_"):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        model = request.query.get("model", "")
        if model.startswith("refuse-"):
            status = int(model.removeprefix("refuse-"))
            return _error(status, f"Simulated handshake refusal {status}.", None)
        ws = web.WebSocketResponse(
            protocols=("realtime",), autoclose=False, autoping=model != "deaf"
        )
        await ws.prepare(request)
        session.accepted = True
        session.selected_protocol = ws.ws_protocol
        self._notify()
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.CLOSE:
                session.close_code, session.close_reason = msg.data, msg.extra
                self._notify()
                await ws.close(code=msg.data or 1000, message=(msg.extra or "").encode())
                return ws
            if msg.type in (WSMsgType.PING, WSMsgType.PONG):
                continue  # only seen with autoping off ("deaf"): left unanswered
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                return ws  # CLOSED / ERROR: relayd went away
            if self.record:
                session.frames.append((msg.type, msg.data))
            self._notify()
            command = _command(msg.data) if msg.type is WSMsgType.TEXT else None
            if command is None:
                await ws.send_frame(_bytes(msg.data), msg.type)  # echo, unchanged
            elif command["type"] == "session.update":
                await ws.send_str(json.dumps(_session_updated(command, model)))
            elif command["type"] == "response.create":
                for event in _response_events():
                    await ws.send_str(json.dumps(event))
            elif command["type"] == "test.close":
                await ws.close(
                    code=int(command.get("code", 1000)),
                    message=str(command.get("reason", "")).encode(),
                )
                return ws
            elif command["type"] == "test.vanish":
                assert request.transport is not None
                request.transport.abort()
                return ws


_COMMANDS: Final = ("session.update", "response.create", "test.close", "test.vanish")


def _command(text: str) -> dict[str, Any] | None:
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if isinstance(event, dict) and event.get("type") in _COMMANDS:
        return event
    return None


def _bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _session_updated(command: dict[str, Any], model: str) -> dict[str, Any]:
    session = {
        "type": "realtime",
        "object": "realtime.session",
        "id": "sess_fake",
        "model": model or "gpt-realtime",
        **(command.get("session") or {}),
    }
    return {"type": "session.updated", "event_id": _event_id(), "session": session}


def _response_events() -> list[dict[str, Any]]:
    response = {"object": "realtime.response", "id": "resp_fake", "output": []}
    return [
        {
            "type": "response.created",
            "event_id": _event_id(),
            "response": {**response, "status": "in_progress", "usage": None},
        },
        {
            "type": "response.done",
            "event_id": _event_id(),
            "response": {**response, "status": "completed", "usage": USAGE},
        },
    ]


def _error(status: int, message: str, code: str | None) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return web.json_response(body, status=status)
