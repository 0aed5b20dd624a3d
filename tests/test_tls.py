"""relayd's own TLS as a real process: https on RELAYD_LISTEN with workers and with
socket activation, SSE and wss over it, bad clients bounded, SIGHUP swapping the
certificate under an open stream (issue 13). Loopback only, a throwaway CA."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import warnings
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer
from cryptography import x509

from tests.conftest import RELAY_KEY
from tests.fakes.openai import FakeOpenAI
from tests.test_daemon import (
    REALTIME,
    Relayd,
    Start,
    _env,
    _stream,
    auth,
    socket_activated,
    start,
)
from tests.test_tls_config import write_pair

__all__ = ["start"]  # the fixture, shared with test_daemon

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def https(relayd: Relayd, path: str) -> str:
    return relayd.url(path).replace("http://", "https://", 1)


async def tls_env(fake_server: TestServer, ca: trustme.CA, where: Path, **extra: str) -> dict:
    cert, key = write_pair(ca, where)
    return _env(
        str(fake_server.make_url("")).rstrip("/"),
        RELAYD_TLS_CERT_FILE=str(cert),
        RELAYD_TLS_KEY_FILE=str(key),
        **extra,
    )


async def handshake(
    port: int,
    ca: trustme.CA,
    *,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None,
    ciphers: str | None = None,
) -> ssl.SSLObject:
    """A fresh TLS connection; gives back the finished handshake's SSL object.
    ``versions`` and ``ciphers`` open this client up to what relayd must refuse."""
    context = client_context(ca)
    if versions is not None or ciphers is not None:
        context.set_ciphers(f"{ciphers or 'DEFAULT'}:@SECLEVEL=0")
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if versions is not None:
        with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated, as they should be
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version, context.maximum_version = versions
    context.set_alpn_protocols(["h2", "http/1.1"])
    async with asyncio.timeout(5):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    ssl_object = writer.get_extra_info("ssl_object")
    writer.close()
    return ssl_object


def serial(ssl_object: ssl.SSLObject) -> int:
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_https_with_tls12_minimum_alpn_http11_sse_wss_and_the_expiry_metric(
    start: Start, fake_server: TestServer, ca: trustme.CA, tmp_path: Path
) -> None:
    relayd = await start(env=await tls_env(fake_server, ca, tmp_path))
    assert relayd.port is not None
    await relayd.wait_line(f"listening on https://127.0.0.1:{relayd.port}")
    done = await handshake(relayd.port, ca)
    assert done.selected_alpn_protocol() == "http/1.1"  # not h2, though offered
    assert done.version() in ("TLSv1.2", "TLSv1.3")
    twelve = await handshake(relayd.port, ca, ciphers="ALL")
    assert twelve.version() == "TLSv1.2"
    assert twelve.cipher()[0].startswith("ECDHE-") and "GCM" in twelve.cipher()[0]
    # relayd refuses (an alert, or a reset that races it), not this client.
    old = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    for refused in (
        handshake(relayd.port, ca, versions=old),
        handshake(relayd.port, ca, ciphers="ECDHE-ECDSA-AES128-SHA"),  # CBC, not AEAD
    ):
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as caught:
            await refused
        assert "ALERT" in str(getattr(caught.value, "reason", "ALERT"))
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        events = await _stream(session, https(relayd, "/v1/responses"), RELAY_KEY)
        assert events[0] == "response.created" and events[-1] == "response.completed"
        async with session.ws_connect(https(relayd, REALTIME), headers=auth(RELAY_KEY)) as ws:
            await ws.send_str("over wss")
            async with asyncio.timeout(5):
                message = await ws.receive()
            assert message.type is WSMsgType.TEXT and message.data == "over wss"
        async with session.get(https(relayd, "/metrics"), headers=auth(RELAY_KEY)) as response:
            text = await response.text()
    (line,) = [
        x for x in text.splitlines() if x.startswith("relayd_tls_certificate_expiry_timestamp")
    ]
    assert float(line.split()[-1]) > 1.7e9
    assert await relayd.stop() == 0


async def test_plain_http_and_a_stalled_handshake_are_closed_without_a_traceback(
    start: Start, fake_server: TestServer, ca: trustme.CA, tmp_path: Path
) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text("[server]\ntls_handshake_timeout = 1\n")
    relayd = await start("--config", str(config), env=await tls_env(fake_server, ca, tmp_path))
    assert relayd.port is not None
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", relayd.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await reader.read()  # closed: no http answer on the TLS port
        assert not answer.startswith(b"HTTP/")
        writer.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", relayd.port)
        writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        assert await reader.read() == b""
        writer.close()
    assert 0.8 < loop.time() - started < 4
    assert (await handshake(relayd.port, ca)).version() is not None  # still serving
    assert await relayd.stop() == 0
    assert not [line for line in relayd.lines if "Traceback" in line or "ERROR" in line]


async def test_sighup_swaps_the_certificate_and_the_open_stream_goes_on(
    start: Start, fake_server: TestServer, fake: FakeOpenAI, ca: trustme.CA, tmp_path: Path
) -> None:
    fake.pace = 0.5  # about 3 s of stream
    env = await tls_env(fake_server, ca, tmp_path)
    relayd = await start(env=env)
    assert relayd.port is not None
    first = serial(await handshake(relayd.port, ca))
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        stream = asyncio.ensure_future(_stream(session, https(relayd, "/v1/responses"), RELAY_KEY))
        await fake.wait_for(lambda: bool(fake.seen), timeout=5)
        renewed_cert, renewed_key = write_pair(ca, tmp_path, name="renewed")
        os.replace(renewed_cert, env["RELAYD_TLS_CERT_FILE"])  # as certbot's deploy hook sees it
        os.replace(renewed_key, env["RELAYD_TLS_KEY_FILE"])
        relayd.process.send_signal(signal.SIGHUP)
        await relayd.wait_line("TLS certificate reloaded")
        renewed = await handshake(relayd.port, ca)
        second = serial(renewed)
        assert second != first
        assert renewed.selected_alpn_protocol() == "http/1.1"  # the fresh context's ALPN
        assert not stream.done()  # the stream opened before the reload is still going

        _, other_key = write_pair(ca, tmp_path, name="other")
        os.replace(other_key, env["RELAYD_TLS_KEY_FILE"])  # a key for another certificate
        relayd.process.send_signal(signal.SIGHUP)
        failed = await relayd.wait_line("reload failed")
        assert "does not match the certificate" in failed
        assert serial(await handshake(relayd.port, ca)) == second
        async with asyncio.timeout(10):
            events = await stream
    assert events[-1] == "response.completed"
    assert await relayd.stop() == 0


async def test_two_workers_serve_https(
    start: Start, fake_server: TestServer, ca: trustme.CA, tmp_path: Path
) -> None:
    relayd = await start(env=await tls_env(fake_server, ca, tmp_path, RELAYD_WORKERS="2"))
    await relayd.wait_line("2 workers serving")
    assert relayd.port is not None
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(https(relayd, "/health")) as response:
            assert response.status == 200
    assert await relayd.stop() == 0


async def test_socket_activation_serves_https_on_the_passed_socket(
    fake_server: TestServer, ca: trustme.CA, tmp_path: Path
) -> None:
    env = await tls_env(fake_server, ca, tmp_path, RELAYD_LISTEN="127.0.0.1:1")
    async with socket_activated(env) as (relayd, port):
        await relayd.wait_line(f"listening on https://127.0.0.1:{port}")
        assert (await handshake(port, ca)).selected_alpn_protocol() == "http/1.1"
        assert await relayd.stop() == 0
