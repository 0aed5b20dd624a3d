"""A stand-in for ChatGPT's file host: https on loopback, with a throwaway CA (trustme).

It serves what ``openaiFileIdRefs[].download_link`` points at, plus the misbehaviours
the fetcher must refuse: a redirect to the metadata address, a body larger than
announced caps, a body that trickles, an expired link. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

# The smallest valid PNG (1x1, transparent) and a JPEG/WebP signature, for sniffing.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6300010000000500010d0a2db40000000049454e44ae426082"
)
JPEG = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF\x00" + b"\x00" * 64 + b"\xff\xd9"


@dataclass
class FileHost:
    ca_file: str
    server: TestServer | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def put(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return self.url(f"/files/{name}")

    async def serve(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        name = request.match_info["name"]
        if name not in self.files:
            return web.Response(status=403, text="expired")  # as an expired signed blob link
        return web.Response(body=self.files[name], content_type="application/octet-stream")

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        raise web.HTTPFound("https://169.254.169.254/latest/meta-data/")

    async def endless(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        response = web.StreamResponse()  # no Content-Length: the cap must count bytes
        await response.prepare(request)
        block = b"\0" * 65536
        for _ in range(1024):
            await response.write(block)
        await response.write_eof()
        return response

    async def slow(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x")
            await asyncio.sleep(0.2)
        return response


async def start_file_host(aiohttp_server: AiohttpServer, tmp_path: Path) -> FileHost:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path / "file-host-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    host = FileHost(str(ca_file))
    app = web.Application()
    app.router.add_get("/files/{name}", host.serve)
    app.router.add_get("/redirect", host.redirect)
    app.router.add_get("/endless", host.endless)
    app.router.add_get("/slow", host.slow)
    host.server = await aiohttp_server(app, ssl=context)
    return host


def fetch_settings(host: FileHost, **overrides: Any) -> dict[str, dict[str, Any]]:
    """Settings that let the fetcher reach the loopback file host (tests only), as a
    layer for ``relay_factory``; ``overrides`` are more [actions] fields."""
    values: dict[str, Any] = {
        "fetch_hosts": ("127.0.0.1",),
        "fetch_allow_private": True,
        "fetch_ca_file": host.ca_file,
        "fetch_timeout_s": 1.0,
    }
    values.update(overrides)
    return {"actions": values}
