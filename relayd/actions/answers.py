"""Model answers that fit ChatGPT's limits, and the streaming wrapper for everyone else.

A GPT action must answer within 45 s and under 100,000 characters and cannot read a
stream (docs/chatgpt.md#time-budget, docs/chatgpt.md#no-streaming).
``POST /v1/actions/responses`` therefore starts the response in background mode upstream
(``background: true``, ``store: true``, ``stream: false``) and polls it until it
finishes or the answer budget (``[actions] answer_budget``, 25 s by default) is spent.
Finished: the output text with id, model and usage. Not yet: the id and ``status:
in_progress``, which ``GET /v1/actions/responses/{id}`` picks up (and waits on again, up
to the budget). The work goes on upstream meanwhile; nothing is lost to a timeout. Long
texts are cut to ``[actions] max_answer_chars`` with a note that says so (fit.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final
from urllib.parse import quote

from aiohttp import web

from relayd.actions.fit import fit_json
from relayd.actions.payload import (
    UpstreamJSON,
    json_answer,
    load,
    upstream_json,
)
from relayd.relay import checked_path, json_body, relay, waited_on_upstream
from relayd.state import DEADLINE, SETTINGS

__all__ = ["create_action_response", "get_action_response", "stream_action_response"]

_FINISHED: Final = frozenset({"completed", "failed", "cancelled", "incomplete"})


def output_text(response: dict[str, Any]) -> str:
    """The text of a Responses object (what the SDKs call ``output_text``)."""
    texts: list[str] = []
    for item in response.get("output") or []:
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        for part in item.get("content") or []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
    return "\n\n".join(texts)


_USAGE_COUNTS: Final = ("input_tokens", "output_tokens", "total_tokens")


def _answer(response: dict[str, Any], poll_after_s: float, limit: int) -> dict[str, Any]:
    status = response.get("status")
    answer: dict[str, Any] = {
        "id": response.get("id"),
        "object": "relay.answer",
        "status": status,
        "model": response.get("model"),
    }
    if status in _FINISHED:
        answer["output_text"] = output_text(response)
        usage = response.get("usage")
        if isinstance(usage, dict):  # the three counts ActionAnswer documents, no more
            answer["usage"] = {k: v for k, v in usage.items() if k in _USAGE_COUNTS}
        for detail in ("error", "incomplete_details"):
            if response.get(detail):
                answer[detail] = response[detail]
    else:
        answer["poll_after_s"] = poll_after_s
        answer["relay_note"] = (
            "The model is still working. Call getActionResponse with this id to get "
            "the answer; the work continues meanwhile."
        )
    return fit_json(answer, limit)


async def _poll(request: web.Request, response: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Poll until the response is finished or ``deadline``; an upstream error is
    passed through to the client (raised as :class:`_Passthrough`)."""
    settings = request.app[SETTINGS]
    loop = asyncio.get_running_loop()
    path = f"/v1/responses/{quote(str(response.get('id')), safe='')}"
    while response.get("status") not in _FINISHED:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        slept = time.perf_counter()
        await asyncio.sleep(min(settings.actions.poll_interval_s, remaining))
        waited_on_upstream(request, slept)  # the model's time, not the relay's
        got = await upstream_json(request, "GET", path)
        if isinstance(got, web.StreamResponse):
            raise _Passthrough(got)
        fresh = got.document
        if not isinstance(fresh, dict):
            break
        response = fresh
    return response


class _Passthrough(Exception):
    """Carries an upstream error answer, already sent, out of the poll loop."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("upstream error passed through")
        self.response = response


async def _respond(
    request: web.Request, got: UpstreamJSON | web.StreamResponse, deadline: float
) -> web.StreamResponse:
    """The answer to give for a response upstream sent (``got``): polled until done or
    ``deadline``; an upstream error or a non-object comes back as it was."""
    if isinstance(got, web.StreamResponse):
        return got
    response = got.document
    if not isinstance(response, dict):
        return json_answer(response)
    settings = request.app[SETTINGS]
    try:
        polled = await _poll(request, response, deadline)
    except _Passthrough as passed:
        return passed.response
    wait = max(1.0, settings.actions.poll_interval_s)
    return json_answer(_answer(polled, wait, settings.actions.max_answer_chars))


def _deadline(request: web.Request) -> float:
    """When to stop waiting: the answer budget from now, or sooner if the face that
    runs this operation in-process has a budget of its own (relayd/operations.py)."""
    own = asyncio.get_running_loop().time() + request.app[SETTINGS].actions.answer_budget_s
    given: float = request.get(DEADLINE, own)
    return min(own, given)


async def create_action_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/actions/responses``: the answer within the budget, or a handle."""
    settings = request.app[SETTINGS]
    deadline = _deadline(request)
    body = await load(request)
    body.setdefault("model", settings.meta.default_model)
    body.update(stream=False, background=True, store=True)  # store: background needs it
    started = await upstream_json(
        request,
        "POST",
        "/v1/responses",
        data=json_body(body),
        content_type="application/json",
    )
    return await _respond(request, started, deadline)


async def get_action_response(request: web.Request) -> web.StreamResponse:
    """``GET /v1/actions/responses/{response_id}``: the answer once it is there."""
    checked_path(request)
    deadline = _deadline(request)
    path = f"/v1/responses/{quote(request.match_info['response_id'], safe='')}"
    return await _respond(request, await upstream_json(request, "GET", path), deadline)


async def stream_action_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/actions/responses/stream``: validated JSON in, server-sent events out.

    For scripts and apps, not for GPT Actions (which cannot read a stream).
    """
    settings = request.app[SETTINGS]
    body = await load(request)
    body.setdefault("model", settings.meta.default_model)
    body["stream"] = True
    return await relay(request, "POST", "/v1/responses", data=json_body(body))
