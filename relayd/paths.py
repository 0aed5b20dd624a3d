"""Which request paths may pass upstream.

Two questions, answered in this order:

1. Is the raw target honest? Every request, on every route, is asked first, before
   the key is (:func:`path_middleware`). A target passes only if the path upstream
   resolves is the path relayd judges: decoding it once yields the one path that
   the routes and the patterns are asked about. So these are refused outright (400):

   - a fragment (``#``): no server receives one, so ``/v1/x/..#`` would be judged
     with a ``..`` that upstream never sees;
   - a percent-encoded unreserved character (``%61`` for ``a``): RFC 3986 §2.3 makes
     it equivalent to the plain character and says it should not be encoded, so no
     honest client sends one, and ``/v1/%61dmin`` is ``/v1/admin`` to upstream;
   - an encoded ``/``, backslash, ``%``, ``?``, ``#`` or ``;`` (a second decoding
     or a lax parser anywhere would see another path), an encoded control byte, a
     malformed escape, or bytes that are not UTF-8;
   - a character outside RFC 3986's ``pchar`` (raw backslash, space, control bytes,
     raw non-ASCII), and ``;``: some servers strip ``;params`` from a segment before
     resolving it (``/..;/``), and no OpenAI path has one;
   - empty segments and dot segments (``.``, ``..``).

2. For paths outside the route table (the catch-all): does the configured policy
   deny the decoded path (403), allow it, or not know it (404)? Deny wins over allow.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from enum import Enum
from typing import Final
from urllib.parse import unquote

from aiohttp import web

from relayd.errors import BadRequestError
from relayd.routing import Handler

__all__ = ["PathPolicy", "Verdict", "check_raw_path", "path_middleware", "upstream_path"]

# RFC 3986 §3.3: segment = *pchar; pchar = unreserved / pct-encoded / sub-delims / ":" / "@"
# (less ";", see above)
_PATH: Final = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/%]*")
_ESCAPE: Final = re.compile(r"%(.{0,2})", re.DOTALL)
_HEX_PAIR: Final = re.compile(r"[0-9A-Fa-f]{2}")
# RFC 3986 §2.3: ALPHA / DIGIT / "-" / "." / "_" / "~"
_UNRESERVED: Final = re.compile(r"[A-Za-z0-9\-._~]")
# Beyond the unreserved ones, bytes that must not hide behind a percent sign.
# A second parser (a decoding hop, a lax server) would read them as separators.
_NEVER_ENCODED: Final = {
    0x2F: "'/'",
    0x5C: "backslash",
    0x25: "'%'",
    0x3F: "'?'",
    0x23: "'#'",
    0x3B: "';'",
}


class _UnsafePathError(ValueError):
    """The request target hides a path trick; the message says which."""


@functools.lru_cache(maxsize=1024)  # asked twice per request (middleware, handler)
def _resolve(raw_target: str) -> str:
    if "#" in raw_target:
        raise _UnsafePathError("a fragment ('#'), which no server receives")
    path = raw_target.split("?", 1)[0]
    if not _PATH.fullmatch(path):
        bad = next(c for c in path if not _PATH.fullmatch(c))
        raise _UnsafePathError(f"{bad!r}, which a URL path cannot carry")
    decoded = path
    if "%" in path:
        for match in _ESCAPE.finditer(path):
            _check_escape(match.group(0))
        try:
            decoded = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise _UnsafePathError("percent-encoded bytes that are not UTF-8") from None
    if "//" in decoded:
        raise _UnsafePathError("an empty segment ('//')")
    if "." in decoded:
        for segment in decoded.split("/"):
            if segment in (".", ".."):
                raise _UnsafePathError(f"the dot segment {segment!r}")
    return decoded


def _check_escape(escape: str) -> None:
    if not _HEX_PAIR.fullmatch(escape[1:]):
        raise _UnsafePathError(f"the malformed percent-escape {escape!r}")
    byte = int(escape[1:], 16)
    if _UNRESERVED.fullmatch(chr(byte)):
        raise _UnsafePathError(f"{escape!r}, an encoded {chr(byte)!r} (send it as it is)")
    if byte in _NEVER_ENCODED:
        raise _UnsafePathError(f"{escape!r}, an encoded {_NEVER_ENCODED[byte]}")
    if byte < 0x20 or byte == 0x7F:
        raise _UnsafePathError(f"{escape!r}, an encoded control byte")


def check_raw_path(raw_path: str) -> str | None:
    """Why ``raw_path`` (path and query as sent) is refused, or None if it is fine."""
    try:
        _resolve(raw_path)
    except _UnsafePathError as exc:
        return f"the path contains {exc}"
    return None


def upstream_path(raw_path: str) -> str:
    """The decoded path upstream resolves for ``raw_path`` (path and query as sent);
    400 ``invalid_path`` if that could differ from the path relayd judges."""
    try:
        return _resolve(raw_path)
    except _UnsafePathError as exc:
        raise BadRequestError(
            f"Invalid request path: the path contains {exc}.", code="invalid_path"
        ) from None


@web.middleware
async def path_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a dishonest target on every route before the key or any policy is asked,
    so a trick gets the same answer whoever sends it."""
    upstream_path(request.raw_path)
    return await handler(request)


class Verdict(Enum):
    ALLOW = "allow"
    DENY = "deny"
    UNKNOWN = "unknown"


class PathPolicy:
    """Allow and deny patterns (fnmatch, case-insensitive); ``replace()`` on SIGHUP."""

    __slots__ = ("_allow", "_deny")

    def __init__(self, allow: Iterable[str], deny: Iterable[str]) -> None:
        self._allow: tuple[str, ...] = ()
        self._deny: tuple[str, ...] = ()
        self.replace(allow, deny)

    @property
    def allow(self) -> tuple[str, ...]:
        return self._allow

    @property
    def deny(self) -> tuple[str, ...]:
        return self._deny

    def replace(self, allow: Iterable[str], deny: Iterable[str]) -> None:
        self._allow = tuple(p.lower() for p in allow)
        self._deny = tuple(p.lower() for p in deny)

    def decide(self, path: str) -> tuple[Verdict, str | None]:
        """The verdict for a path the route table does not serve, and the rule that matched."""
        lowered = path.lower()
        for pattern in self._deny:
            if fnmatch.fnmatchcase(lowered, pattern):
                return Verdict.DENY, pattern
        for pattern in self._allow:
            if fnmatch.fnmatchcase(lowered, pattern):
                return Verdict.ALLOW, pattern
        return Verdict.UNKNOWN, None
