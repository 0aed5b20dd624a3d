"""``POST /v1/proxy``: one JSON call to an allowlisted OpenAI path, for GPT Actions.

The envelope is ``{method, path, query|params, body|json}``; clients written for an
earlier relay send ``params`` and ``json`` (docs/design.md#older-spellings).
proxy_policy.py decides; a refusal is a 403 with its reason and nothing goes upstream.
The key needs the scope of the route the call reaches, not only ``proxy``: otherwise a
key scoped to ``proxy`` could list and delete files. JSON answers come back cut to
ChatGPT's character limit when they must be (with a note saying so); anything else comes
back as upstream sent it.
"""

from __future__ import annotations

from aiohttp import web

from relayd.actions.fit import fit_json
from relayd.actions.payload import (
    json_answer,
    load,
    upstream_json,
)
from relayd.actions.proxy_policy import check_proxy_call
from relayd.errors import PermissionDeniedError
from relayd.relay import json_body
from relayd.state import KEY, SETTINGS, TABLE

__all__ = ["proxy"]


async def proxy(request: web.Request) -> web.StreamResponse:
    envelope = await load(request)
    call = check_proxy_call(
        request.app[TABLE],
        envelope["method"],
        envelope["path"],
        envelope.get("query"),
        envelope.get("body"),
    )
    key = request.get(KEY)  # None when no keys are configured (loopback) or public
    if key is not None and not key.allows(call.group):
        raise PermissionDeniedError(
            f"The relay key '{key.name}' may not use the '{call.group}' routes "
            "(through /v1/proxy either).",
            code="key_scope",
        )
    data = None
    if call.method not in ("GET", "DELETE"):
        data = json_body(call.body if call.body is not None else {})
    content_type = "application/json" if data is not None else None
    got = await upstream_json(
        request, call.method, call.path_qs, data=data, content_type=content_type
    )
    if isinstance(got, web.StreamResponse):
        return got
    result = got.document
    if isinstance(result, dict):
        result = fit_json(result, request.app[SETTINGS].actions.max_answer_chars)
    return json_answer(result, status=got.answer.status, upstream=got.answer)
