"""The floor: the plainest correct aiohttp pass-through on uvloop, as a reference.

The performance issue puts relayd's ceiling where a plain aiohttp pass-through with
uvloop sits (about a third of nginx's small-request rate, 0.7-0.85 of its throughput
for large bodies): a Python relay on aiohttp cannot do better than this, so the bench
runs it as the ``aiohttp`` column next to relayd. No auth, logging, metrics or policy:
the client's Authorization header goes upstream as is. Not a product.

    python -m bench.floor --port P --upstream http://127.0.0.1:F
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Literal

import aiohttp
import uvloop
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

SMALL = 64 * 1024  # bodies up to this size (known length) are read whole
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# ws_connect makes its own handshake: the client's handshake headers stay here.
WS_HANDSHAKE = frozenset(
    {
        "host",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
ServerWs = web.WebSocketResponse[Literal[False]]  # decode_text=False: TEXT stays bytes
Ws = ServerWs | aiohttp.ClientWebSocketResponse[Literal[False]]


def _headers(headers: Mapping[str, str], drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """``headers`` minus hop-by-hop ones (those Connection names too) and ``drop``."""
    named = {name.strip().lower() for name in headers.get("Connection", "").split(",")}
    skip = HOP_BY_HOP | named | drop
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in skip)


async def handle(request: web.Request) -> web.StreamResponse:
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    if request.path == "/v1/realtime" and request.headers.get("Upgrade", "").lower() == "websocket":
        return await bridge(request, url)
    data: bytes | AsyncIterator[bytes] | None = None
    if request.content_length is not None and request.content_length <= SMALL:
        data = await request.read()
    elif request.body_exists:
        data = request.content.iter_any()
    headers = _headers(request.headers, frozenset({"host"}))
    try:
        upstream = await request.app[SESSION].request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        )
    except aiohttp.ClientError as exc:
        return web.Response(status=502, text=f"upstream: {exc!r}\n")
    async with upstream:
        answer = _headers(upstream.headers)
        if "Transfer-Encoding" in upstream.headers:
            answer.popall("Content-Length", None)
        elif upstream.content_length is not None and upstream.content_length <= SMALL:
            body = await upstream.read()  # small and of known length: answered whole
            return web.Response(status=upstream.status, headers=answer, body=body)
        response = web.StreamResponse(status=upstream.status, headers=answer)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def bridge(request: web.Request, url: URL) -> web.StreamResponse:
    """A WebSocket to the same path upstream; frames pass unchanged both ways."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "").split(",")
    protocols = [p.strip() for p in offered if p.strip()]
    try:
        upstream = await request.app[SESSION].ws_connect(
            url,
            headers=_headers(request.headers, WS_HANDSHAKE),
            protocols=protocols,
            autoclose=False,
            max_msg_size=0,
            decode_text=False,
        )
    except aiohttp.WSServerHandshakeError as exc:
        return web.Response(status=exc.status, text=f"upstream refused: {exc.message}\n")
    except aiohttp.ClientError as exc:
        return web.Response(status=502, text=f"upstream: {exc!r}\n")
    async with upstream:
        chosen = [upstream.protocol] if upstream.protocol else []
        ws: ServerWs = web.WebSocketResponse(
            protocols=chosen, autoclose=False, max_msg_size=0, compress=False, decode_text=False
        )
        await ws.prepare(request)
        await asyncio.gather(_pump(ws, upstream), _pump(upstream, ws))
        return ws


async def _pump(src: Ws, dst: Ws) -> None:
    """src's frames to dst; src's CLOSE (or 1011 if src is lost) closes dst, then src."""
    while True:
        msg = await src.receive()
        if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
            await dst.send_frame(msg.data, msg.type)
        elif msg.type is WSMsgType.CLOSING:
            return  # the other pump is closing src
        else:
            lost = msg.type is not WSMsgType.CLOSE  # ERROR, CLOSED: src went away
            code, reason = (1011, "") if lost else (msg.data or 1000, msg.extra or "")
            await dst.close(code=code, message=reason.encode())
            await src.close(code=code)
            return


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=4096)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    skip = ("User-Agent", "Accept-Encoding", "Content-Type")  # add nothing of our own
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # no cookies across clients
        auto_decompress=False,
        timeout=timeout,
        skip_auto_headers=skip,
    ) as session:
        app[SESSION] = session
        yield


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000")
    args = parser.parse_args(argv)
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        backlog=4096,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
