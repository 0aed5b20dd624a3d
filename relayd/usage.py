"""Token usage read from OpenAI answers as they stream past, without holding them.

A :class:`UsageTap` sees every chunk of a relayed body and keeps only a bounded
tail (the ``usage`` of a JSON answer sits near its end; in a stream it rides on the
last events: ``response.completed`` for Responses, the final chunk for chat
completions with ``include_usage``). When the body ends, the tail is read once.
Anything it cannot read is simply not counted; it never affects the bytes relayed.

Reading does not parse the whole answer (pass-through routes parse no JSON): it
decodes the last ``"usage"`` object and the first ``"model"`` string, which is the
answer's own in every OpenAI shape (the Responses object, a chat completion or
chunk, embeddings, and the ``response`` inside Responses events all name their model
before any nested object could). Quoted text inside strings cannot match, because
its quotes are escaped. When the last ``"usage"`` is not a token count (a metadata
value, a JSON schema after it), the document is parsed whole instead.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from relayd.headers import decompress

__all__ = ["Usage", "UsageTap", "read_usage"]

TAIL_BYTES: Final = 256 * 1024

_USAGE_KEY: Final = b'"usage"'
_USAGE_OBJECT: Final = re.compile(rb'"usage"\s*:\s*(?={)')
_MODEL_KEY: Final = b'"model"'
_COLON: Final = re.compile(rb"\s*:\s*")
_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"')
_DECODER: Final = json.JSONDecoder()
_TOKEN_PAIRS: Final = (("input_tokens", "output_tokens"), ("prompt_tokens", "completion_tokens"))


@dataclass(slots=True)  # one per answer, never changed: not frozen (cheaper to build)
class Usage:
    model: str
    input_tokens: int
    output_tokens: int
    # The usage object as upstream sent it (cached, reasoning and audio details), for
    # pricing (relayd.spend).
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)


class UsageTap:
    """Keeps the last :data:`TAIL_BYTES` (or more, up to twice that) of a body."""

    __slots__ = ("_chunks", "_encoding", "_event_stream", "_overflowed", "_read", "_size")

    def __init__(self, *, event_stream: bool, content_encoding: str = "") -> None:
        self._event_stream = event_stream
        self._encoding = content_encoding.strip().lower()
        self._chunks: deque[bytes] = deque()  # kept as they came: no copy per chunk
        self._size = 0
        self._overflowed = False
        self._read: tuple[Usage | None] | None = None  # usage(), once read

    def __call__(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size > 2 * TAIL_BYTES and len(self._chunks) > 1:
            self._size -= len(self._chunks.popleft())
            self._overflowed = True

    def usage(self) -> Usage | None:
        """The answer's usage, read once (the access line and spend both ask)."""
        if self._read is None:
            self._read = (self._usage(),)
        return self._read[0]

    def document(self) -> bytes | None:
        """A whole JSON answer, decoded; None for a stream or an answer too big to keep."""
        if self._event_stream or self._overflowed or self._size > 2 * TAIL_BYTES:
            return None
        try:
            return decompress(b"".join(self._chunks), self._encoding, 4 * TAIL_BYTES)
        except (ValueError, zlib.error):
            return None

    def _usage(self) -> Usage | None:
        tail = b"".join(self._chunks)  # one chunk (a small answer) is not copied
        if self._size > 2 * TAIL_BYTES:  # one huge chunk: keep its end
            tail, self._overflowed = tail[-TAIL_BYTES:], True
        try:
            if self._event_stream:
                return _from_events(tail)
            if self._overflowed:
                return None  # a JSON document must be read whole; big ones are not answers
            return read_usage(decompress(tail, self._encoding, 4 * TAIL_BYTES))
        except (ValueError, zlib.error, TypeError, KeyError):
            return None


def _from_events(tail: bytes) -> Usage | None:
    for line in reversed(tail.splitlines()):
        if line.startswith(b"data:") and _USAGE_KEY in line:
            found = read_usage(line[5:])
            if found is not None:
                return found
    return None


def read_usage(document: bytes) -> Usage | None:
    """The usage in one JSON document (an answer, or one event's data), if any.

    Raises ``ValueError`` (or a subclass) for a document that is not JSON.
    """
    at = document.rfind(_USAGE_KEY)
    if at < 0:
        return None  # no "usage" key anywhere: a whole parse would find none either
    found = _USAGE_OBJECT.match(document, at)
    if found is not None and document[at - 1 : at] != b"\\":
        text = document[found.end() :].decode("utf-8")
        usage, _ = _DECODER.raw_decode(text)
        counted = _counted(_model(document), usage)
        if counted is not None:
            return counted
    return _from_object(json.loads(document))  # not certain: read it whole


def _model(document: bytes) -> str:
    """The first "model" key's value, if it is a string (it names the answer's model)."""
    at = document.find(_MODEL_KEY)
    while at > 0 and document[at - 1] == 0x5C:  # a backslash: text inside a string
        at = document.find(_MODEL_KEY, at + 1)
    colon = _COLON.match(document, at + len(_MODEL_KEY)) if at > 0 else None
    value = _STRING.match(document, colon.end()) if colon is not None else None
    if value is None:
        return "unknown"
    raw = value.group()
    model = json.loads(raw) if b"\\" in raw else raw[1:-1].decode("utf-8")
    return str(model) or "unknown"


def _counted(model: str, usage: Any) -> Usage | None:
    """The counts in ``usage``, if it names any (a bare ``{"type": ...}`` does not)."""
    if not isinstance(usage, dict):
        return None
    for input_key, output_key in _TOKEN_PAIRS:
        if input_key in usage or output_key in usage:
            return Usage(
                model, int(usage.get(input_key) or 0), int(usage.get(output_key) or 0), usage
            )
    return None


def _from_object(obj: Any) -> Usage | None:
    """Usage from a parsed Responses object or event, a chat completion (chunk), or embeddings."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("response"), dict):  # response.completed / .incomplete / .failed
        obj = obj["response"]
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    model = str(obj.get("model") or "unknown")
    return _counted(model, usage) or Usage(model, 0, 0)  # a usage that counts nothing
