"""Routes relayd answers itself: health, ping, relay info, manifest, tools, documents.

Nothing here calls upstream or reveals a secret; ``/manifest`` and the OpenAPI
documents are derived from the route table at request time.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from aiohttp import web

from relayd import __version__
from relayd.errors import NotFoundError
from relayd.metrics import CONTENT_TYPE_LATEST
from relayd.openapi import build_openapi
from relayd.state import KEY, KEYRING, METRICS, SETTINGS, STARTED, TABLE, TOOLS, UPSTREAM

__all__ = [
    "ai_plugin",
    "get_tool",
    "health",
    "list_tools",
    "manifest",
    "metrics",
    "openapi_actions",
    "openapi_full",
    "ping",
    "privacy",
    "relay_info",
    "relay_info_flat",
]


async def health(request: web.Request) -> web.Response:
    """Public liveness; the upstream URL, key count, PID and versions (a map of the
    deployment for an attacker) only for a relay key holder, or in keyless mode,
    where every route is open anyway."""
    settings = request.app[SETTINGS]
    body: dict[str, Any] = {
        "object": "health",
        "status": "ok",
        "environment": settings.meta.environment,
        "default_model": settings.meta.default_model,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    keys = request.app[KEYRING].keys
    if request.get(KEY) is None and keys and not settings.auth.disabled:
        return web.json_response(body)
    upstream = request.app[UPSTREAM]
    body["relay"] = {
        "name": settings.meta.name,
        "version": __version__,
        "auth_required": settings.auth.required,
        "key_header": settings.auth.header,
        "keys_configured": len(keys),
        "uptime_s": round(time.monotonic() - request.app[STARTED], 3),
    }
    body["upstream"] = {
        "base_url": upstream.base_url,
        "api_key_configured": bool(settings.upstream.api_key),
        "in_flight": upstream.in_flight,
    }
    body["meta"] = {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "pid": os.getpid(),
    }
    return web.json_response(body)


async def ping(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "object": "relay.ping",
            "status": "ok",
            "source": settings.meta.name,
            "environment": settings.meta.environment,
            "timestamp": datetime.now(UTC).isoformat(),
        }
    )


async def relay_info_flat(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "relay_name": settings.meta.name,
            "version": __version__,
            "environment": settings.meta.environment,
            "default_model": settings.meta.default_model,
            "base_openai_api": request.app[UPSTREAM].base_url,
        }
    )


async def relay_info(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "type": "relay.info",
            "relay": {
                "name": settings.meta.name,
                "version": __version__,
                "environment": settings.meta.environment,
            },
            "upstream": {
                "base_url": request.app[UPSTREAM].base_url,
                "default_model": settings.meta.default_model,
            },
        }
    )


async def manifest(request: web.Request) -> web.Response:
    """Every declared route with its group and exposure (derived from the table)."""
    settings = request.app[SETTINGS]
    routes: list[dict[str, Any]] = []
    groups: dict[str, list[str]] = {}
    for route in request.app[TABLE].documented():
        routes.append(
            {
                "method": route.method,
                "path": route.path,
                "group": route.group,
                "exposure": route.exposure.value,
                "operation_id": route.operation_id,
                "summary": route.summary,
            }
        )
        paths = groups.setdefault(route.group, [])
        if route.path not in paths:
            paths.append(route.path)
    return web.json_response(
        {
            "object": "relay.manifest",
            "relay": {"name": settings.meta.name, "version": __version__},
            "auth": {
                "required": settings.auth.required,
                "schemes": ["bearer", settings.auth.header],
            },
            "openapi": {"full": "/openapi.json", "actions": "/openapi.actions.json"},
            "groups": groups,
            "routes": routes,
        }
    )


async def list_tools(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": list(request.app[TOOLS].values())})


async def get_tool(request: web.Request) -> web.Response:
    tool_id = request.match_info["tool_id"]
    tool = request.app[TOOLS].get(tool_id)
    if tool is None:
        raise NotFoundError(f"No tool with id {tool_id!r}.", param="tool_id", code="tool_not_found")
    return web.json_response(tool)


async def ai_plugin(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    # The public url, else a URL relative to this document: never Host (issue 11).
    origin = settings.server.public_url.rstrip("/") if settings.server.public_url else ""
    document: dict[str, Any] = {
        "schema_version": "v1",
        "name_for_human": settings.meta.name,
        "name_for_model": settings.meta.name.replace("-", "_"),
        "description_for_human": "A relay to the OpenAI API for this team.",
        "description_for_model": "Calls the OpenAI API through the team's relay.",
        "auth": {"type": "user_http", "authorization_type": "bearer"},
        "api": {"type": "openapi", "url": f"{origin}/openapi.actions.json"},
    }
    if settings.meta.ai_plugin:
        document.update(settings.meta.ai_plugin)
    return web.json_response(document)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition (behind a relay key; a key may be scoped to it alone)."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_full(request: web.Request) -> web.Response:
    return web.json_response(
        build_openapi(request.app[TABLE], request.app[SETTINGS], actions=False)
    )


async def openapi_actions(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(request.app[TABLE], request.app[SETTINGS], actions=True))


_PRIVACY: Final = """Privacy policy of {name}

{name} is a relay between this team's clients (ChatGPT GPTs, scripts, apps) and the
OpenAI API. What you send through it goes to OpenAI, under the team's OpenAI account,
and OpenAI's answer comes back to you; OpenAI's own policies apply to that data.

The relay does not store the content of requests or answers. It logs one line per
request (time, route, status, size, duration, the name of the relay key used, and
request ids), never bodies or keys. Files it hands back to ChatGPT are kept for a
few minutes at most, behind links that expire.

Questions: ask the team that runs this relay.
"""


async def privacy(request: web.Request) -> web.StreamResponse:
    """``/privacy``: what a GPT shared by link or in the store must point to.

    ``[actions] privacy_url`` redirects there; ``privacy_text`` is served as is;
    without either, a plain statement of what relayd does with data.
    """
    settings = request.app[SETTINGS]
    if settings.actions.privacy_url:
        raise web.HTTPFound(settings.actions.privacy_url)
    text = settings.actions.privacy_text or _PRIVACY.format(name=settings.meta.name)
    return web.Response(text=text, content_type="text/plain", charset="utf-8")
