"""OpenAI pass-through: same path, method, query, body, status and headers.

Only the credentials change hands (relay key out, upstream key in). Three routes
add one decision before relaying: ``/v1/responses:stream`` forces ``stream: true``,
file downloads refuse ``user_data`` files, and the catch-all asks the path policy.
"""

from __future__ import annotations

from aiohttp import web

from relayd.errors import MethodNotAllowedError, NotFoundError, PermissionDeniedError
from relayd.handlers.realtime_policy import admit_unlisted, is_realtime_path
from relayd.paths import Verdict, upstream_path
from relayd.relay import checked_path, downloadable_file, json_body, read_json_object, relay
from relayd.state import POLICY, TABLE

__all__ = ["create_response_stream", "download_file", "forward", "forward_by_policy"]


async def forward(request: web.Request) -> web.StreamResponse:
    return await relay(request, request.method, checked_path(request))


async def create_response_stream(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses:stream``: ``POST /v1/responses`` with ``stream: true``."""
    checked_path(request)
    payload = await read_json_object(request)
    payload["stream"] = True
    query = request.rel_url.raw_query_string
    path = "/v1/responses" + (f"?{query}" if query else "")
    return await relay(request, "POST", path, data=json_body(payload))


async def download_file(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{file_id}/content``, refusing files whose purpose is user_data.

    The file's metadata is asked first (:func:`downloadable_file`); its purpose
    cannot change, and the extra round trip buys the guarantee that a user's
    private upload never leaves through the relay.
    """
    path = checked_path(request)
    verdict = await downloadable_file(request, request.match_info["file_id"])
    if isinstance(verdict, web.StreamResponse):
        return verdict
    return await relay(request, "GET", path)


async def forward_by_policy(request: web.Request) -> web.StreamResponse:
    """The catch-all under ``/v1/``: paths the route table does not declare, judged
    by their decoded path, the one upstream resolves."""
    path = upstream_path(request.raw_path)
    allowed = request.app[TABLE].methods_for(path)
    if allowed:
        raise MethodNotAllowedError(
            f"Method {request.method} is not allowed on {path}; allowed: "
            f"{', '.join(sorted(allowed))}.",
            headers={"Allow": ", ".join(sorted(allowed))},
        )
    if is_realtime_path(path):
        admit_unlisted(request)
    verdict, rule = request.app[POLICY].decide(path)
    if verdict is Verdict.DENY:
        raise PermissionDeniedError(
            f"{path} is denied by this relay's path policy (rule {rule!r}).",
            code="path_denied",
        )
    if verdict is Verdict.UNKNOWN:
        raise NotFoundError(f"Unknown request URL: {request.method} {path}.")
    return await relay(request, request.method, request.raw_path)
