"""OAuth grants live in the state directory: a real ``relayd serve`` restarted keeps
them; a SIGHUP that removes their relay key ends them at once; a revocation through
one worker ends a token in every worker at once; and its log never shows a code or
a token."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import OTHER_KEY, RELAY_KEY
from tests.oauthflow import bearer, login, refresh, register, tokens
from tests.test_daemon import Start, _env, start  # noqa: F401 (a fixture)

pytestmark = pytest.mark.process


async def test_tokens_survive_a_restart(
    start: Start,  # noqa: F811 (the fixture)
    fake_server: TestServer,
    unused_tcp_port: int,
    tmp_path: Path,
) -> None:
    port = unused_tcp_port
    origin = f"http://127.0.0.1:{port}"
    keys = tmp_path / "keys"
    keys.write_text(f"team:{RELAY_KEY}\nother:{OTHER_KEY}\n")
    keys.chmod(0o600)
    env = _env(
        str(fake_server.make_url("")).rstrip("/"),
        RELAYD_LISTEN=f"127.0.0.1:{port}",
        RELAYD_PUBLIC_URL=origin,
        RELAYD_KEYS="",
        RELAYD_KEYS_FILE=str(keys),
    )
    first = await start(env=env)
    jar = aiohttp.CookieJar(unsafe=True)  # the login cookie, on an IP address
    async with aiohttp.ClientSession(origin, cookie_jar=jar) as http:
        client_id = await register(http)  # type: ignore[arg-type]
        done = await login(http, client_id, RELAY_KEY, scope="offline_access")
        status, granted = await tokens(http, done)
        assert status == 200, granted
        ping = await http.get("/v1/actions/ping", headers=bearer(granted["access_token"]))
        assert ping.status == 200
        assert await first.stop() == 0

        second = await start(env=env)
        ping = await http.get("/v1/actions/ping", headers=bearer(granted["access_token"]))
        assert ping.status == 200, await ping.text()
        status, renewed = await refresh(http, client_id, granted["refresh_token"])
        assert status == 200, renewed

        keys.write_text(f"other:{OTHER_KEY}\n")  # the key the grant was made with is gone
        second.process.send_signal(signal.SIGHUP)
        await second.wait_line("reloaded")
        gone = await http.get("/v1/actions/ping", headers=bearer(renewed["access_token"]))
        assert gone.status == 401
        status, _ = await refresh(http, client_id, renewed["refresh_token"])
        assert status == 400
        await second.stop()
    log = "\n".join(first.lines + second.lines)
    secrets = {
        "code": done.code,
        **{f"first {k}": granted[k] for k in ("access_token", "refresh_token")},
        **{f"renewed {k}": renewed[k] for k in ("access_token", "refresh_token")},
    }
    leaked = [name for name, secret in secrets.items() if secret in log]
    assert not leaked, f"relayd's log holds the {leaked}"
    assert "key=team" in log or '"key": "team"' in log  # the token acted as its key


async def test_a_token_revoked_through_one_worker_is_refused_by_every_worker(
    start: Start,  # noqa: F811 (the fixture)
    fake_server: TestServer,
    unused_tcp_port: int,
) -> None:
    """Each worker remembers the tokens it has checked; a revocation made through
    any one of them still counts from the next request, in all of them."""
    port = unused_tcp_port
    origin = f"http://127.0.0.1:{port}"
    env = _env(
        str(fake_server.make_url("")).rstrip("/"),
        RELAYD_LISTEN=f"127.0.0.1:{port}",
        RELAYD_PUBLIC_URL=origin,
        RELAYD_WORKERS="2",
    )
    relayd = await start(env=env)
    await relayd.wait_line("2 workers serving")
    jar = aiohttp.CookieJar(unsafe=True)  # the login cookie, on an IP address
    # A connection of its own per request, so the kernel spreads them over both workers.
    fresh = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(origin, cookie_jar=jar, connector=fresh) as http,
        asyncio.timeout(30),
    ):
        client_id = await register(http)  # type: ignore[arg-type]
        done = await login(http, client_id, RELAY_KEY)
        status, granted = await tokens(http, done)
        assert status == 200, granted
        token = bearer(granted["access_token"])
        answered_by: set[int] = set()
        while len(answered_by) < 2:  # both workers have checked, and remember, the token
            health = await http.get("/health", headers=token)
            assert health.status == 200
            answered_by.add((await health.json())["meta"]["pid"])
        revoked = await http.post(
            "/oauth/revoke", data={"token": granted["access_token"], "client_id": client_id}
        )
        assert revoked.status == 200
        for _ in range(20):  # both workers, all but surely (each one half the time)
            refused = await http.get("/v1/actions/ping", headers=token)
            assert refused.status == 401, "a revoked token was still accepted"
    assert await relayd.stop() == 0
