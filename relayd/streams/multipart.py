"""multipart/form-data bodies (RFC 7578) built from parts, written as a stream.

Each file part writes its bytes in slices straight from the buffer it was given
(no copy, and ``await write()`` between slices so the event loop and the socket's
flow control get their turn); text parts are small. The total length is known up
front, so the request carries a ``Content-Length``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import MultipartWriter, hdrs
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload, StringPayload

__all__ = ["FilePart", "SlicedBytesPayload", "TextPart", "multipart_body"]

_SLICE: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class TextPart:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class FilePart:
    name: str
    filename: str
    content_type: str
    data: bytes | bytearray


class SlicedBytesPayload(Payload):
    """Bytes written in slices of a memoryview.

    aiohttp's BytesPayload writes everything at once and warns (ResourceWarning) past
    1 MiB; a JSON body relayd re-encodes can be larger (base64 inside).
    """

    _value: bytes | bytearray

    def __init__(self, value: bytes | bytearray, **kwargs: Any) -> None:
        super().__init__(value, **kwargs)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for start in range(0, len(view), _SLICE):
            await writer.write(view[start : start + _SLICE])


def multipart_body(parts: Iterable[TextPart | FilePart]) -> MultipartWriter:
    """A form-data body; its ``content_type`` carries the boundary.

    Names, filenames and content types go into part headers as given: callers
    validate them first (aiohttp refuses CR and LF in headers with ValueError).
    """
    writer = MultipartWriter("form-data")
    for part in parts:
        payload: Payload
        if isinstance(part, TextPart):
            payload = StringPayload(part.value)
            payload.set_content_disposition("form-data", quote_fields=False, name=part.name)
            # Plain fields carry no Content-Type, as the openai SDK (httpx) sends them.
            payload.headers.popall(hdrs.CONTENT_TYPE, None)
        else:
            payload = SlicedBytesPayload(part.data, content_type=part.content_type)
            # Raw UTF-8 filenames, as browsers and httpx send them (RFC 7578 §4.2);
            # quote_fields=True would percent-encode them, and upstream would keep
            # "caf%C3%A9.png" as the file's name.
            payload.set_content_disposition(
                "form-data", quote_fields=False, name=part.name, filename=part.filename
            )
        payload.headers.popall(hdrs.CONTENT_LENGTH, None)
        writer.append_payload(payload)
    return writer
