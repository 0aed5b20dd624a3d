"""The connectors relayd dials upstream with, and the guard on user file links.

Every upstream socket gets TCP_NODELAY, a connection dropped with bytes still
queued is aborted rather than flushed into a peer that stopped reading, and a
pooled connection upstream wrote to while idle is never reused. The user-file
fetcher's connector and resolver also refuse every non-public address.
relayd/upstream.py owns the sessions that use them.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any, Final, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from relayd.errors import ForbiddenAddressError

__all__ = [
    "NoDelayConnector",
    "PublicOnlyConnector",
    "PublicOnlyResolver",
    "non_public_literal",
    "non_public_reason",
    "refuse_non_public",
]


class _UpstreamProtocol(ResponseHandler):
    """aiohttp's protocol, except that dropping a connection never waits on upstream.

    ``transport.close()`` first flushes what is still queued; when upstream stopped
    reading (a stalled upload), that is never, and the socket, its buffer and its
    descriptor stay behind for good. A connection relayd drops with bytes still
    queued is aborted instead: those bytes were going nowhere.
    """

    def close(self) -> None:
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size():
            self.abort()
            return
        super().close()


class NoDelayConnector(aiohttp.TCPConnector):
    """TCP_NODELAY on every upstream socket (aiohttp sets it too, but say it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._factory = cast(
            "functools.partial[ResponseHandler]",
            functools.partial(_UpstreamProtocol, loop=self._loop),
        )

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return transport, protocol

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        # aiohttp reuses a pooled connection while it is open, even when upstream
        # wrote to it while it sat idle (a body longer than its Content-Length).
        # Those bytes parse as the *next* request's answer: one client would read
        # what upstream sent after another's response. Such a connection is closed.
        while (connection := await super()._get(key, traces)) is not None:
            protocol = connection.protocol
            if protocol is not None and not protocol.should_close:
                return connection
            connection.close()
        return None


# ---------------------------------------------------------------- user file links
#
# ChatGPT hands actions the files a user attached as short-lived https links
# (openaiFileIdRefs[].download_link), and wrappers take image_url too. Fetching a URL
# a caller chose is the classic SSRF door, so these fetches get a session of their
# own: no credentials, no cookies, no proxies from the environment, no redirects,
# and a connector that refuses every non-public address twice over: when the name
# resolves (a clear message), and again for the exact address each socket connects
# to (which also covers IP literals, DNS rebinding between lookup and connect, and
# any resolver cache). relayd/actions/fetch.py decides which URLs may be tried at all.


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:  # 2002::/16
        return ip.sixtofour
    if ip.teredo is not None:  # 2001::/32: (server, client)
        return ip.teredo[1]
    if ip in _NAT64:  # RFC 6052 well-known prefix, the IPv4 address in the last 32 bits
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


def non_public_literal(host: str) -> str | None:
    """Why a URL's host must not be fetched when it is an IP literal (brackets
    allowed); None for a public address or a name, which the resolver judges."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return non_public_reason(host.strip("[]"))


def non_public_reason(address: str) -> str | None:
    """Why relayd must not connect to ``address`` (an IP literal), or None if public."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            address.split("%", 1)[0]  # an IPv6 zone index is no part of the address
        )
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
        reason = non_public_reason(str(inner))
        return f"{address} embeds {inner}: {reason}" if reason else None
    if ip.is_loopback:
        return f"{address} is a loopback address"
    if ip.is_link_local:
        return f"{address} is a link-local address (where cloud metadata services live)"
    if ip.is_private:
        return f"{address} is a private address"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved or not ip.is_global:
        return f"{address} is not a public unicast address"
    return None


def refuse_non_public(addr_info: Any) -> socket.socket:
    """aiohappyeyeballs socket factory: the last check before connect()."""
    family, type_, proto, _, sockaddr = addr_info
    if non_public_reason(sockaddr[0]) is not None:
        # One message for every address, so aiohappyeyeballs re-raises this very
        # exception (not a generic OSError) when all of a name's addresses fail.
        raise ForbiddenAddressError("refused to connect to a non-public address")
    return socket.socket(family=family, type=type_, proto=proto)


class PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """The default resolver, minus every non-public address it returns."""

    def __init__(self) -> None:
        self._inner = aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if non_public_reason(r["host"]) is None]
        if not public:
            reason = non_public_reason(results[0]["host"]) if results else "no address"
            raise ForbiddenAddressError(f"{host} resolves only to non-public addresses ({reason})")
        return public

    async def close(self) -> None:
        await self._inner.close()


class PublicOnlyConnector(NoDelayConnector):
    """Checks the peer of every new connection once more, after connect()."""

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        peer = transport.get_extra_info("peername")
        if not peer or non_public_reason(peer[0]) is not None:
            transport.abort()
            raise ForbiddenAddressError("refused to connect to a non-public address")
        return transport, protocol
