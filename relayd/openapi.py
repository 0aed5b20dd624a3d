"""OpenAPI documents derived from the route table (apispec).

``/openapi.json`` documents every declared route; ``/openapi.actions.json`` is the
subset offered to ChatGPT's GPT builder: routes whose exposure is ``actions``, one
https server (``RELAYD_PUBLIC_URL``) and one security scheme.
"""

from __future__ import annotations

from typing import Any

from apispec import APISpec

from relayd import __version__
from relayd.config import Settings
from relayd.routing import Body, Exposure, Route, RouteTable

__all__ = ["build_openapi"]

_PASSTHROUGH_RESPONSE = {
    "description": "The upstream API's answer, passed through unchanged.",
}
_ERROR_RESPONSE = {
    "description": "An error in OpenAI's shape.",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}},
    },
}
_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}


def _parameters(route: Route) -> list[dict[str, Any]]:
    params = []
    for segment in route.path.split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            name = segment[1:-1].split(":", 1)[0]
            params.append(
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            )
    return params


def _request_body(route: Route) -> dict[str, Any] | None:
    if route.body is Body.NONE:
        return None
    free_form = {"type": "object", "properties": {}, "additionalProperties": True}
    media = route.body.media_types or ("application/octet-stream",)
    return {
        "required": True,
        "content": {m: {"schema": free_form} for m in media},
    }


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.group],
        "responses": {"200": _PASSTHROUGH_RESPONSE, "default": _ERROR_RESPONSE},
    }
    if route.description:
        operation["description"] = route.description
    if params := _parameters(route):
        operation["parameters"] = params
    if body := _request_body(route):
        operation["requestBody"] = body
    if route.exposure is Exposure.PUBLIC:
        operation["security"] = []
    if route.consequential is not None:
        operation["x-openai-isConsequential"] = route.consequential
    return operation


def build_openapi(table: RouteTable, settings: Settings, *, actions: bool) -> dict[str, Any]:
    title = settings.relay_name + (" (Actions)" if actions else "")
    spec = APISpec(
        title=title,
        version=__version__,
        openapi_version="3.1.0",
        info={"description": "A streaming relay to the OpenAI API."},
        servers=[{"url": settings.public_url}] if settings.public_url else [],
    )
    spec.components.security_scheme("RelayKey", {"type": "http", "scheme": "bearer"})
    spec.components.schema("Error", _ERROR_SCHEMA)
    routes = table.documented()
    if actions:
        routes = [r for r in routes if r.exposure is Exposure.ACTIONS]
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    document = spec.to_dict()
    document["security"] = [{"RelayKey": []}]
    return document
