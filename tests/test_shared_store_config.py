"""Configuring the shared store: its password from a credential, TLS with a private CA,
the link-signing secret it needs, and a server that does not answer at start.

What an operator sees is checked on real ``relayd check-config`` and ``relayd serve``
processes; the password is a canary that must never reach their output.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp.test_utils import TestServer

from relayd.config import load_settings, masked_url, redacted
from relayd.preflight import StartupError, check_shared_store
from relayd.store.blobs import open_blob_store
from relayd.store.redis import connect
from tests.redisserver import RedisServer
from tests.test_daemon import Relayd, _env, _exits, _one_line_refusal

PASSWORD = "redis-canary-password-5up3r53cr3t"
SECRET = "signing-secret-for-every-instance-0123456789"


def _file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "locked", password=PASSWORD)
    server.start()
    yield server
    server.stop()


def test_the_url_is_shown_with_its_password_masked() -> None:
    assert masked_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert masked_url("rediss://relayd:pw@h:6380/1") == "rediss://relayd:***@h:6380/1"
    assert masked_url("redis://h:6379/0") == "redis://h:6379/0"


def test_the_password_comes_from_a_file_or_a_credential_and_is_never_printed(
    tmp_path: Path,
) -> None:
    secret = _file(tmp_path / "signing", SECRET)
    environ = {
        "OPENAI_API_KEY": "sk-test",
        "RELAYD_REDIS_URL": f"redis://:{PASSWORD}-in-url@10.0.0.9:6379/0",
        "RELAYD_SIGNING_SECRET_FILE": str(secret),
    }
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    _file(credentials / "redis_password", PASSWORD)
    settings = load_settings(environ={**environ, "CREDENTIALS_DIRECTORY": str(credentials)})
    assert settings.store.redis_password == PASSWORD
    assert settings.sources["store.redis_password_file"] == "credential redis_password"
    assert PASSWORD not in repr(settings)
    shown = redacted(settings)
    assert shown["store"]["redis_url"] == "redis://:***@10.0.0.9:6379/0"
    assert shown["store"]["redis_password_file"] == "<set>"
    assert PASSWORD not in str(shown)
    from_file = _file(tmp_path / "pw", PASSWORD + "-file")
    settings = load_settings(environ={**environ, "RELAYD_REDIS_PASSWORD_FILE": str(from_file)})
    assert settings.store.redis_password == PASSWORD + "-file"


async def _check_config(env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "check-config",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_check_config_reaches_a_locked_server_with_the_credential_and_hides_it(
    locked_server: RedisServer, fake_server: TestServer, tmp_path: Path
) -> None:
    upstream = str(fake_server.make_url("")).rstrip("/")
    env = _env(
        upstream,
        RELAYD_REDIS_URL=f"redis://127.0.0.1:{locked_server.port}/0",
        RELAYD_REDIS_PASSWORD_FILE=str(_file(tmp_path / "pw", PASSWORD)),
        RELAYD_SIGNING_SECRET_FILE=str(_file(tmp_path / "signing", SECRET)),
        RELAYD_CONFIG=str(_file(tmp_path / "relayd.toml", '[store]\nbackend = "redis"')),
    )
    code, out, err = await _check_config(env)
    assert code == 0, err
    assert PASSWORD not in out + err
    # The same password in the URL instead: masked where the URL is shown.
    del env["RELAYD_REDIS_PASSWORD_FILE"]
    env["RELAYD_REDIS_URL"] = locked_server.url
    code, out, err = await _check_config(env)
    assert code == 0, err
    assert f"redis://:***@127.0.0.1:{locked_server.port}/0" in out
    assert PASSWORD not in out + err
    # A wrong password is refused at start, in one line that does not repeat it.
    env["RELAYD_REDIS_URL"] = f"redis://:wrong-{PASSWORD}@127.0.0.1:{locked_server.port}/0"
    code, out, err = await _check_config(env)
    assert code == 2
    assert "does not answer" in err and PASSWORD not in out + err


async def test_a_redis_relay_without_a_signing_secret_refuses_to_start_saying_how(
    redis_url: str, fake_server: TestServer, tmp_path: Path
) -> None:
    env = _env(
        str(fake_server.make_url("")).rstrip("/"),
        RELAYD_REDIS_URL=redis_url,
        RELAYD_CONFIG=str(_file(tmp_path / "relayd.toml", '[store]\nbackend = "redis"')),
    )
    code, out, err = await _check_config(env)
    assert code == 2
    [line] = [ln for ln in err.splitlines() if not ln.startswith("relayd: warning:")]
    assert "actions_signing_secret" in line and "same" in line


async def test_serve_refuses_a_shared_store_that_does_not_answer(
    fake_server: TestServer, tmp_path: Path
) -> None:
    gone = RedisServer(tmp_path / "gone")  # a port nobody listens on
    env = _env(
        str(fake_server.make_url("")).rstrip("/"),
        RELAYD_REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{gone.port}/0",
        RELAYD_SIGNING_SECRET_FILE=str(_file(tmp_path / "signing", SECRET)),
        RELAYD_CONFIG=str(_file(tmp_path / "relayd.toml", '[store]\nbackend = "redis"')),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    relayd = Relayd(process)
    try:
        assert await _exits(relayd) == 2
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    refusal = _one_line_refusal(relayd)
    expected = f"relayd: the shared store redis://:***@127.0.0.1:{gone.port}/0 does not answer: "
    assert refusal.startswith(expected)
    assert PASSWORD not in "\n".join(relayd.lines)


async def test_rediss_with_a_private_ca_reaches_the_server(tmp_path: Path) -> None:
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    cert, key, ca = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(ca))
    server = RedisServer(tmp_path / "tls", tls=(cert, key, ca))
    server.start()
    try:
        env = {
            "OPENAI_API_KEY": "sk-test",
            "RELAYD_REDIS_URL": server.tls_url,
            "RELAYD_REDIS_CA_FILE": str(ca),
            "RELAYD_SIGNING_SECRET_FILE": str(_file(tmp_path / "signing", SECRET)),
        }
        config = _file(tmp_path / "relayd.toml", '[store]\nbackend = "redis"')
        settings = load_settings(config, environ=env)
        await asyncio.to_thread(check_shared_store, settings)  # start-up check, over TLS
        client = connect(settings)
        try:
            blobs = open_blob_store(settings, client)
            blob_id = await blobs.put(b"over tls", 60)
            assert await blobs.get(blob_id) == b"over tls"
        finally:
            await client.aclose()
        # Without the private CA, the server's certificate is not trusted.
        del env["RELAYD_REDIS_CA_FILE"]
        untrusted = load_settings(config, environ=env)
        with pytest.raises(StartupError, match="does not answer"):
            await asyncio.to_thread(check_shared_store, untrusted)
    finally:
        server.stop()
