"""Header hygiene in both directions, and redaction of secrets in upstream bodies.

Requests keep the client's headers minus hop-by-hop ones (RFC 9110 §7.6.1), minus
everything that carries identity or credentials (the relay key, cookies, forwarding
and client-address headers) or overrides the method or target relayd checked;
relayd adds its own ``Authorization`` and organisation headers.
Responses keep an allowlist: what the SDKs read (request id, rate limits, retry
hints) and what describes the body. Anything else (``Set-Cookie``, CDN headers)
stays behind, so nothing about the upstream account leaks to clients.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "HOP_BY_HOP",
    "decompress",
    "redact_secrets",
    "request_headers",
    "response_headers",
]

# RFC 9110 §7.6.1 plus the legacy Proxy-Connection; wsgiref spells "trailers".
# Kept lowercase: membership is tested on ``name.lower()`` (an istr hashes like
# the str it holds, so it would not make a set case-insensitive).
HOP_BY_HOP: Final = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
    )
)

# Never forwarded upstream: the host is the upstream's, credentials are relayd's,
# the client's network identity is nobody's business upstream, and the method and
# target are the ones relayd checked: some stacks honour an override header
# (X-HTTP-Method-Override, IIS's X-Original-URL/X-Rewrite-URL), which would turn
# a checked GET /v1/models into something else behind relayd's back.
_REQUEST_DROP: Final = HOP_BY_HOP | frozenset(
    h.lower()
    for h in (
        "Host",
        "Authorization",
        "Cookie",
        "Expect",
        "OpenAI-Organization",
        "OpenAI-Project",
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "X-Original-URL",
        "X-Rewrite-URL",
        "Forwarded",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "X-Real-IP",
        "True-Client-IP",
        "CF-Connecting-IP",
        "X-Client-IP",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Accept",
        "Sec-WebSocket-Protocol",
    )
)

# Encodings relayd can undo with the standard library, which it must do to redact
# an error body (see redact_secrets). br and zstd would need extra packages.
_DECODABLE: Final = ("gzip", "deflate", "identity")

_RESPONSE_KEEP: Final = frozenset(
    h.lower()
    for h in (
        "Content-Type",
        "Content-Length",
        "Content-Encoding",
        "Content-Disposition",
        "Content-Language",
        "Cache-Control",
        "ETag",
        "Last-Modified",
        "Location",
        "Retry-After",
        "Retry-After-Ms",
        "X-Should-Retry",
        "X-Request-Id",
        "OpenAI-Processing-Ms",
        "OpenAI-Version",
        "OpenAI-Model",
    )
)
_RESPONSE_KEEP_PREFIX: Final = ("x-ratelimit-",)


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    """Headers named in ``Connection`` are hop-by-hop too (RFC 9110 §7.6.1)."""
    value = headers.get("Connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(
    incoming: CIMultiDictProxy[str] | Mapping[str, str],
    *,
    upstream_key: str,
    organization: str | None,
    project: str | None,
    drop: Iterable[str] = (),
    keep_length: bool = True,
) -> CIMultiDict[str]:
    """Headers for the upstream request.

    ``drop`` names extra headers to leave out (the configured relay-key header).
    ``keep_length=False`` drops ``Content-Length``/``Content-Encoding`` when relayd
    sends other bytes than the client did (re-encoded JSON, decompressed bodies).
    """
    extra = {h.lower() for h in drop} | _connection_tokens(incoming)
    if not keep_length:
        extra |= {"content-length", "content-encoding"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or lower in extra:
            continue
        if lower == "accept-encoding":
            value = _decodable_encodings(value)
            if not value:
                continue
        out.add(name, value)
    out["Authorization"] = f"Bearer {upstream_key}"
    if organization:
        out["OpenAI-Organization"] = organization
    if project:
        out["OpenAI-Project"] = project
    return out


@functools.lru_cache(maxsize=64)  # clients send the same few Accept-Encoding values
def _decodable_encodings(value: str) -> str:
    tokens = [t.strip() for t in value.split(",")]
    return ", ".join(t for t in tokens if t.split(";", 1)[0].strip().lower() in _DECODABLE)


def response_headers(upstream: Mapping[str, str], *, keep_length: bool = True) -> CIMultiDict[str]:
    """The upstream response headers a client may see (an allowlist)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _RESPONSE_KEEP or lower.startswith(_RESPONSE_KEEP_PREFIX):
            if not keep_length and lower in ("content-length", "content-encoding"):
                continue
            out.add(name, value)
    return out


# OpenAI's 401 echoes the presented key, masked in the middle
# ("Incorrect API key provided: sk-proj-********abcd"). Clients never present
# upstream keys (relayd swaps them), so any such token in an upstream error body
# belongs to the operator and is removed whole.
_KEY_PATTERN: Final = re.compile(rb"\b(?:sk|ek|rk)-[A-Za-z0-9_\-*.]{3,}")
REDACTED: Final = b"[redacted]"


def redact_secrets(body: bytes, secrets: Iterable[str]) -> bytes:
    """Remove the given secrets, and anything shaped like an OpenAI key, from ``body``."""
    for secret in secrets:
        if secret:
            body = body.replace(secret.encode(), REDACTED)
    return _KEY_PATTERN.sub(REDACTED, body)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a ``Content-Encoding`` relayd allowed upstream (gzip, deflate), to ``limit`` bytes.

    Raises ``ValueError`` for an encoding relayd never asked for and ``zlib.error``
    for corrupt data.
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body, limit)
    if encoding == "deflate":
        return zlib.decompressobj().decompress(body, limit)
    raise ValueError(f"unexpected content encoding {encoding!r}")
