"""The route table is the single source: router, manifest and OpenAPI agree with it."""

from __future__ import annotations

import re

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relayd.actions.wrappers import forward_validated
from relayd.routes import TABLE
from relayd.routing import Exposure, Route, RouteTable
from relayd.state import ROUTE_MAP

SPEC_PUBLIC = {
    "/",
    "/health",
    "/v1/health",
    "/openapi.json",
    "/openapi.actions.json",
    "/manifest",
    "/.well-known/ai-plugin.json",
    "/privacy",
    # docs/security.md#oauth: how an OAuth client gets a token at all.
    "/.well-known/oauth-protected-resource",
    "/.well-known/oauth-protected-resource/mcp",
    "/.well-known/oauth-authorization-server",
    "/.well-known/openid-configuration",
    "/oauth/authorize",
    "/oauth/token",
    "/oauth/revoke",
    "/oauth/register",
}


def test_every_registered_route_is_classified(relay: TestClient) -> None:
    app = relay.server.app
    assert app is not None
    route_map = app[ROUTE_MAP]
    registered = [r for r in app.router.routes()]
    assert registered, "no routes registered"
    for aio_route in registered:
        route = route_map.get(aio_route)
        assert route is not None, f"unclassified route {aio_route.method} {aio_route.resource}"
        assert route.group and route.operation_id and route.summary
        assert isinstance(route.exposure, Exposure)
    assert len(route_map) == len(TABLE)


async def _handler(request: web.Request) -> web.StreamResponse:
    return web.Response()


def _route(method: str, path: str, operation_id: str) -> Route:
    return Route(method, path, _handler, "test", Exposure.RELAY, operation_id, "A test route")


def test_a_table_refuses_a_path_and_method_declared_twice() -> None:
    with pytest.raises(ValueError, match="GET /v1/things is declared twice"):
        RouteTable(
            [
                _route("GET", "/v1/things", "listThings"),
                _route("GET", "/v1/things", "listThingsAgain"),
            ]
        )


def test_a_table_refuses_an_operation_id_used_twice() -> None:
    with pytest.raises(ValueError, match="'listThings' is used twice"):
        RouteTable(
            [_route("GET", "/v1/things", "listThings"), _route("POST", "/v1/things", "listThings")]
        )


def test_one_path_may_serve_several_methods() -> None:
    table = RouteTable(
        [_route("GET", "/v1/things", "listThings"), _route("POST", "/v1/things", "createThing")]
    )
    assert table.methods_for("/v1/things") == {"GET", "POST"}


def test_public_routes_are_exactly_the_spec_list() -> None:
    public = {r.path for r in TABLE if r.exposure is Exposure.PUBLIC}
    assert public == SPEC_PUBLIC


def test_only_the_public_list_and_signed_links_are_served_without_a_key() -> None:
    # A signed download link carries its own HMAC signature instead of a key:
    # ChatGPT fetches openaiFileResponse URLs without the action's credentials.
    keyless = {(r.method, r.path) for r in TABLE if not r.needs_key}
    signed = {("GET", "/v1/actions/downloads/{token}")}
    # OAuth's forms are posted by browsers and clients that have no key yet.
    posted = {"/oauth/authorize", "/oauth/token", "/oauth/revoke", "/oauth/register"}
    gets = SPEC_PUBLIC - posted | {"/oauth/authorize"}
    expected = {("GET", p) for p in gets} | {("POST", p) for p in posted} | signed
    assert keyless == expected
    assert {(r.method, r.path) for r in TABLE if r.exposure is Exposure.SIGNED} == signed


def test_catch_all_is_last() -> None:
    assert list(TABLE)[-1].path == "/v1/{tail:.*}"


async def test_manifest_lists_every_documented_route(relay: TestClient) -> None:
    manifest = await (await relay.get("/manifest")).json()
    listed = {(r["method"], r["path"]) for r in manifest["routes"]}
    assert listed == {(r.method, r.path) for r in TABLE.documented()}
    assert manifest["groups"]["files"] == [
        "/v1/files",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/content",
    ]


async def test_openapi_documents_every_documented_route(relay: TestClient) -> None:
    document = await (await relay.get("/openapi.json")).json()
    assert document["openapi"] == "3.1.0"
    operations = {
        (method.upper(), path): op["operationId"]
        for path, item in document["paths"].items()
        for method, op in item.items()
    }
    assert operations == {(r.method, r.path): r.operation_id for r in TABLE.documented()}


def test_each_wrapper_that_only_forwards_names_its_schema_and_upstream_path() -> None:
    """forward_validated reads both from its route, so the table must give both, and
    the upstream path can only use the route's own path parameters."""
    forwarding = [r for r in TABLE if r.handler is forward_validated]
    assert forwarding
    for route in forwarding:
        assert route.request_schema is not None, route.operation_id
        assert route.forwards_to is not None, route.operation_id
        assert set(re.findall(r"\{(\w+)\}", route.forwards_to)) == set(
            re.findall(r"\{(\w+)\}", route.path)
        ), route.operation_id
    assert all(r.forwards_to is None for r in TABLE if r.handler is not forward_validated)
