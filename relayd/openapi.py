"""OpenAPI documents derived from the route table (apispec and its marshmallow plugin).

- ``/openapi.json`` documents every declared route (the catch-all aside), with the
  marshmallow schemas of the wrapper bodies and of relayd's own answers.
- ``/openapi.actions.json`` is what ChatGPT's GPT builder imports: the configured
  Actions operations (``[actions] operations``, at most 30, default
  :data:`DEFAULT_ACTIONS`), exactly one https server and one security scheme,
  shaped to pass every builder rule (actions/lint.py checks it; so do the tests).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.common import resolve_schema_cls
from marshmallow import fields

from relayd import __version__
from relayd.actions.schemas import FileRefField
from relayd.config import ConfigError, Settings
from relayd.routing import Body, Exposure, Route, RouteTable

__all__ = ["DEFAULT_ACTIONS", "OperationSchemas", "actions_routes", "build_openapi", "json_schemas"]

# A team GPT's toolbox: ask a model (answer or poll), images in and out, files in
# and out, videos, and the JSON proxy for everything else; 12 of the 30 allowed.
DEFAULT_ACTIONS: Final[tuple[str, ...]] = (
    "createActionResponse",
    "getActionResponse",
    "generateImageAction",
    "editImageAction",
    "createImageVariationAction",
    "uploadFileAction",
    "getFileContentAction",
    "generateVideoAction",
    "remixVideoAction",
    "getVideoContentAction",
    "proxyRequest",
    "getRelayInfo",
)

_DESCRIPTION: Final = "A streaming relay to the OpenAI API for one team."
_ACTIONS_DESCRIPTION: Final = (
    "The team's relay to the OpenAI API: ask a model, make and edit images, upload "
    "and fetch files, make videos, and call other OpenAI JSON endpoints. Files come "
    "back as openaiFileResponse; slow answers return an id to poll."
)

_NO_PUBLIC_URL: Final = (
    "This relay has no public url: set RELAYD_PUBLIC_URL to its https origin "
    "to name the server ChatGPT calls."
)

_PASSTHROUGH: Final = {"description": "The upstream API's answer, passed through unchanged."}
_ERROR_REF: Final = {
    "description": "An error in OpenAI's shape.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _error_schema(nullable: bool) -> dict[str, Any]:
    # The GPT builder is wary of null unions, so its document says string
    # (docs/chatgpt.md#the-actions-document).
    maybe: Any = ["string", "null"] if nullable else "string"
    return {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": maybe},
                    "code": {"type": maybe},
                },
                "required": ["message", "type"],
            }
        },
        "required": ["error"],
    }


def actions_routes(table: RouteTable, settings: Settings) -> list[Route]:
    """The routes of the Actions document, in table order.

    A configured operationId that the table lacks, or whose route is not an Actions
    candidate (``Exposure.ACTIONS``), is a configuration error.
    """
    candidates = {r.operation_id: r for r in table if r.exposure is Exposure.ACTIONS}
    chosen = settings.actions.operations
    if chosen is None:
        wanted = {op for op in DEFAULT_ACTIONS if op in candidates}
    else:
        for op in chosen:
            if op not in candidates:
                known = {r.operation_id for r in table}
                why = "is not offered to Actions" if op in known else "is not an operationId"
                raise ConfigError(
                    f"[actions] operations: {op!r} {why}; candidates: "
                    f"{', '.join(sorted(candidates))}"
                )
        wanted = set(chosen)
    return [r for r in table if r.operation_id in wanted]


def _parameters(route: Route) -> list[dict[str, Any]]:
    params = []
    for segment in route.path.split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            name = segment[1:-1].split(":", 1)[0]
            params.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "description": f"The {name.replace('_', ' ')}.",
                    "schema": {"type": "string"},
                }
            )
    return params


def _request_body(route: Route) -> dict[str, Any] | None:
    if route.request_schema is not None:
        return {
            "required": True,
            "content": {"application/json": {"schema": route.request_schema}},
        }
    if route.body is Body.NONE:
        return None
    free_form = {"type": "object", "properties": {}, "additionalProperties": True}
    media = route.body.media_types or ("application/octet-stream",)
    return {"required": True, "content": {m: {"schema": free_form} for m in media}}


def _operation(route: Route, *, actions: bool) -> dict[str, Any]:
    ok: dict[str, Any] = _PASSTHROUGH
    if route.response_schema is not None:
        ok = {
            "description": "relayd's answer.",
            "content": {"application/json": {"schema": route.response_schema}},
        }
    elif route.exposure is Exposure.SIGNED:
        ok = {"description": "The file, with Content-Type and Content-Disposition."}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": {"200": ok, "default": _ERROR_REF},
    }
    if route.responses is not None:
        operation["responses"] = {**route.responses, "default": _ERROR_REF}
    if not actions:
        operation["tags"] = [route.group]
    if route.description:
        operation["description"] = route.description
    if params := _parameters(route):
        operation["parameters"] = params
    if body := _request_body(route):
        operation["requestBody"] = body
    if route.exposure in (Exposure.PUBLIC, Exposure.SIGNED):
        operation["security"] = []
    if route.consequential is not None:
        operation["x-openai-isConsequential"] = route.consequential
    return operation


def _schema_name(schema: Any) -> str:
    resolved = resolve_schema_cls(schema)
    cls = resolved[0] if isinstance(resolved, list) else resolved
    return cls.__name__.lstrip("_")


def _with_properties(node: Any) -> None:
    """Give every object schema ``properties`` (the GPT builder rejects one without)."""
    if isinstance(node, dict):
        kind = node.get("type")
        is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)
        if is_object and "properties" not in node:
            node["properties"] = {}
        for value in node.values():
            _with_properties(value)
    elif isinstance(node, list):
        for value in node:
            _with_properties(value)


def build_openapi(table: RouteTable, settings: Settings, *, actions: bool) -> dict[str, Any]:
    """One of the two documents, served by ``RELAYD_PUBLIC_URL``.

    The server is never taken from a request (``Host``, ``X-Forwarded-*``): a
    client would choose where the document sends ChatGPT (issue 11, item 7).
    Without a public url the server is ``/`` (relative to wherever the document
    was fetched) and the document says to set it; the GPT builder refuses that,
    which is what the operator needs to hear.
    """
    description = _ACTIONS_DESCRIPTION if actions else _DESCRIPTION
    if settings.server.public_url:
        servers = [{"url": settings.server.public_url.rstrip("/")}]
    else:
        servers = [{"url": "/", "description": _NO_PUBLIC_URL}]
        description = f"{description} {_NO_PUBLIC_URL}"
    spec = _spec(settings.meta.name + (" (Actions)" if actions else ""), description, servers)
    _security(spec, settings, actions=actions)
    spec.components.schema("Error", _error_schema(nullable=not actions))
    routes: Iterable[Route] = actions_routes(table, settings) if actions else table.documented()
    _add_paths(spec, routes, actions=actions)
    document = spec.to_dict()
    document["security"] = [{name: []} for name in document["components"]["securitySchemes"]]
    _with_properties(document)
    return document


def _spec(title: str, description: str, servers: list[dict[str, str]]) -> APISpec:
    """An empty document with relayd's one marshmallow converter configured."""
    plugin = MarshmallowPlugin(schema_name_resolver=_schema_name)
    spec = APISpec(
        title=title,
        version=__version__,
        openapi_version="3.1.0",
        info={"description": description},
        servers=servers,
        plugins=[plugin],
    )
    # Declared as strings, as the GPT builder wants (schemas.FileRefField explains).
    plugin.map_to_openapi_type(FileRefField, fields.String)  # type: ignore[no-untyped-call]
    return spec


def _add_paths(spec: APISpec, routes: Iterable[Route], *, actions: bool) -> None:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, actions=actions)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)


class OperationSchemas(NamedTuple):
    """An operation's JSON body and answer as self-contained JSON Schema (None: none)."""

    request: dict[str, Any] | None
    response: dict[str, Any] | None


def json_schemas(routes: Iterable[Route]) -> dict[str, OperationSchemas]:
    """Each route's request and answer schemas by operationId, converted exactly as
    for the documents (same converter, same builder-safe shapes) with every
    ``$ref`` inlined: for a face that describes operations on its own (MCP tools)."""
    chosen = list(routes)
    spec = _spec("schemas", "", [{"url": "/"}])
    _add_paths(spec, chosen, actions=True)
    document = spec.to_dict()
    _with_properties(document)
    components = document.get("components", {}).get("schemas", {})
    found: dict[str, OperationSchemas] = {}
    for route in chosen:
        operation = document["paths"][route.path][route.method.lower()]
        body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
        ok = operation["responses"]["200"].get("content", {}).get("application/json", {})
        found[route.operation_id] = OperationSchemas(
            _inlined(body.get("schema"), components), _inlined(ok.get("schema"), components)
        )
    return found


def _inlined(node: Any, components: dict[str, Any]) -> Any:
    """``node`` with each ``#/components/schemas/`` reference replaced by its schema
    (the documents have no circular references: actions/lint.py checks it)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _inlined(copy.deepcopy(components[ref.rsplit("/", 1)[-1]]), components)
        return {key: _inlined(value, components) for key, value in node.items()}
    if isinstance(node, list):
        return [_inlined(value, components) for value in node]
    return node


def _security(spec: APISpec, settings: Settings, *, actions: bool) -> None:
    bearer = {"type": "http", "scheme": "bearer", "description": "A relay key."}
    header = {
        "type": "apiKey",
        "in": "header",
        "name": settings.auth.header,
        "description": "A relay key.",
    }
    if not actions:
        spec.components.security_scheme("RelayKey", bearer)
        spec.components.security_scheme("RelayKeyHeader", header)
    elif settings.actions.auth == "header":
        spec.components.security_scheme("RelayKey", header)
    else:
        spec.components.security_scheme("RelayKey", bearer)
