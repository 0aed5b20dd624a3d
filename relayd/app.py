"""The application factory: middlewares, resource lifetimes, and the route table.

A request travels: access (request id, log line) → errors (OpenAI shape) → paths
(no path tricks, on every route) → auth (route lookup, relay key, scopes) → limits
(head size, media type, body size) → handler. Errors are rendered outside auth so
that its refusals share the shape.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relayd.actions.handout_store import HandoutStore, handout_store_ctx
from relayd.auth import KeyRing, auth_middleware
from relayd.client_documents import document_fetcher
from relayd.clientaddr import TrustedProxies
from relayd.config import ConfigError, Settings
from relayd.error_shape import error_middleware
from relayd.handlers.realtime import close_bridges
from relayd.limits import limits_middleware
from relayd.logs import access_middleware, add_request_id, scrub_aiohttp_logs
from relayd.mcp.calls import CallBook
from relayd.mcp.tools import ToolSet
from relayd.memory import BufferBudget, MemoryReturn
from relayd.metrics import Metrics
from relayd.oauth import Authority, Endpoints
from relayd.openapi import actions_routes
from relayd.paths import PathPolicy, path_middleware
from relayd.routes import TABLE
from relayd.routing import RouteTable
from relayd.spend.control import SpendControl, SpendHooks
from relayd.spend.prices import PriceBook
from relayd.state import (
    BUDGET,
    HANDOUTS,
    KEYRING,
    MCP_CALLS,
    MCP_TOOLS,
    METRICS,
    OAUTH,
    POLICY,
    PROXIES,
    REALTIME_BRIDGES,
    ROUTE_MAP,
    SETTINGS,
    SPEND,
    STARTED,
    STORE_CLIENT,
    TOOLS,
    UPSTREAM,
)
from relayd.state import TABLE as TABLE_KEY
from relayd.store import state_dir
from relayd.store.attempts import attempt_limit
from relayd.store.blobs import open_blob_store
from relayd.store.grants import open_grant_store
from relayd.store.ledger import LEDGER_FILE, Ledger, LedgerUnavailableError, SqliteLedger
from relayd.store.signing import signing_key
from relayd.tasks import spawn
from relayd.upstream import Upstream

__all__ = ["create_app", "load_tools"]

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("relayd.spend")


def load_tools(path: str | None) -> dict[str, dict[str, Any]]:
    """The tools manifest (``{"object": "list", "data": [...]}`` or a bare list), by id."""
    if path is None:
        return {}
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read tools manifest {path!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"tools manifest {path!r} is not valid JSON: {exc}") from None
    items = document.get("data") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise ConfigError(f"tools manifest {path!r} must be a list or have a 'data' list")
    tools: dict[str, dict[str, Any]] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ConfigError(f"tools manifest {path!r}: every tool needs a string 'id'")
        tools[item["id"]] = item
    return tools


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    upstream = app[UPSTREAM]
    await upstream.start()
    try:
        yield
    finally:
        await upstream.close()


async def _close_calls(app: web.Application) -> None:
    app[MCP_CALLS].close()


def _store_client(settings: Settings) -> Redis | None:
    """The one client of the shared store, when it is Redis (redis-py loads only then)."""
    if settings.store.backend != "redis":
        return None
    from relayd.store.redis import connect

    return connect(settings)


def _spend_control(settings: Settings, metrics: Metrics, client: Redis | None) -> SpendControl:
    """The process's spend control; its ledger opens on first use. ``client``: the
    shared store's (STORE_CLIENT), for the ledger on Redis."""
    ledger: Ledger | None = None

    def observe(name: str, seconds: float) -> None:
        metrics.ledger_seconds.labels(name).observe(seconds)

    if settings.spend.backend != "off" and client is not None:
        from relayd.store.ledger_redis import RedisLedger  # redis-py: only with Redis

        ledger = RedisLedger(client, settings, observe=observe)
    elif settings.spend.backend != "off":
        ledger = SqliteLedger(
            state_dir(settings) / LEDGER_FILE,
            busy_timeout_s=settings.store.busy_timeout_s,
            observe=observe,
        )
    hooks = SpendHooks(
        spent=metrics.count_spend,
        refused=lambda reason: metrics.spend_refusals.labels(reason).inc(),
        passed_open=metrics.spend_open_passes.inc,
    )
    return SpendControl(settings, ledger, PriceBook.load(settings), hooks=hooks)


async def _spend_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep live reservations extended and expire dead ones; at the end, write every
    settlement still scheduled before the ledger closes."""
    control = app[SPEND]
    if control.ledger is not None:
        try:
            await control.ledger.open()
        except LedgerUnavailableError as exc:
            log.error("spend ledger unavailable at start (retried on first use): %s", exc)
    upkeep = spawn(control.run_upkeep(), name="relayd.spend.upkeep") if control.enabled else None
    try:
        yield
    finally:
        if upkeep is not None:
            upkeep.cancel()
        await control.drain()
        if control.ledger is not None:
            await control.ledger.close()


async def _close_budget(app: web.Application) -> None:
    app[BUDGET].close()


def _add_oauth(app: web.Application, settings: Settings, table: RouteTable) -> None:
    """relayd's OAuth authorization server, when a public url gives it its URLs
    (without one its routes answer that it is needed: relayd never guesses)."""
    endpoints = Endpoints.build(settings, table)
    if endpoints is None:
        return
    store = open_grant_store(settings, app[STORE_CLIENT])
    fetch = document_fetcher(app[UPSTREAM], settings)
    limits = functools.partial(attempt_limit, settings, app[STORE_CLIENT])
    app[OAUTH] = Authority(settings, endpoints, store, fetch, limits)

    async def close_store(app: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(close_store)


async def _close_store_client(app: web.Application) -> None:
    """The shared store's client closes after everything that uses it: aiohttp runs
    every ``cleanup_ctx`` exit first, then ``on_cleanup`` in order, and this is the
    last one added."""
    if (client := app[STORE_CLIENT]) is not None:
        await client.aclose()


def create_app(settings: Settings, table: RouteTable = TABLE) -> web.Application:
    scrub_aiohttp_logs()  # aiohttp quotes client bytes (relay keys too) in two log lines
    app = web.Application(
        middlewares=[
            access_middleware,
            error_middleware,
            path_middleware,  # a path trick is refused before the key is even asked for
            auth_middleware,
            limits_middleware,
        ],
        client_max_size=settings.limits.max_json_bytes,
        # Request bodies stay as the client encoded them: pass-through bodies go
        # upstream untouched, and those relayd parses are decoded under a cap as
        # they arrive (headers.BodyDecoder), never inflated whole by aiohttp.
        handler_args={"max_field_size": 16 * 1024, "auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[TABLE_KEY] = table
    app[KEYRING] = KeyRing(settings.auth.keys)
    app[POLICY] = PathPolicy(settings.policy.allow, settings.policy.deny)
    app[METRICS] = Metrics()
    app[PROXIES] = TrustedProxies(settings.server.trusted_proxies)
    app[UPSTREAM] = Upstream(settings)
    app[BUDGET] = BufferBudget(
        settings.limits.max_buffered_bytes,
        settings.limits.max_buffered_bytes_per_key,
        memory_return=MemoryReturn(),
    )
    app[REALTIME_BRIDGES] = weakref.WeakKeyDictionary()
    app[TOOLS] = load_tools(settings.meta.tools_manifest)
    app[STARTED] = time.monotonic()
    app[ROUTE_MAP] = table.register(app.router)
    app.cleanup_ctx.append(_upstream_ctx)
    # The one client of the shared store (backend redis), before anything uses it;
    # it connects on first use.
    app[STORE_CLIENT] = _store_client(settings)
    app[SPEND] = _spend_control(settings, app[METRICS], app[STORE_CLIENT])
    app.cleanup_ctx.append(_spend_ctx)
    # The Actions surface: its download store, and its operation list checked now
    # (an unknown operationId is a config error at start, not a 500 later).
    actions_routes(table, settings)
    app[HANDOUTS] = HandoutStore(
        settings,
        app[KEYRING],
        open_blob_store(settings, app[STORE_CLIENT]),
        signing_key(settings),
    )
    app.cleanup_ctx.append(handout_store_ctx)
    _add_oauth(app, settings, table)
    # The MCP face: its tools derived now (an unknown [mcp] tools name is a config
    # error at start), and the book of tool calls in flight.
    app[MCP_TOOLS] = ToolSet.build(table, settings)
    app[MCP_CALLS] = CallBook(settings.mcp)
    app.on_cleanup.append(_close_calls)
    app.on_shutdown.append(close_bridges)
    app.on_cleanup.append(_close_budget)
    app.on_response_prepare.append(add_request_id)
    app.on_cleanup.append(_close_store_client)  # keep last (see its docstring)
    return app
