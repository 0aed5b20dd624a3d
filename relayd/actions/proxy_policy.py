"""What ``/v1/proxy`` may call: an allowlist and blocks, deny by default.

The rules are docs/security.md#the-proxy-envelope.

The envelope lets a GPT reach OpenAI JSON endpoints that have no operation of their
own, so it is narrow on purpose. A call passes only if, in this order:

1. its path survives normalisation: percent-decoding (repeated, so ``%252e`` is a
   dot), backslashes read as slashes, empty segments dropped, no dot segments, no
   whitespace or control characters, no absolute URL, no query or fragment;
2. no block matches the lower-cased path (so case tricks meet the block too):
   a stream asked for in any spelling (``stream`` in the body or the query, any
   value but false), ``:`` paths, the blocked families (admin, organization,
   webhooks, moderations, realtime, uploads, audio), ``/content`` and ``/results``,
   the proxy itself, and every endpoint the route table marks multipart;
3. the route table serves exactly that method and path (case-sensitive), in one of
   the allowed families below. The call carries that route's group: the caller's key
   needs its scope as well as ``proxy`` (handlers/proxy.py checks it).

Every refusal is a 403 with its reason (a malformed envelope is a 400).
This module is apart from paths.py, which rules the catch-all by operator patterns;
here the rules are fixed and derived from the route table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from yarl import URL

from relayd.errors import BadRequestError, PermissionDeniedError
from relayd.routing import Body, Exposure, RouteTable

__all__ = ["ProxyCall", "check_proxy_call", "normalise_path"]

# group -> (methods, path templates under it that are not offered)
_FAMILIES: Final[Mapping[str, tuple[frozenset[str], tuple[str, ...]]]] = {
    "responses": (frozenset({"GET", "POST", "DELETE"}), ()),
    "embeddings": (frozenset({"POST"}), ()),
    "models": (frozenset({"GET"}), ()),
    "images": (frozenset({"POST"}), ()),  # generations; edits/variations are multipart
    "videos": (frozenset({"GET", "DELETE"}), ()),  # metadata; content is binary
    "vector_stores": (frozenset({"GET", "POST", "DELETE"}), ()),
    "containers": (
        frozenset({"GET", "POST", "DELETE"}),
        ("/v1/containers/{container_id}/files",),  # the control plane only
    ),
    "conversations": (
        frozenset({"GET", "POST", "DELETE"}),
        ("/v1/conversations/{conversation_id}/items",),
    ),
    "files": (frozenset({"GET", "DELETE"}), ()),  # metadata; create is multipart
    "batches": (frozenset({"GET", "POST"}), ()),
}

_BLOCKED_PREFIXES: Final = (
    "/v1/admin",
    "/v1/organization",
    "/v1/webhooks",
    "/v1/moderations",
    "/v1/realtime",  # WebSockets and SDP, not Actions-friendly
    "/v1/uploads",  # resumable multipart: use /v1/actions/uploads
    "/v1/audio",  # multipart or binary
)
_BLOCKED_PATHS: Final = frozenset({"/v1/proxy", "/v1/responses:stream"})
_BLOCKED_SUFFIXES: Final = ("/content", "/results")

_SCHEME: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_DECODE_ROUNDS: Final = 3


@dataclass(frozen=True, slots=True)
class ProxyCall:
    method: str
    path_qs: str  # normalised path and encoded query, ready for Upstream.open()
    body: Any
    group: str  # the route group of the target: a key needs its scope too


def _blocked(reason: str) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"/v1/proxy refused the call: {reason}.", code="proxy_blocked", param="path"
    )


def normalise_path(raw: str) -> str:
    """The canonical ``/v1/...`` path ``raw`` stands for; 400/403 for tricks."""
    path = raw.strip()
    if not path:
        raise BadRequestError("path is required.", param="path")
    if "://" in path or path.startswith("//") or _SCHEME.match(path):
        raise _blocked("path must be an OpenAI API path such as /v1/models, not a URL")
    if "?" in path or "#" in path:
        raise BadRequestError(
            "path must not carry '?' or '#'; put query parameters in 'query'.", param="path"
        )
    for _ in range(_DECODE_ROUNDS):
        try:
            decoded = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise BadRequestError(
                "path is not valid percent-encoded UTF-8.", param="path"
            ) from None
        if decoded == path:
            break
        path = decoded
    else:
        raise _blocked("the path is percent-encoded more than twice")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise _blocked("path must not contain whitespace or control characters")
    if "?" in path or "#" in path:
        raise _blocked("the path hides '?' or '#' in percent-encoding")
    segments = [s for s in path.replace("\\", "/").split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise _blocked("path must not contain '.' or '..' segments")
    if not segments or segments[0].lower() != "v1":
        # GPTs written for an earlier relay send "/models" for "/v1/models".
        segments.insert(0, "v1")
    segments[0] = "v1"
    return "/" + "/".join(segments)


def _asks_for_stream(body: Any, query: Mapping[str, Any] | None) -> bool:
    """Whether a stream is asked for in any spelling. Only false (or null, or
    absent) passes: upstream, or anything between, may read ``"true"``, ``1``,
    ``"false"`` (a non-empty string) or ``["true"]`` as true."""
    if isinstance(body, dict) and body.get("stream", False) not in (False, None):
        return True
    for name, value in (query or {}).items():
        if name.lower().rstrip("[]") != "stream":
            continue
        for item in value if isinstance(value, list) else [value]:
            if item is not False and not (isinstance(item, str) and item.lower() == "false"):
                return True
    return False


def _query(query: Mapping[str, Any] | None) -> dict[str, str | list[str]]:
    out: dict[str, str | list[str]] = {}
    for name, value in (query or {}).items():
        values = value if isinstance(value, list) else [value]
        texts = []
        for item in values:
            if isinstance(item, bool):
                texts.append("true" if item else "false")
            elif isinstance(item, str | int | float):
                texts.append(str(item))
            else:
                raise BadRequestError(
                    f"query parameter {name!r} must be text, a number, true/false, or a "
                    "list of those.",
                    param="query",
                )
        out[name] = texts if isinstance(value, list) else texts[0]
    return out


def check_proxy_call(
    table: RouteTable, method: str, raw_path: str, query: Mapping[str, Any] | None, body: Any
) -> ProxyCall:
    """The upstream call an envelope stands for, or the 400/403 that refuses it."""
    path = normalise_path(raw_path)
    lowered = path.lower()
    if _asks_for_stream(body, query):
        raise _blocked(
            "stream=true (or any stream value but false) is not allowed (ChatGPT cannot "
            "read a stream; scripts can use /v1/actions/responses/stream)"
        )
    if ":" in path:
        raise _blocked("':' paths are not allowed")
    if lowered in _BLOCKED_PATHS:
        raise _blocked(f"{lowered} is blocked")
    for prefix in _BLOCKED_PREFIXES:
        if lowered.startswith(prefix):
            raise _blocked(f"the {prefix} family is blocked")
    for suffix in _BLOCKED_SUFFIXES:
        if lowered.endswith(suffix):
            raise _blocked(f"{suffix} endpoints return binary data and are blocked")
    served = table.match(method, lowered) or table.match(method, path)
    if served is not None and served.body in (Body.MULTIPART, Body.JSON_OR_MULTIPART):
        raise _blocked(
            f"{method} {served.path} takes multipart uploads; use the /v1/actions wrapper"
        )
    route = table.match(method, path)
    family = _FAMILIES.get(route.group) if route is not None else None
    if (
        route is None
        or route.exposure is not Exposure.RELAY
        or family is None
        or method not in family[0]
        or any(route.path.startswith(excluded) for excluded in family[1])
    ):
        raise _blocked(f"{method} {path} is not on the allowlist")
    if method in ("GET", "DELETE") and body:
        raise BadRequestError(f"{method} calls take no body.", param="body")
    encoded = URL.build(path=path, query=_query(query))
    return ProxyCall(
        method, str(encoded), body if method not in ("GET", "DELETE") else None, route.group
    )
