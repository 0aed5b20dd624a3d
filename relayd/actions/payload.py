"""What the wrapper handlers share: validated bodies, file inputs, JSON from upstream.

- :func:`load` reads the JSON body and validates it with a schema: the first
  problem becomes a 400 in OpenAI's shape, naming the field in ``param``
  (``openaiFileIdRefs[0]``, ``n``), before anything goes upstream.
- :func:`file_from_base64`, :func:`file_from_link` turn the ways a GPT can hand over
  a file into bytes with a name and a sniffed media type, under the size cap.
- :func:`upstream_call` opens an upstream request whose answer relayd itself reads
  (identity encoding); :func:`upstream_json` reads a JSON answer under a cap and
  passes anything else back unchanged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import ClientResponse, web
from marshmallow import Schema, ValidationError
from multidict import CIMultiDict

from relayd.actions.fetch import fetch_link
from relayd.actions.mime import EXTENSIONS, sniff
from relayd.errors import BadRequestError, PayloadTooLargeError, UpstreamUnavailableError
from relayd.headers import response_headers
from relayd.memory import buffer_lease
from relayd.metering import note_document
from relayd.relay import (
    exchange,
    read_capped,
    read_json_object,
    send_back,
    waited_on_upstream,
)
from relayd.state import ROUTE, SETTINGS, UPSTREAM
from relayd.streams.multipart import FilePart, TextPart

__all__ = [
    "InputFile",
    "file_from_base64",
    "file_from_link",
    "form_fields",
    "json_answer",
    "load",
    "UpstreamJSON",
    "upstream_call",
    "upstream_json",
    "validated",
]

_DATA_URL: Final = re.compile(r"^data:[\w.+/-]*(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE: Final = re.compile(r"\s+")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")

_CODES: Final = {
    "Missing data for required field.": "missing_required_parameter",
    "Unknown field.": "unknown_parameter",
}


def _first_problem(messages: Any, path: str = "") -> tuple[str | None, str]:
    """The first (param, message) in marshmallow's nested error dict."""
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        if key == "_schema":
            return _first_problem(value, path) if path else (None, _text(value))
        step = f"[{key}]" if isinstance(key, int) else (f".{key}" if path else str(key))
        return _first_problem(value, path + step)
    return (path or None), _text(messages)


def _text(messages: Any) -> str:
    while isinstance(messages, list | dict):
        messages = messages[0] if isinstance(messages, list) else next(iter(messages.values()))
    return str(messages)


def validated(schema: Schema, payload: Mapping[str, Any]) -> dict[str, Any]:
    try:
        data: dict[str, Any] = schema.load(payload)
    except ValidationError as exc:
        param, message = _first_problem(exc.messages)
        code = _CODES.get(message, "invalid_value")
        if param is None:
            raise BadRequestError(message, code=code) from exc
        if code == "missing_required_parameter":
            text = f"Missing required parameter: '{param}'."
        elif code == "unknown_parameter":
            text = f"Unknown parameter: '{param}'."
        else:
            text = f"Invalid '{param}': {message.rstrip('.')}."
        raise BadRequestError(text, code=code, param=param) from exc
    return data


async def load(request: web.Request, **options: Any) -> dict[str, Any]:
    """The request's JSON body, validated by its route's ``request_schema`` (400
    naming the field); ``options`` go to the schema (the configured sets it checks)."""
    schema_class = request[ROUTE].request_schema
    assert schema_class is not None, "routes.py names a request_schema for every wrapper"
    return validated(schema_class(**options), await read_json_object(request))


# ------------------------------------------------------------------ file inputs


@dataclass(frozen=True, slots=True)
class InputFile:
    data: bytes | bytearray
    filename: str
    media_type: str  # sniffed from the bytes unless the caller said otherwise

    def part(self, name: str) -> FilePart:
        return FilePart(name, self.filename, self.media_type, self.data)


def _named(filename: str | None, media_type: str, fallback: str) -> str:
    if filename:
        return filename
    return fallback + EXTENSIONS.get(media_type, ".bin")


def decode_base64(text: str, *, param: str, cap: int) -> bytes:
    """Standard base64 (a ``data:`` URL prefix and line breaks allowed), under ``cap``."""
    text = _WHITESPACE.sub("", _DATA_URL.sub("", text, count=1))
    if len(text) // 4 * 3 > cap + 2:  # refuse before decoding anything
        raise PayloadTooLargeError(
            f"'{param}' decodes to more than the relay's limit of {cap} bytes.",
            code="file_too_large",
            param=param,
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(
            f"'{param}' is not valid base64.", code="invalid_base64", param=param
        ) from exc
    if not data:
        raise BadRequestError(f"'{param}' is empty.", code="empty_file", param=param)
    if len(data) > cap:
        raise PayloadTooLargeError(
            f"'{param}' decodes to more than the relay's limit of {cap} bytes.",
            code="file_too_large",
            param=param,
        )
    return data


def file_from_base64(
    request: web.Request,
    text: str,
    *,
    param: str,
    filename: str | None = None,
    media_type: str | None = None,
    fallback_name: str = "file",
    cap: int | None = None,
) -> InputFile:
    settings = request.app[SETTINGS]
    data = decode_base64(text, param=param, cap=cap or settings.actions.max_file_bytes)
    kind = media_type or sniff(data)
    return InputFile(data, _named(filename, kind, fallback_name), kind)


async def file_from_link(
    request: web.Request,
    link: str,
    *,
    param: str,
    filename: str | None = None,
    fallback_name: str = "file",
) -> InputFile:
    """Download a user's file link safely (fetch.py); nothing goes upstream on refusal."""
    fetched = await fetch_link(
        request.app[UPSTREAM],
        request.app[SETTINGS],
        link,
        param=param,
        lease=buffer_lease(request),
    )
    if not fetched.data:
        raise BadRequestError(f"'{param}' points at an empty file.", param=param)
    kind = fetched.media_type
    name = filename
    if name is None and fetched.filename:  # the link's last path segment
        name = fetched.filename
        if "." not in name:
            name += EXTENSIONS.get(kind, ".bin")
    return InputFile(fetched.data, _named(name, kind, fallback_name), kind)


def form_fields(values: Mapping[str, Any], prefix: str = "") -> list[TextPart]:
    """JSON values as form fields, the way the openai SDK encodes them
    (docs/chatgpt.md#json-in-multipart-upstream):
    ``key[sub]`` for objects, ``key[]`` for lists, ``true``/``false`` for booleans."""
    parts: list[TextPart] = []
    for key, value in values.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if _CONTROL.search(name):  # a part header cannot carry it (aiohttp raises)
            raise BadRequestError(
                f"Invalid field name {name!r}: control characters are not allowed.",
                code="invalid_value",
                param=name,
            )
        if value is None:
            continue
        if isinstance(value, dict):
            parts += form_fields(value, name)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict | list):
                    parts.append(TextPart(f"{name}[]", json.dumps(item)))
                else:
                    parts.append(TextPart(f"{name}[]", _scalar(item)))
        else:
            parts.append(TextPart(name, _scalar(value)))
    return parts


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ------------------------------------------------------------------ upstream JSON


@contextlib.asynccontextmanager
async def upstream_call(
    request: web.Request,
    method: str,
    path_qs: str,
    *,
    data: Any = None,
    content_type: str | None = None,
) -> AsyncIterator[ClientResponse]:
    """An upstream request for relayd to read: identity encoding, the client's own
    headers otherwise (minus credentials, as always). Errors before the head are
    relayd errors (502/504)."""
    upstream = request.app[UPSTREAM]
    headers = upstream.headers(request.headers, keep_length=False)
    headers["Accept-Encoding"] = "identity"  # relayd parses this answer itself
    headers["Accept"] = "application/json"
    headers.popall("Content-Type", None)
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with exchange(request, method, path_qs, headers=headers, data=data) as answer:
        yield answer


@dataclass(frozen=True, slots=True)
class UpstreamJSON:
    """A JSON answer relayd read whole: the document, and the answer for its head
    (status, request id and rate-limit headers stay readable after the body)."""

    document: Any
    answer: ClientResponse


async def upstream_json(
    request: web.Request, method: str, path_qs: str, **call: Any
) -> UpstreamJSON | web.StreamResponse:
    """Call upstream for an answer relayd reads itself (:func:`upstream_call`, which
    takes ``call``: ``data`` and ``content_type``).

    A JSON answer below 400 comes back parsed; anything else (an error, a non-JSON
    body) has already been passed back to the client unchanged, and that response is
    what the caller returns.
    """
    async with upstream_call(request, method, path_qs, **call) as answer:
        if answer.content_type != "application/json" or answer.status >= 400:
            return await send_back(request, answer)
        return UpstreamJSON(await _read_json(request, answer), answer)


async def _read_json(request: web.Request, answer: ClientResponse) -> Any:
    """A whole JSON answer (under the JSON cap); malformed JSON is upstream's fault."""
    cap = request.app[SETTINGS].limits.max_json_bytes
    started = time.perf_counter()
    raw = await read_capped(answer.content, cap)
    waited_on_upstream(request, started)
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise UpstreamUnavailableError("The upstream API sent malformed JSON.") from exc
    note_document(request, document)  # its usage, for spend control
    return document


def json_answer(
    body: Any, *, status: int = 200, upstream: ClientResponse | None = None
) -> web.Response:
    """relayd's own JSON answer (UTF-8, not ASCII-escaped: ChatGPT counts characters),
    keeping upstream's request id and rate-limit headers when there was an upstream."""
    headers = CIMultiDict[str]()
    if upstream is not None:
        headers = response_headers(upstream.headers, keep_length=False)
        headers.popall("Content-Type", None)
    return web.Response(
        status=status,
        text=json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        content_type="application/json",
        headers=headers,
    )
