"""Token usage read from OpenAI answers as they stream past, without holding them.

A :class:`UsageTap` sees every chunk of a relayed body and keeps only a bounded
tail (the ``usage`` of a JSON answer sits near its end; in a stream it rides on the
last events: ``response.completed`` for Responses, the final chunk for chat
completions with ``include_usage``). When the body ends, the tail is parsed once.
Anything it cannot read is simply not counted; it never affects the bytes relayed.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any, Final

from relayd.headers import decompress

__all__ = ["Usage", "UsageTap"]

TAIL_BYTES: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    model: str
    input_tokens: int
    output_tokens: int


class UsageTap:
    __slots__ = ("_encoding", "_event_stream", "_overflowed", "_tail")

    def __init__(self, *, event_stream: bool, content_encoding: str = "") -> None:
        self._event_stream = event_stream
        self._encoding = content_encoding.strip().lower()
        self._tail = bytearray()
        self._overflowed = False

    def __call__(self, chunk: bytes) -> None:
        self._tail += chunk
        if len(self._tail) > 2 * TAIL_BYTES:
            del self._tail[:-TAIL_BYTES]
            self._overflowed = True

    def usage(self) -> Usage | None:
        try:
            if self._event_stream:
                return self._from_events(bytes(self._tail))
            if self._overflowed:
                return None  # a JSON document must be read whole; big ones are not answers
            return _from_object(
                json.loads(decompress(bytes(self._tail), self._encoding, 4 * TAIL_BYTES))
            )
        except (ValueError, zlib.error, TypeError, KeyError):
            return None

    @staticmethod
    def _from_events(tail: bytes) -> Usage | None:
        for line in reversed(tail.splitlines()):
            if line.startswith(b"data:") and b'"usage"' in line:
                found = _from_object(json.loads(line[5:]))
                if found is not None:
                    return found
        return None


def _from_object(obj: Any) -> Usage | None:
    """Usage from a Responses object or event, a chat completion (chunk), or embeddings."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("response"), dict):  # response.completed / .incomplete / .failed
        obj = obj["response"]
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    model = str(obj.get("model") or "unknown")
    if "input_tokens" in usage or "output_tokens" in usage:
        return Usage(
            model, int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
        )
    return Usage(
        model, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    )
