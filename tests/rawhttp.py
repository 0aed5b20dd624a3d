"""A tiny raw HTTP/1.1 client for what aiohttp's client will not do.

Raw paths (no URL normalisation), half-sent bodies, hang-ups at chosen moments.
Every read is bounded by the caller's ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass

from aiohttp.test_utils import TestClient


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def open_raw(client: TestClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert client.server.host is not None and client.server.port is not None
    return await asyncio.open_connection(client.server.host, client.server.port)


def websocket_upgrade() -> dict[str, str]:
    """The headers of a WebSocket handshake (RFC 6455 §4.1), with a fresh key."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }


def head(method: str, target: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: relay.test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def request(
    client: TestClient,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> RawResponse:
    """One request on a fresh connection; reads a Content-Length body."""
    reader, writer = await open_raw(client)
    try:
        all_headers = {"Connection": "close", **(headers or {})}
        if body:
            all_headers["Content-Length"] = str(len(body))
        writer.write(head(method, target, all_headers) + body)
        await writer.drain()
        status, response_headers = await read_head(reader)
        length = int(response_headers.get("content-length", "0"))
        data = await reader.readexactly(length) if length else b""
        from tests.conftest import CANARY  # the run-wide secret check sees raw answers too

        CANARY.check(f"raw response {method} {target}", f"{response_headers}".encode() + data)
        return RawResponse(status, response_headers, data)
    finally:
        writer.close()
