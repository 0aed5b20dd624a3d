"""Typed keys for what the application and each request carry.

They live in their own module, not in ``app.py``, because handlers need them and
``app.py`` imports the handlers (through the route table).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.web import AbstractRoute

from relayd.config import RelayKey, Settings
from relayd.routing import Route, RouteTable
from relayd.streams import Pumped
from relayd.usage import UsageTap

if TYPE_CHECKING:
    from weakref import WeakKeyDictionary

    from redis.asyncio import Redis

    from relayd.actions.handout_store import HandoutStore
    from relayd.auth import KeyRing
    from relayd.clientaddr import TrustedProxies
    from relayd.mcp.calls import CallBook
    from relayd.mcp.tools import ToolSet
    from relayd.memory import BufferBudget, Lease
    from relayd.metrics import Metrics
    from relayd.oauth.authority import Authority
    from relayd.paths import PathPolicy
    from relayd.spend.control import SpendControl, Ticket
    from relayd.streams.websocket import WebSocketBridge
    from relayd.upstream import Upstream

__all__ = [
    "booked",
    "BROKEN",
    "BUDGET",
    "BUFFERED",
    "ARGUMENTS",
    "DEADLINE",
    "ERROR_CODE",
    "FILE_HOSTS",
    "FILES_AS_LINKS",
    "HANDOUTS",
    "KEY",
    "KEYRING",
    "MCP_CALLS",
    "MCP_TOOLS",
    "OPERATION",
    "METRICS",
    "OAUTH",
    "POLICY",
    "REALTIME_BRIDGES",
    "REALTIME_USAGE",
    "REQUEST_ID",
    "CLIENT_ADDRESS",
    "CLIENT_LEFT",
    "SPEND",
    "SPEND_DOCUMENT",
    "SPEND_MODEL",
    "SPEND_TICKET",
    "SPEND_WATCH",
    "PROXIES",
    "ROUTE",
    "ROUTE_MAP",
    "SETTINGS",
    "STARTED",
    "STORE_CLIENT",
    "STREAMED",
    "TABLE",
    "TOOLS",
    "UPSTREAM",
    "UPSTREAM_FAILURE",
    "UPSTREAM_REQUEST_ID",
    "UPSTREAM_STATUS",
    "UPSTREAM_WAIT",
    "USAGE_TAP",
]

SETTINGS: Final = web.AppKey("relayd.settings", Settings)
TABLE: Final = web.AppKey("relayd.table", RouteTable)
ROUTE_MAP: Final = web.AppKey("relayd.route_map", dict[AbstractRoute, Route])
UPSTREAM: Final[web.AppKey[Upstream]] = web.AppKey("relayd.upstream")
KEYRING: Final[web.AppKey[KeyRing]] = web.AppKey("relayd.keyring")
POLICY: Final[web.AppKey[PathPolicy]] = web.AppKey("relayd.paths")
METRICS: Final[web.AppKey[Metrics]] = web.AppKey("relayd.metrics")
PROXIES: Final[web.AppKey[TrustedProxies]] = web.AppKey("relayd.trusted_proxies")
TOOLS: Final = web.AppKey("relayd.tools", dict)
STARTED: Final = web.AppKey("relayd.started", float)
# Signed download links and the store behind them (Actions: openaiFileResponse).
HANDOUTS: Final[web.AppKey[HandoutStore]] = web.AppKey("relayd.handouts")
# Open realtime bridges and the request that opened each (its relay key): closed
# with 1001 on shutdown (aiohttp's documented pattern), with 1008 when a reload
# revokes the key.
REALTIME_BRIDGES: Final[web.AppKey[WeakKeyDictionary[WebSocketBridge, web.Request]]] = web.AppKey(
    "relayd.realtime_bridges"
)

# relayd's OAuth authorization server (relayd/oauth/); absent without a public url.
OAUTH: Final[web.AppKey[Authority]] = web.AppKey("relayd.oauth")

# Bytes held whole for clients (parsed bodies, unfinished WebSocket messages).
BUDGET: Final[web.AppKey[BufferBudget]] = web.AppKey("relayd.budget")

REQUEST_ID: Final = web.RequestKey("relayd.request_id", str)
# The client's address: the peer's, or what a trusted proxy reports (clientaddr.py).
CLIENT_ADDRESS: Final = web.RequestKey("relayd.client_address", str)
# The request's share of BUDGET, released when its handler returns (limits.py).
BUFFERED: Final[web.RequestKey[Lease]] = web.RequestKey("relayd.buffered")
ROUTE: Final = web.RequestKey("relayd.route", Route)
KEY: Final = web.RequestKey("relayd.key", RelayKey)
UPSTREAM_REQUEST_ID: Final = web.RequestKey("relayd.upstream_request_id", str)
BROKEN: Final = web.RequestKey("relayd.broken", str)
# Seconds spent waiting on upstream for answer heads and whole small bodies.
UPSTREAM_WAIT: Final = web.RequestKey("relayd.upstream_wait", float)
# The streamed answer's counters (bytes sent, seconds waiting on upstream and on the
# client), live: read when the request is accounted, however the stream ended. What
# neither wait covers is relay overhead.
STREAMED: Final = web.RequestKey("relayd.streamed", Pumped)
# What failed on the upstream leg, in an operator's words (never sent to the client).
UPSTREAM_FAILURE: Final = web.RequestKey("relayd.upstream_failure", str)
UPSTREAM_STATUS: Final = web.RequestKey("relayd.upstream_status", int)
ERROR_CODE: Final = web.RequestKey("relayd.error_code", str)
# The usage tap that watched a model answer; read when the request is accounted.
USAGE_TAP: Final = web.RequestKey("relayd.usage_tap", UsageTap)
# Token totals of a realtime session, summed from its response.done events.
REALTIME_USAGE: Final = web.RequestKey("relayd.realtime_usage", dict[str, int])


# An operation run in-process for another face (relayd/operations.py): its input,
# already parsed (wrappers validate it instead of reading a body), the loop time by
# which it should answer, the file hosts the calling face adds to the fetch
# allowlist, and the largest image whose bytes come back inline beside its link
# (files then come back as {name, mime_type, url[, content]}, never inline only).
ARGUMENTS: Final = web.RequestKey("relayd.arguments", dict)
DEADLINE: Final = web.RequestKey("relayd.deadline", float)
FILE_HOSTS: Final = web.RequestKey("relayd.file_hosts", tuple)
FILES_AS_LINKS: Final = web.RequestKey("relayd.files_as_links", int)
# On the caller's request: the operationId it ran that way, for its access line.
OPERATION: Final = web.RequestKey("relayd.operation", str)
# MCP tool calls in flight or just answered, for repeats and late answers (mcp/calls.py).
MCP_CALLS: Final[web.AppKey[CallBook]] = web.AppKey("relayd.mcp_calls")
# The MCP tools, derived from the route table once at start (mcp/tools.py).
MCP_TOOLS: Final[web.AppKey[ToolSet]] = web.AppKey("relayd.mcp_tools")
# Spend control (relayd/metering.py): the process's control, the request's admitted
# ticket, a JSON answer relayd read whole, and a poll whose answer must be tapped.
SPEND: Final[web.AppKey[SpendControl]] = web.AppKey("relayd.spend")
SPEND_TICKET: Final[web.RequestKey[Ticket]] = web.RequestKey("relayd.spend_ticket")
SPEND_DOCUMENT: Final = web.RequestKey("relayd.spend_document", object)
SPEND_WATCH: Final = web.RequestKey("relayd.spend_watch", bool)
# The model field of a multipart body, read ahead of the file (relayd/metering.py).
SPEND_MODEL: Final = web.RequestKey("relayd.spend_model", str)
# The client went away while its answer streamed (no upstream fault).
CLIENT_LEFT: Final = web.RequestKey("relayd.client_left", bool)

# The one client of the shared store ([store] backend = "redis"; None: local), made
# first and closed last by app.py; every shared store of the process uses it.
STORE_CLIENT: Final[web.AppKey[Redis | None]] = web.AppKey("relayd.store_client")


def booked(request: web.Request) -> Mapping[Any, Any]:
    """What the request's handlers booked (the keys above), to read with ``get``.

    aiohttp keeps a request's mapping in a plain dict, but the request's own ``get``
    (``Mapping.get``) raises and catches a KeyError for every absent key, and many
    keys are absent on most requests: the dict itself answers them at a fraction of
    the cost. aiohttp is pinned to the minor version whose ``_state`` this reads."""
    state = getattr(request, "_state", None)
    return state if type(state) is dict else dict(request)
