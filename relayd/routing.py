"""What a route is, and the table that everything describing routes derives from.

``relayd/routes.py`` declares the table; this module only knows its shape. The
router, ``/manifest``, both OpenAPI documents, the path policy's "known path, wrong
method" answer and the tests that check every route is classified all read the
same :class:`RouteTable`; no path is written down twice.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from aiohttp import web
from aiohttp.web import AbstractRoute
from marshmallow import Schema

__all__ = ["Body", "Exposure", "Handler", "Route", "RouteTable"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Exposure(StrEnum):
    PUBLIC = "public"  # no relay key needed; documented
    RELAY = "relay"  # relay key; documented in /openapi.json
    ACTIONS = "actions"  # relay key; documented, and offered to the Actions subset
    INTERNAL = "internal"  # relay key; served but not documented (catch-all, metrics)
    # No relay key: the URL carries its own short-lived HMAC signature (the links
    # relayd hands ChatGPT in openaiFileResponse, which ChatGPT fetches without
    # the action's credentials). Documented, with ``security: []``.
    SIGNED = "signed"


class Body(StrEnum):
    """What a route accepts as a request body; anything else is a 415."""

    NONE = "none"
    JSON = "json"
    MULTIPART = "multipart"
    JSON_OR_MULTIPART = "json_or_multipart"
    ANY = "any"
    FORM = "form"  # application/x-www-form-urlencoded (OAuth's endpoints)

    @property
    def media_types(self) -> tuple[str, ...]:
        return _MEDIA_TYPES[self]


_MEDIA_TYPES: Final = {
    Body.NONE: (),
    Body.JSON: ("application/json",),
    Body.MULTIPART: ("multipart/form-data",),
    Body.JSON_OR_MULTIPART: ("application/json", "multipart/form-data"),
    Body.ANY: (),
    Body.FORM: ("application/x-www-form-urlencoded",),
}


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    group: str
    exposure: Exposure
    operation_id: str
    summary: str
    body: Body = Body.NONE
    description: str | None = None
    # The schema a wrapper validates its JSON body with: named here only, the handler
    # reads it from the route (relayd/actions/payload.py load()).
    request_schema: type[Schema] | None = None
    consequential: bool | None = None  # x-openai-isConsequential for Actions
    response_schema: type[Schema] | None = None  # relayd's own answers, documented
    # For a wrapper that only validates and forwards: the upstream path its JSON
    # body goes to, with the route's own path parameters.
    forwards_to: str | None = None
    # OpenAPI responses of a route that answers in shapes of its own (OAuth's
    # pages and RFC 6749 errors); the OpenAI error stays the default.
    responses: Mapping[str, Any] | None = None

    @property
    def needs_key(self) -> bool:
        return self.exposure not in (Exposure.PUBLIC, Exposure.SIGNED)


_PARAM: Final = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


def _template_regex(path: str) -> re.Pattern[str]:
    pattern, last = "", 0
    for match in _PARAM.finditer(path):
        pattern += re.escape(path[last : match.start()])
        pattern += f"(?:{match.group(2)})" if match.group(2) else "[^/]+"
        last = match.end()
    return re.compile(pattern + re.escape(path[last:]) + r"\Z")


async def _expect_after_checks(request: web.Request) -> None:
    """aiohttp's default sends ``100 Continue`` before any middleware runs, inviting
    an unauthenticated client to send its body; relayd answers ``Expect`` in the
    limits middleware instead, after auth and limits."""


class RouteTable:
    """An ordered, validated collection of routes."""

    def __init__(self, routes: Sequence[Route]) -> None:
        seen: set[tuple[str, str]] = set()
        ids: set[str] = set()
        for route in routes:
            key = (route.method, route.path)
            if key in seen:
                raise ValueError(f"route {route.method} {route.path} is declared twice")
            if route.operation_id in ids:
                raise ValueError(f"operationId {route.operation_id!r} is used twice")
            seen.add(key)
            ids.add(route.operation_id)
        self._routes = tuple(routes)
        self._regexes = {r.path: _template_regex(r.path) for r in self._routes}

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    @property
    def groups(self) -> frozenset[str]:
        """Every route group: the names a relay key's scopes may use."""
        return frozenset(route.group for route in self._routes)

    def by_operation_id(self, operation_id: str) -> Route:
        for route in self._routes:
            if route.operation_id == operation_id:
                return route
        raise KeyError(operation_id)

    def documented(self) -> list[Route]:
        return [r for r in self._routes if r.exposure is not Exposure.INTERNAL]

    def match(self, method: str, path: str) -> Route | None:
        """The documented route serving ``method`` on a concrete path, if any."""
        for route in self._routes:
            if (
                route.method == method
                and route.exposure is not Exposure.INTERNAL
                and self._regexes[route.path].match(path)
            ):
                return route
        return None

    def methods_for(self, path: str) -> set[str]:
        """Methods the table serves on a concrete path (for 405 answers)."""
        return {
            r.method
            for r in self._routes
            if r.exposure is not Exposure.INTERNAL and self._regexes[r.path].match(path)
        }

    def register(self, router: web.UrlDispatcher) -> dict[AbstractRoute, Route]:
        """Add every route to ``router``; return the aiohttp route → Route mapping."""
        resources: dict[str, web.Resource] = {}
        mapping: dict[AbstractRoute, Route] = {}
        for route in self._routes:
            resource = resources.get(route.path)
            if resource is None:
                resource = resources[route.path] = router.add_resource(route.path)
            aio_route = resource.add_route(
                route.method, route.handler, expect_handler=_expect_after_checks
            )
            mapping[aio_route] = route
        return mapping
