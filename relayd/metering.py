"""Spend control at the floor every face passes on its way upstream.

``relay.exchange`` (every HTTP call upstream: pass-through, Actions wrappers and
polls, the ``/v1/proxy`` envelope, MCP tools, which run route handlers) opens a
:class:`Meter` before the request leaves and closes it when the exchange ends; the
realtime bridge does the same around its session. The call is judged by the
*upstream* route it reaches (``relayd.spend.costs``), keyed by the relay key, so a
face is metered without knowing it. ``relayd.spend`` holds the rules; this module
only reads requests and answers for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import WSMsgType, web

from relayd.spend.control import SpendControl, Ticket
from relayd.spend.costs import RELAYING_GROUPS, Cost, cost_of
from relayd.state import (
    BROKEN,
    CLIENT_LEFT,
    KEY,
    ROUTE,
    SPEND,
    SPEND_DOCUMENT,
    SPEND_MODEL,
    SPEND_TICKET,
    SPEND_WATCH,
    TABLE,
    UPSTREAM_STATUS,
    USAGE_TAP,
    booked,
)
from relayd.streams.multipart import SlicedBytesPayload
from relayd.tasks import spawn

__all__ = [
    "Meter",
    "SessionMeter",
    "note_document",
    "open_meter",
    "open_session",
    "peek_model",
    "wants_model_peek",
    "wants_whole_body",
]

_FINISHED: Final = frozenset({"completed", "failed", "cancelled", "incomplete"})
_CREATE: Final = b"response.create"
PEEK_BYTES: Final = 64 * 1024
# A form field named model: its part's headers, a blank line, a short value.
_MODEL_FIELD: Final = re.compile(rb'name="model"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,256})\r\n')
_PAID: Final = frozenset({Cost.TOKENS, Cost.IMAGES, Cost.VIDEOS, Cost.GATE})
_JSON: Final = json.JSONDecoder()  # json.loads' own decoder, without its encoding sniffing
ANONYMOUS: Final = "-"  # the key name of requests on a keyless relay


def _key_name(request: web.Request) -> str:
    key = booked(request).get(KEY)
    return key.name if key is not None else ANONYMOUS


def _operation(request: web.Request, method: str, path_qs: str) -> str | None:
    """The route of the upstream call: the request's own on pass-through routes."""
    route = booked(request).get(ROUTE)
    if route is not None and route.group not in RELAYING_GROUPS and route.method == method:
        return str(route.operation_id)
    found = request.app[TABLE].match(method, path_qs.split("?", 1)[0])
    return found.operation_id if found is not None else None


def wants_whole_body(request: web.Request) -> bool:
    """Whether a pass-through body should be read whole (under the memory budget)
    to find its model and output cap: a JSON body, not content-encoded, on a paid
    route, from a key with limits to check. Everything else streams untouched."""
    control = request.app.get(SPEND)
    if control is None or not control.enabled:
        return False
    if cost_of(_operation(request, request.method, request.path), request.method) not in _PAID:
        return False
    if request.content_type != "application/json" or "Content-Encoding" in request.headers:
        return False
    return not control.limits(_key_name(request)).unlimited


def wants_model_peek(request: web.Request) -> bool:
    """Whether a multipart body's first bytes should be read ahead for its ``model``
    field: a paid route, a key with limits to check, no content coding."""
    control = request.app.get(SPEND)
    if control is None or not control.enabled:
        return False
    if not request.content_type.startswith("multipart/form-data"):
        return False
    if cost_of(_operation(request, request.method, request.path), request.method) not in _PAID:
        return False
    if "Content-Encoding" in request.headers:
        return False
    return not control.limits(_key_name(request)).unlimited


async def peek_model(request: web.Request) -> bytes:
    """Read the start of a multipart body (at most :data:`PEEK_BYTES`, and no more
    once its ``model`` field is seen), note the model, and return what was read: the
    caller sends it upstream first, then the rest as it streams. The SDKs put form
    fields before files, so the model comes within the first few hundred bytes."""
    chunks: list[bytes] = []
    size = 0
    found = None
    while size < PEEK_BYTES and (chunk := await request.content.readany()):
        chunks.append(chunk)
        size += len(chunk)
        found = _MODEL_FIELD.search(b"".join(chunks) if len(chunks) > 1 else chunk)
        if found is not None:
            break
    request[SPEND_MODEL] = found.group(1).decode("utf-8", "replace") if found else ""
    return b"".join(chunks)


def note_document(request: web.Request, document: Any) -> None:
    """A JSON answer relayd read whole (Actions): the meter reads its usage."""
    state = booked(request)
    if SPEND_TICKET in state or SPEND_WATCH in state:
        request[SPEND_DOCUMENT] = document


class Meter:
    """One upstream exchange under spend control."""

    __slots__ = ("_control", "_key", "_request", "_tap_before", "cost", "ticket")

    def __init__(
        self, request: web.Request, control: SpendControl, cost: Cost, ticket: Ticket | None
    ) -> None:
        self._request = request
        self._control = control
        self._key = _key_name(request)
        self._tap_before = booked(request).get(USAGE_TAP)
        self.cost = cost
        self.ticket = ticket
        # Not a pop: a key that is not there costs a KeyError raised and caught.
        request[SPEND_DOCUMENT] = None

    def close(self, failure: BaseException | None) -> None:
        """The exchange ended (synchronous: it may run in a cancelled task's finally).
        Reading the answer's usage waits for the loop's next turn, after the answer
        has gone to the client."""
        ticket = self.ticket
        if failure is not None:
            if ticket is not None:
                cancelled = isinstance(failure, asyncio.CancelledError)
                self._control.finish(ticket, "cancelled" if cancelled else "failed")
            return
        asyncio.get_running_loop().call_soon(self._settle)

    def _settle(self) -> None:
        ticket, state = self.ticket, booked(self._request)
        status = state.get(UPSTREAM_STATUS, 0)
        model, usage, document = self._answer()
        if self.cost is Cost.POLL:
            self._poll_saw(document, model, usage)
            return
        if ticket is None:
            return
        if status >= 400:
            self._control.finish(ticket, "failed")
            return
        if state.get(BROKEN) is not None:
            self._control.finish(ticket, "broken", model=model)
            return
        if state.get(CLIENT_LEFT):
            self._control.finish(ticket, "cancelled", model=model)
            return
        if isinstance(document, Mapping) and document.get("status") in ("queued", "in_progress"):
            ref = document.get("id")
            if isinstance(ref, str) and ref:
                self._control.carry(ticket, ref)
                return
        self._control.finish(ticket, "ok", model=model, usage=usage)

    def _answer(self) -> tuple[str | None, Mapping[str, Any] | None, Any]:
        """The answer's model, usage object and (JSON answers) document."""
        state = booked(self._request)
        document = state.get(SPEND_DOCUMENT)
        tap = state.get(USAGE_TAP)
        if document is None and tap is not None and tap is not self._tap_before:
            wanted = self.cost is Cost.POLL or (
                self.ticket is not None
                and isinstance(self.ticket.request, Mapping)
                and self.ticket.request.get("background") is True
            )
            if wanted and (raw := tap.document()) is not None:
                try:
                    document = json.loads(raw)
                except ValueError:
                    document = None
            if document is None:
                found = tap.usage()
                if found is not None:
                    return found.model, found.details, None
                return None, None, None
        if isinstance(document, Mapping):
            usage = document.get("usage")
            model = document.get("model")
            return (
                model if isinstance(model, str) else None,
                usage if isinstance(usage, Mapping) else None,
                document,
            )
        return None, None, document

    def _poll_saw(self, document: Any, model: str | None, usage: Mapping[str, Any] | None) -> None:
        if not isinstance(document, Mapping) or document.get("status") not in _FINISHED:
            return
        ref = document.get("id")
        if isinstance(ref, str) and ref:
            self._control.poll_saw_end(self._key, ref, model or "", usage)


async def open_meter(request: web.Request, method: str, path_qs: str, data: Any) -> Meter | None:
    """Admit one upstream call (or raise its refusal); None when it is not metered."""
    control = request.app.get(SPEND)
    if control is None or not control.enabled:
        return None
    operation = _operation(request, method, path_qs)
    cost = cost_of(operation, method)
    if cost is Cost.FREE:
        return None
    if cost is Cost.POLL:
        request[SPEND_WATCH] = True  # have the answer tapped even on a GET
        return Meter(request, control, cost, None)
    held = booked(request).get(SPEND_TICKET)
    if held is not None and not held.done:
        return None  # one admission per request: a retry inside it is the same call
    if operation is None:
        operation = f"{method} {path_qs.split('?', 1)[0]}"
    key = _key_name(request)
    body, size = _json_of(data) if not control.limits(key).unlimited else (None, 0)
    ticket = await control.admit(
        key,
        operation,
        cost,
        body,
        size or request.content_length or 0,
        model=booked(request).get(SPEND_MODEL) if body is None else None,
    )
    request[SPEND_TICKET] = ticket
    return Meter(request, control, cost, ticket)


def _json_of(data: Any) -> tuple[Mapping[str, Any] | None, int]:
    """The JSON object a request sends upstream, when relayd holds it whole."""
    if isinstance(data, SlicedBytesPayload):
        raw: bytes | bytearray = data._value
    elif isinstance(data, bytes | bytearray):
        raw = data
    else:
        return None, 0
    try:
        if len(raw) > 1 and raw[0] == 0x7B and raw[1]:  # "{" then not UTF-16: UTF-8
            document = _JSON.decode(raw.decode("utf-8", "surrogatepass"))
        else:
            document = json.loads(raw)
    except (ValueError, RecursionError):
        return None, len(raw)
    return (document if isinstance(document, dict) else None), len(raw)


class SessionMeter:
    """A realtime session under spend control: its slot is held while it lasts,
    each ``response.done`` is priced as it passes, and once the key's budget is
    spent the session's gate is armed: a client ``response.create`` is then answered
    with an ``error`` event and not forwarded (the bridge's FrameGate)."""

    __slots__ = ("_checking", "_control", "_model", "armed", "ticket")

    def __init__(self, control: SpendControl, ticket: Ticket, model: str) -> None:
        self._control = control
        self._model = model
        self.ticket = ticket
        self.armed = False
        self._checking: asyncio.Task[None] | None = None

    def response_done(self, response: Mapping[str, Any]) -> None:
        usage = response.get("usage")
        if isinstance(usage, Mapping):
            model = response.get("model")
            self._control.record_usage(
                self.ticket, model if isinstance(model, str) else self._model, usage
            )
            if self._control.limits(self.ticket.key).budgets and self._checking is None:
                self._checking = spawn(self._check(), name="relayd.spend.realtime_budget")

    async def _check(self) -> None:
        try:
            await self._control.flushed()
            self.armed = await self._control.over_budget(self.ticket.key)
        finally:
            self._checking = None

    def __call__(self, kind: WSMsgType, data: bytes) -> bytes | None:
        """The gate, armed once the budget is spent: a ``response.create`` is refused."""
        if kind is not WSMsgType.TEXT or _CREATE not in data:
            return None
        try:
            event = json.loads(data)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("type") != "response.create":
            return None
        error = {
            "type": "insufficient_quota",
            "code": "insufficient_quota",
            "message": f"Relay key '{self.ticket.key}' has spent its budget; this response "
            "was not started. See the relay's usage report for when the budget resets.",
            "param": None,
            "event_id": event.get("event_id"),
        }
        answer = {"type": "error", "event_id": "event_relay_" + os.urandom(8).hex(), "error": error}
        return json.dumps(answer).encode()

    def close(self) -> None:
        self._control.release(self.ticket)


async def open_session(request: web.Request, model: str) -> SessionMeter | None:
    """Admit a realtime session before the upgrade (or raise its refusal, which the
    client gets as an HTTP answer, never a 101)."""
    control = request.app.get(SPEND)
    if control is None or not control.enabled:
        return None
    route = booked(request).get(ROUTE)
    operation = route.operation_id if route is not None else "connectRealtime"
    ticket = await control.admit(_key_name(request), operation, Cost.REALTIME, None, 0, model=model)
    request[SPEND_TICKET] = ticket
    return SessionMeter(control, ticket, model)
