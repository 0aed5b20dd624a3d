"""``POST /mcp``: MCP's Streamable HTTP, stateless, one JSON-RPC message per request.

By the time a request gets here, relayd's middlewares have identified the relay
key (scopes included), refused a body that is not JSON (415) or too large for the
server (413). Then, as the 2025-11-25 transport says:

- ``Origin``, when present, must be relayd's public origin, ChatGPT's, one in
  ``[mcp] origins``, or (keyless mode only) this machine's: else 403, as a guard
  against DNS rebinding;
- ``Accept`` must allow ``application/json`` (406); ``MCP-Protocol-Version``, when
  sent, must be one relayd speaks (400);
- the body (``[mcp] max_body_bytes``) must be one JSON-RPC message: malformed JSON
  -32700 and batches -32600, both HTTP 400;
- a notification or a response is taken with 202 and no body; a request gets HTTP
  200 with its result or JSON-RPC error, an unknown method (``server/discover``
  included) -32601 with the id echoed.

There are no sessions: relayd never sends ``Mcp-Session-Id`` and ignores one a
client sends, so restarts and workers are invisible to clients. GET and DELETE
answer 405. What ChatGPT puts in ``_meta`` (the user's location and ids) and its
``x-openai-*`` headers are read by nothing here and never logged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp_sse import sse_response

from relayd import __version__
from relayd.errors import BadRequestError, MethodNotAllowedError
from relayd.loopback import is_loopback_origin
from relayd.mcp.protocol import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    Era,
    Message,
    RpcError,
    error_message,
    parse,
    result_message,
)
from relayd.mcp.tools import ToolSet
from relayd.relay import parse_json, read_whole
from relayd.state import KEYRING, MCP_CALLS, MCP_TOOLS, SETTINGS

__all__ = ["LEGACY", "refuse_method", "serve_mcp"]

CHATGPT_ORIGINS: Final = ("https://chatgpt.com", "https://chat.openai.com")
_INSTRUCTIONS: Final = (
    "Tools of this team's relay to the OpenAI API. A call still running after the time "
    "budget answers with what to call next. Files come back as links that expire within "
    "minutes."
)
_ASKING: Final = (
    " Ask a model with createActionResponse; while it is still working, call "
    "getActionResponse with its id."
)


class _Context:
    """What a method sees of the request it answers."""

    __slots__ = ("request",)

    def __init__(self, request: web.Request) -> None:
        self.request = request


async def _initialize(context: _Context, params: Mapping[str, Any]) -> Mapping[str, Any]:
    settings = context.request.app[SETTINGS]
    return {
        "protocolVersion": LEGACY.negotiate(params.get("protocolVersion")),
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {
            "name": settings.meta.name,
            "title": settings.meta.name,
            "version": __version__,
        },
        "instructions": _instructions(context.request.app[MCP_TOOLS]),
    }


def _instructions(tools: ToolSet) -> str:
    """What the model should know first (ChatGPT reads the first 512 characters),
    naming only tools this relay offers."""
    asking = tools.get("createActionResponse") and tools.get("getActionResponse")
    return _INSTRUCTIONS + (_ASKING if asking else "")


async def _ping(context: _Context, params: Mapping[str, Any]) -> Mapping[str, Any]:
    return {}


async def _list_tools(context: _Context, params: Mapping[str, Any]) -> Mapping[str, Any]:
    # One page: the whole list is a few kilobytes (a test holds it under a bound).
    return {"tools": context.request.app[MCP_TOOLS].listing()}


async def _call_tool(context: _Context, params: Mapping[str, Any]) -> Mapping[str, Any]:
    request = context.request
    name = params.get("name")
    tool = request.app[MCP_TOOLS].get(name) if isinstance(name, str) else None
    if tool is None:
        raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
    arguments = params.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise RpcError(INVALID_PARAMS, "Tool arguments must be an object.")
    return await request.app[MCP_CALLS].call(request, tool, tool.arguments(arguments))


# The 2025-06-18 / 2025-11-25 protocol (newest first). A 2026-07-28 era would be a
# second table, chosen per request by its _meta protocol version (protocol.py).
LEGACY: Final = Era(
    versions=("2025-11-25", "2025-06-18"),
    methods={
        "initialize": _initialize,
        "ping": _ping,
        "tools/list": _list_tools,
        "tools/call": _call_tool,
    },
)


def _allowed_origin(request: web.Request, origin: str) -> bool:
    settings = request.app[SETTINGS]
    wanted = origin.strip().rstrip("/").lower()
    allowed = {*CHATGPT_ORIGINS, *settings.mcp.origins}
    if settings.server.public_url:
        public = urlsplit(settings.server.public_url)
        allowed.add(f"{public.scheme}://{public.netloc}")
    if wanted in {a.rstrip("/").lower() for a in allowed}:
        return True
    keyless = not settings.auth.disabled and not request.app[KEYRING].keys
    return keyless and is_loopback_origin(origin)


def _accepts(request: web.Request, media_type: str) -> bool:
    """Whether ``Accept`` allows ``media_type`` (no header: anything)."""
    header = request.headers.get(hdrs.ACCEPT)
    if header is None:
        return True
    kind = media_type.split("/")[0]
    for item in header.split(","):
        offered = item.split(";")[0].strip().lower()
        if offered in (media_type, f"{kind}/*", "*/*"):
            return True
    return False


def _rpc_answer(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        content_type="application/json",
    )


def _refusal(status: int, code: int, message: str, data: Any = None) -> web.Response:
    return _rpc_answer(error_message(None, RpcError(code, message, data=data)), status)


async def _message(request: web.Request) -> Message:
    raw = await read_whole(request, request.app[SETTINGS].mcp.max_body_bytes)
    try:
        document = parse_json(raw)
    except BadRequestError as exc:
        raise RpcError(PARSE_ERROR, f"Parse error: {exc.message}", http_status=400) from None
    return parse(document)


async def serve_mcp(request: web.Request) -> web.StreamResponse:
    """``POST /mcp``: one JSON-RPC message in, its answer out (JSON or, for
    ``tools/call`` when configured, server-sent events)."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and not _allowed_origin(request, origin):
        return _refusal(403, INVALID_REQUEST, "Forbidden: this Origin may not use this server.")
    if not _accepts(request, "application/json"):
        return _refusal(
            406, INVALID_REQUEST, "Not Acceptable: the client must accept application/json."
        )
    version = request.headers.get("MCP-Protocol-Version")
    if version is not None and version not in LEGACY.versions:
        return _refusal(
            400,
            INVALID_REQUEST,
            f"Unsupported MCP-Protocol-Version: {version[:40]}",
            {"supported": list(LEGACY.versions)},
        )
    try:
        message = await _message(request)
    except RpcError as exc:
        return _rpc_answer(error_message(None, exc), exc.http_status)
    if not message.is_request:
        return web.Response(status=202)  # a notification or a response: taken
    assert message.method is not None
    context = _Context(request)
    settings = request.app[SETTINGS]
    if (
        message.method == "tools/call"
        and settings.mcp.call_answers == "sse"
        and "text/event-stream" in request.headers.get(hdrs.ACCEPT, "").lower()
    ):
        return await _answer_as_events(request, context, message)
    return _rpc_answer(await _answer(context, message))


async def _answer(context: _Context, message: Message) -> dict[str, Any]:
    try:
        method = LEGACY.method(message.method or "")
        result = await method(context, message.params)
    except RpcError as exc:
        return error_message(message.id, exc)
    return result_message(message.id, result)


async def _answer_as_events(
    request: web.Request, context: _Context, message: Message
) -> web.StreamResponse:
    """The answer as one ``message`` event, with keepalive comments while the tool
    runs (proxies and clients see a live connection)."""
    keepalive = request.app[SETTINGS].mcp.sse_keepalive_s
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    async with sse_response(
        request, headers=headers, ping_interval=keepalive, allow_all_methods=True
    ) as events:
        answer = await _answer(context, message)
        await events.send(
            json.dumps(answer, ensure_ascii=False, separators=(",", ":")), event="message"
        )
    return events


async def refuse_method(request: web.Request) -> web.StreamResponse:
    """GET and DELETE ``/mcp``: no server-initiated stream, no session to end."""
    raise MethodNotAllowedError(
        f"{request.method} /mcp is not served: this MCP server is stateless; POST messages.",
        headers={"Allow": "POST"},
    )
