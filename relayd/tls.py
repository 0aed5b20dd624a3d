"""relayd's own TLS: the server context, its listening sites, and reload on SIGHUP.

The listening context never changes; its SNI callback, which OpenSSL calls for
every ClientHello (with ``None`` when the client names no host), hands each new
handshake the context built from the current pair. A reload builds a fresh
context and swaps the reference: handshakes after it get the new certificate,
connections already open keep the one they were made with (docs/security.md#own-tls).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relayd.config import ConfigError, Server
from relayd.config.certs import Certificate, read_pair

if TYPE_CHECKING:
    from relayd.metrics import Metrics

__all__ = ["ServedCertificate", "TLSSockSite", "TLSTCPSite", "server_context"]

log = logging.getLogger("relayd")

# TLS 1.2 suites: ECDHE key exchange and AEAD ciphers only, Mozilla's
# "intermediate" profile; TLS 1.3 suites are all AEAD and stay OpenSSL's default.
CIPHERS_TLS12 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2 or newer, ECDHE + AEAD, no compression, HTTP/1.1 by ALPN (RFC 7301)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS_TLS12)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:  # read_pair checked the pair; this is what it cannot see
        raise ConfigError(
            f"TLS pair {cert_file!r} / {key_file!r} cannot be used: {exc.reason or exc}"
        ) from None
    return context


class ServedCertificate:
    """The certificate relayd presents, replaceable while relayd serves."""

    def __init__(self, server: Server, metrics: Metrics) -> None:
        assert server.tls_cert is not None and server.tls_key is not None
        self._metrics = metrics
        self.facts, self._current = self._build(server.tls_cert, server.tls_key)
        self.context = server_context(server.tls_cert, server.tls_key)
        self.context.sni_callback = self._choose
        self.handshake_timeout_s = server.tls_handshake_timeout_s
        self._export()

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> None:
        connection.context = self._current

    def reload(self, server: Server) -> None:
        """Present the pair ``server`` names from the next handshake on; if it cannot
        be used, keep the current one and say why."""
        if server.tls_cert is None or server.tls_key is None:
            log.error(
                "TLS reload: the new configuration names no certificate; relayd keeps "
                "serving https with %s (a restart turns TLS off)",
                self.facts.path,
            )
            return
        try:
            facts, context = self._build(server.tls_cert, server.tls_key)
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return
        self.facts, self._current = facts, context
        self._export()
        log.info(
            "TLS certificate reloaded: %s, serial %x, valid until %s",
            facts.subject,
            facts.serial,
            facts.not_after.isoformat(),
        )
        # A near expiry is among the reloaded settings' warnings, logged by the caller.

    @staticmethod
    def _build(cert_file: str, key_file: str) -> tuple[Certificate, ssl.SSLContext]:
        return read_pair(cert_file, key_file), server_context(cert_file, key_file)

    def _export(self) -> None:
        self._metrics.tls_expiry.set(self.facts.not_after.timestamp())


# aiohttp's sites take no handshake timeout; these pass one to create_server.
# They set the attributes aiohttp's own start() sets (aiohttp 3.14, pinned).
async def _serve_tls(site: web.BaseSite, timeout: float, **where: Any) -> asyncio.Server:
    await web.BaseSite.start(site)
    server = site._runner.server
    assert server is not None
    created: asyncio.Server = await asyncio.get_running_loop().create_server(
        server,
        ssl=site._ssl_context,
        backlog=site._backlog,
        ssl_handshake_timeout=timeout,
        **where,
    )
    return created


class TLSTCPSite(web.TCPSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int | None,
        tls: ServedCertificate,
        *,
        backlog: int,
        reuse_port: bool,
    ) -> None:
        super().__init__(
            runner, host, port, ssl_context=tls.context, backlog=backlog, reuse_port=reuse_port
        )
        self._handshake_timeout_s = tls.handshake_timeout_s

    async def start(self) -> None:
        self._server = server = await _serve_tls(
            self,
            self._handshake_timeout_s,
            host=self._host,
            port=self._port,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class TLSSockSite(web.SockSite):
    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, tls: ServedCertificate, *, backlog: int
    ) -> None:
        super().__init__(runner, sock, ssl_context=tls.context, backlog=backlog)
        self._handshake_timeout_s = tls.handshake_timeout_s

    async def start(self) -> None:
        self._server = await _serve_tls(self, self._handshake_timeout_s, sock=self._sock)
