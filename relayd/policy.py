"""Which request paths may pass upstream.

Two questions, answered in this order:

1. Is the raw path honest? Percent-encoded slashes, backslashes or dots, NUL and
   control bytes, empty segments and dot segments are refused outright (400): no
   OpenAI id contains them, and each is a way to make a checked path differ from
   the one upstream resolves.
2. For paths outside the route table (the catch-all): does the configured policy
   deny them (403), allow them, or not know them (404)? Deny wins over allow.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from enum import Enum
from typing import Final

__all__ = ["PathPolicy", "Verdict", "check_raw_path"]

_FORBIDDEN: Final = re.compile(
    r"%(?:2[fFeE]|5[cC]|[01][0-9a-fA-F]|7[fF])"  # encoded '/', '.', '\', control bytes
    r"|[\\\x00-\x1f\x7f]"  # backslash and control bytes
    r"|//"  # empty segment
    r"|/\.{1,2}(?:/|\?|$)"  # dot segments
)


class Verdict(Enum):
    ALLOW = "allow"
    DENY = "deny"
    UNKNOWN = "unknown"


def check_raw_path(raw_path: str) -> str | None:
    """Why ``raw_path`` (path and query as sent) is refused, or None if it is fine."""
    path = raw_path.split("?", 1)[0]
    match = _FORBIDDEN.search(path)
    if match is None:
        return None
    return f"the path contains {match.group(0)!r}, which this relay does not forward"


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
