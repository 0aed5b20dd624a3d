"""The route table is the single source: router, manifest and OpenAPI agree with it."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from relayd.routes import TABLE
from relayd.routing import Exposure
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


def test_no_path_and_method_declared_twice() -> None:
    pairs = [(r.method, r.path) for r in TABLE]
    assert len(pairs) == len(set(pairs))
    ids = [r.operation_id for r in TABLE]
    assert len(ids) == len(set(ids))


def test_public_routes_are_exactly_the_spec_list() -> None:
    public = {r.path for r in TABLE if r.exposure is Exposure.PUBLIC}
    # /privacy arrives with the Actions surface; nothing outside the list is public.
    assert public <= SPEC_PUBLIC
    assert SPEC_PUBLIC - public <= {"/privacy"}


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
