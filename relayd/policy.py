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
from enum import Enum
from typing import Final

from relayd.config import Settings

__all__ = ["Verdict", "check_raw_path", "decide"]

_FORBIDDEN: Final = re.compile(
    r"%(?:2[fFeE]|5[cC]|00)"  # encoded '/', '.', '\', NUL
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


def decide(path: str, settings: Settings) -> tuple[Verdict, str | None]:
    """The verdict for a path the route table does not serve, and the matching rule."""
    lowered = path.lower()
    for pattern in settings.policy_deny:
        if fnmatch.fnmatchcase(lowered, pattern.lower()):
            return Verdict.DENY, pattern
    for pattern in settings.policy_allow:
        if fnmatch.fnmatchcase(lowered, pattern.lower()):
            return Verdict.ALLOW, pattern
    return Verdict.UNKNOWN, None
