"""Lint an OpenAPI document against the GPT builder's rules
(docs/chatgpt.md#the-actions-document).

Each violation carries the builder's own wording where it is known (the
strings builders report when an import fails), so what ``relayd openapi
--actions --check`` prints is what the builder would have said. Rules with no
known builder wording (unique and well-formed operationIds, ``openaiFileIdRefs``
as strings, a deliberate ``x-openai-isConsequential``) say plainly what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["Violation", "lint"]

MAX_OPERATIONS: Final = 30
MAX_DESCRIPTION: Final = 300
MAX_PARAMETER_DESCRIPTION: Final = 700
_METHODS: Final = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_OPERATION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SCHEMA_REF: Final = "#/components/schemas/"


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str
    message: str

    def __str__(self) -> str:
        return self.message


def lint(document: Any) -> list[Violation]:
    """Every rule ``document`` breaks; an empty list means the builder takes it."""
    if not isinstance(document, dict):
        return [Violation("document", "The document is not a JSON/YAML object.")]
    found: list[Violation] = []
    found += _version_and_info(document)
    found += _servers(document.get("servers"))
    found += _components(document.get("components"))
    found += _security(document)
    found += _operations(document)
    found += _objects(document)
    return found


def _version_and_info(document: dict[str, Any]) -> Iterator[Violation]:
    if document.get("openapi") not in ("3.1.0", "3.1.1"):
        yield Violation("openapi", "('openapi',): Input should be '3.1.1' or '3.1.0'")
    info = document.get("info")
    for field in ("title", "version"):
        if not isinstance(info, dict) or not isinstance(info.get(field), str):
            yield Violation("info", f"('info', '{field}'): field required")


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].lower()


def _servers(servers: Any) -> Iterator[Violation]:
    urls = (
        [s["url"] for s in servers or [] if isinstance(s, dict) and isinstance(s.get("url"), str)]
        if isinstance(servers, list)
        else []
    )
    valid = [u for u in urls if re.fullmatch(r"https://[^/\s]+(/\S*)?", u)]
    if not valid:
        yield Violation("servers", "Could not find a valid URL in `servers`")
        return
    if len(urls) > 1:
        yield Violation("servers", f"Multiple servers found, using {valid[0]}")
        for url in urls:
            if _host(url) != _host(valid[0]):
                yield Violation("servers", f"Found multiple hostnames, dropping {url}")


def _components(components: Any) -> Iterator[Violation]:
    schemas = components.get("schemas") if isinstance(components, dict) else None
    if not isinstance(schemas, dict):
        yield Violation("components", "In components section, schemas subsection is not an object")
        return
    if _has_cycle(schemas):
        yield Violation("components", "Components section contains a circular dependency")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_SCHEMA_REF):
            yield ref.removeprefix(_SCHEMA_REF)
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _has_cycle(schemas: dict[str, Any]) -> bool:
    graph = {name: set(_refs(schema)) for name, schema in schemas.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str) -> bool:
        if state.get(name) == 1:
            return True
        if state.get(name) == 2 or name not in graph:
            return False
        state[name] = 1
        if any(visit(child) for child in graph[name]):
            return True
        state[name] = 2
        return False

    return any(visit(name) for name in graph)


def _security(document: dict[str, Any]) -> Iterator[Violation]:
    components = document.get("components")
    schemes = components.get("securitySchemes") if isinstance(components, dict) else None
    if isinstance(schemes, dict) and len(schemes) > 1:
        yield Violation("security", "Found multiple security schemes, only 1 is supported")
    if "security" in document and not isinstance(document["security"], list):
        yield Violation("security", "Input should be a valid list")


def _operations(document: dict[str, Any]) -> Iterator[Violation]:
    paths = document.get("paths")
    if not isinstance(paths, dict):
        return
    components = document.get("components")
    schemas = components.get("schemas") if isinstance(components, dict) else None
    schemas = schemas if isinstance(schemas, dict) else {}
    seen: set[str] = set()
    count = 0
    for path, item in paths.items():
        if not str(path).startswith("/"):
            yield Violation("paths", f"Path {path} does not start with a slash; skipping")
            continue
        if not isinstance(item, dict):
            continue
        for method in _METHODS:
            operation = item.get(method)
            if not isinstance(operation, dict):
                continue
            count += 1
            op_id = operation.get("operationId")
            if not isinstance(op_id, str) or not op_id:
                yield Violation(
                    "operationId",
                    f"In path {path}, method {method} is missing operationId; skipping",
                )
                continue
            if not _OPERATION_ID.fullmatch(op_id):
                yield Violation(
                    "operationId",
                    f"operationId {op_id!r} must be 1 to 64 ASCII letters, digits, '_' or '-'",
                )
            if op_id in seen:
                yield Violation("operationId", f"operationId {op_id} is used more than once")
            seen.add(op_id)
            yield from _operation(op_id, operation, item.get("parameters"), schemas)
    if count > MAX_OPERATIONS:
        yield Violation("operations", "OpenAPI spec can have a maximum of 30 operations")


def _operation(
    op_id: str, operation: dict[str, Any], shared: Any, schemas: dict[str, Any]
) -> Iterator[Violation]:
    for field in ("summary", "description"):
        text = operation.get(field)
        if isinstance(text, str) and len(text) > MAX_DESCRIPTION:
            yield Violation(
                "description",
                f"{op_id}.{field} has length {len(text)} exceeding limit of {MAX_DESCRIPTION}",
            )
    parameters = [*(shared if isinstance(shared, list) else []), *operation.get("parameters", [])]
    bad_parameter = False
    for parameter in parameters:
        if not isinstance(parameter, dict) or not isinstance(parameter.get("name"), str):
            bad_parameter = True
            yield Violation(
                "parameters", f"parameter {parameter!r} has missing or non-string name; skipping"
            )
            continue
        text = parameter.get("description")
        if isinstance(text, str) and len(text) > MAX_PARAMETER_DESCRIPTION:
            yield Violation(
                "description",
                f"{op_id}.{parameter['name']}.description has length {len(text)} exceeding "
                f"limit of {MAX_PARAMETER_DESCRIPTION}",
            )
    if bad_parameter:
        yield Violation("parameters", f"{op_id}: skipping function due to errors")
    if not isinstance(operation.get("x-openai-isConsequential"), bool):
        yield Violation(
            "consequential",
            f"{op_id} does not set x-openai-isConsequential (true: ChatGPT always asks "
            "the user first; false: the user may allow it once for all)",
        )
    for node in _walk(operation.get("requestBody"), schemas, set()):
        refs = (
            node.get("properties", {}).get("openaiFileIdRefs")
            if isinstance(node.get("properties"), dict)
            else None
        )
        if refs is not None and not (
            isinstance(refs, dict)
            and refs.get("type") == "array"
            and isinstance(refs.get("items"), dict)
            and refs["items"].get("type") == "string"
        ):
            yield Violation(
                "openaiFileIdRefs",
                f"{op_id}: openaiFileIdRefs must be declared as an array of strings "
                "(ChatGPT fills it with file objects at run time)",
            )


def _walk(node: Any, schemas: dict[str, Any], followed: set[str]) -> Iterator[dict[str, Any]]:
    """Every object under ``node``, following ``$ref``s into the component schemas."""
    if isinstance(node, dict):
        yield node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_SCHEMA_REF):
            name = ref.removeprefix(_SCHEMA_REF)
            if name not in followed:
                followed.add(name)
                yield from _walk(schemas.get(name), schemas, followed)
        for value in node.values():
            yield from _walk(value, schemas, followed)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value, schemas, followed)


def _objects(document: dict[str, Any]) -> Iterator[Violation]:
    """Every ``type: object`` needs ``properties`` (``{}`` will do)."""

    def visit(node: Any, where: str) -> Iterator[Violation]:
        if isinstance(node, dict):
            kind = node.get("type")
            is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)
            if is_object and not isinstance(node.get("properties"), dict):
                yield Violation("objects", f"object schema missing properties in {where}")
            for key, value in node.items():
                yield from visit(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from visit(value, f"{where}/{index}")

    for section in ("paths", "components"):
        yield from visit(document.get(section), f"#/{section}")
