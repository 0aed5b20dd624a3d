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
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "HOP_BY_HOP",
    "BodyDecoder",
    "DecodedTooLargeError",
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


class DecodedTooLargeError(ValueError):
    """A compressed body decodes to more than its limit."""


# Decoded bytes come out in pieces of at most this size, so the caller can reserve
# them one piece at a time: a few KiB of gzip can hold gigabytes.
_PIECE: Final = 256 * 1024


class BodyDecoder:
    """Undoes a request body's ``Content-Encoding`` as it arrives, to ``limit`` bytes.

    aiohttp's own decoding inflates each chunk it reads whole before anyone can
    count the result (64 KiB of gzip can be 64 MiB), so relayd's server leaves
    request bodies encoded and bodies it must parse are decoded here, at most
    ``_PIECE`` bytes at a time. :meth:`for_encoding` raises ``LookupError`` for a
    coding relayd cannot undo; :meth:`feed` and :meth:`end` raise ``zlib.error``
    for corrupt or truncated data and :class:`DecodedTooLargeError` past ``limit``.
    """

    __slots__ = ("_gzip", "_inflate", "_limit", "_size", "encoding")

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self._gzip = encoding in ("gzip", "x-gzip")
        self._limit = limit
        self._size = 0
        self._inflate: Any = None  # created on the first bytes (deflate: which kind)

    @classmethod
    def for_encoding(cls, header: str, limit: int) -> BodyDecoder | None:
        """A decoder for a ``Content-Encoding`` value; None for identity (or none)."""
        codings = [c.strip().lower() for c in header.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if not codings:
            return None
        if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
            raise LookupError(header.strip())
        return cls(codings[0], limit)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of ``data`` (the next bytes of the body)."""
        while data:
            if self._inflate is None:
                self._inflate = self._start(data)
            elif self._inflate.eof:
                # RFC 1952 §2.2: a gzip file is a series of members; deflate is one stream.
                if not self._gzip:
                    raise zlib.error("data after the end of the deflate stream")
                self._inflate = self._start(data)
            piece = self._inflate.decompress(data, _PIECE)
            rest = self._inflate.unconsumed_tail or self._inflate.unused_data
            if not piece and len(rest) == len(data) and not self._inflate.eof:
                break  # nothing consumed, nothing produced: wait for more input
            data = rest
            if piece:
                self._size += len(piece)
                if self._size > self._limit:
                    raise DecodedTooLargeError(f"decodes to more than {self._limit} bytes")
                yield piece

    def end(self) -> None:
        """The body ended: it must have ended with the compressed stream."""
        if self._inflate is None or not self._inflate.eof:
            raise zlib.error("the compressed body ends early")

    def _start(self, data: bytes) -> Any:
        if self._gzip:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # RFC 9110 §8.4.1.2: deflate means the zlib format (RFC 1950); some clients
        # send a raw deflate stream, which no zlib header check passes.
        zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
