"""The OAuth grant store's contract, on both backends: SQLite in the test's state
directory, and a real redis-server (the ``redis_url`` fixture).

Codes and tokens here are made-up digests: no secret of a real login is involved.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from relayd.config import Settings, updated
from relayd.store.grants import (
    EPOCH_FILENAME,
    FILENAME,
    ClientRecord,
    Grant,
    GrantStore,
    ReplayError,
    forget_remembered_grants,
    open_grant_store,
)
from relayd.store.grants_redis import GRANTS_TAG
from relayd.store.redis import StoreUnavailableError, connect
from tests.redisserver import RedisServer

GRANT = Grant("client-1", "team", "print-1", ("mcp",), "https://relay.example/mcp", True)
OPEN_GRANT = Grant("client-1", "team", "print-1", None, "https://relay.example/mcp", False)
REDIRECT = "https://app.example/callback"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"

Opener = Callable[[], GrantStore]


def _digest() -> bytes:
    return hashlib.sha256(secrets.token_bytes(16)).digest()


@pytest.fixture(params=["local", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens grant stores on one backend; two opened by one test share their grants
    (two workers, or two instances)."""
    clients: list[Redis] = []
    stores: list[GrantStore] = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        settings = updated(Settings(), store={"backend": "redis", "redis_url": url})
    else:
        settings = updated(Settings(), store={"dir": str(tmp_path / "state")})

    def opener() -> GrantStore:
        client = connect(settings) if request.param == "redis" else None
        if client is not None:
            clients.append(client)
        stores.append(open_grant_store(settings, client))
        return stores[-1]

    yield opener
    for store in stores:
        await store.close()
    for client in clients:
        await client.aclose()


@pytest.fixture
def store(open_store: Opener) -> GrantStore:
    return open_store()


async def _family(store: GrantStore, grant: Grant = GRANT) -> str:
    """A family opened by a code, that code redeemed: its id."""
    code = _digest()
    await store.add_code(code, grant, REDIRECT, CHALLENGE, time.time() + 60)
    record = await store.take_code(code)
    assert record is not None
    return record.family


async def test_a_code_gives_its_grant_once_and_a_second_use_revokes_the_family(
    store: GrantStore,
) -> None:
    code = _digest()
    await store.add_code(code, GRANT, REDIRECT, CHALLENGE, time.time() + 60)
    record = await store.take_code(code)
    assert record is not None
    assert (record.grant, record.redirect_uri, record.challenge) == (GRANT, REDIRECT, CHALLENGE)
    access = _digest()
    await store.add_tokens(record.family, [(access, "access", time.time() + 3600)])
    assert await store.access(access) == GRANT
    with pytest.raises(ReplayError) as replay:
        await store.take_code(code)
    assert replay.value.grant == GRANT
    assert await store.access(access) is None  # what the code issued ends with it


async def test_a_code_raced_by_two_instances_is_redeemed_by_exactly_one(
    open_store: Opener,
) -> None:
    first, second = open_store(), open_store()
    code = _digest()
    await first.add_code(code, GRANT, REDIRECT, CHALLENGE, time.time() + 60)
    results = await asyncio.gather(
        first.take_code(code), second.take_code(code), return_exceptions=True
    )
    assert sum(1 for r in results if r is not None and not isinstance(r, Exception)) == 1
    assert sum(1 for r in results if isinstance(r, ReplayError)) == 1


async def test_an_expired_or_unknown_code_is_nothing(store: GrantStore) -> None:
    code = _digest()
    await store.add_code(code, GRANT, REDIRECT, CHALLENGE, time.time() - 1)
    assert await store.take_code(code) is None
    assert await store.take_code(_digest()) is None


async def test_scopes_none_means_all_of_the_keys_and_survives_the_store(
    store: GrantStore,
) -> None:
    family = await _family(store, OPEN_GRANT)
    access = _digest()
    await store.add_tokens(family, [(access, "access", time.time() + 60)])
    assert await store.access(access) == OPEN_GRANT


async def test_a_refresh_token_rotates_once_and_a_replay_revokes_everything(
    store: GrantStore,
) -> None:
    family = await _family(store)
    access, refresh = _digest(), _digest()
    now = time.time()
    await store.add_tokens(
        family, [(access, "access", now + 3600), (refresh, "refresh", now + 86400)]
    )
    assert await store.access(refresh) is None  # a refresh token is no access token
    assert await store.use_refresh(access) is None  # nor the other way round
    assert await store.use_refresh(refresh) == (family, GRANT)
    renewed = _digest()
    await store.add_tokens(family, [(renewed, "access", now + 3600)])
    assert await store.access(renewed) == GRANT
    with pytest.raises(ReplayError):
        await store.use_refresh(refresh)
    assert await store.access(access) is None
    assert await store.access(renewed) is None


async def test_expired_tokens_are_refused(store: GrantStore) -> None:
    family = await _family(store)
    access, refresh = _digest(), _digest()
    past = time.time() - 1
    await store.add_tokens(family, [(access, "access", past), (refresh, "refresh", past)])
    assert await store.access(access) is None
    assert await store.use_refresh(refresh) is None


async def test_revoking_a_token_ends_its_family(store: GrantStore) -> None:
    family = await _family(store)
    access, refresh = _digest(), _digest()
    now = time.time()
    await store.add_tokens(family, [(access, "access", now + 60), (refresh, "refresh", now + 60)])
    assert await store.revoke(refresh) is True
    assert await store.access(access) is None
    assert await store.use_refresh(refresh) is None
    assert await store.revoke(_digest()) is False


async def test_a_revocation_by_another_worker_counts_from_the_next_check(
    open_store: Opener,
) -> None:
    """A worker that has just answered a token (and may remember the answer) refuses
    it as soon as another worker, or another machine, has revoked it."""
    first, second = open_store(), open_store()
    family = await _family(first)
    access, refresh = _digest(), _digest()
    now = time.time()
    await first.add_tokens(family, [(access, "access", now + 60), (refresh, "refresh", now + 60)])
    for _ in range(3):
        assert await first.access(access) == GRANT
    assert await second.revoke(refresh) is True
    assert await first.access(access) is None
    assert await second.access(access) is None


async def test_a_token_answered_before_is_refused_once_it_expires(store: GrantStore) -> None:
    family = await _family(store)
    access = _digest()
    await store.add_tokens(family, [(access, "access", time.time() + 0.3)])
    assert await store.access(access) == GRANT
    deadline = time.monotonic() + 5
    while await store.access(access) is not None:
        assert time.monotonic() < deadline, "an expired token is still answered"
        await asyncio.sleep(0.05)


async def test_a_revocation_by_this_worker_counts_at_once(store: GrantStore) -> None:
    family = await _family(store)
    access = _digest()
    await store.add_tokens(family, [(access, "access", time.time() + 60)])
    assert await store.access(access) == GRANT
    assert await store.revoke(access) is True
    assert await store.access(access) is None


async def test_forgetting_everywhere_makes_a_worker_read_the_file_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the supervisor does when a worker dies: another worker's remembered
    answer goes, even for a change that did not renew the epoch itself."""
    settings = updated(Settings(), store={"dir": str(tmp_path / "state")})
    store = open_grant_store(settings, None)
    try:
        family = await _family(store)
        access = _digest()
        await store.add_tokens(family, [(access, "access", time.time() + 60)])
        assert await store.access(access) == GRANT
        # A worker that committed a revocation and died before renewing the epoch.
        with sqlite3.connect(tmp_path / "state" / FILENAME) as db:
            db.execute("UPDATE families SET revoked = 1 WHERE family = ?", (family,))
        forget_remembered_grants(settings)
        assert await store.access(access) is None
    finally:
        await store.close()
    (tmp_path / "state" / EPOCH_FILENAME).unlink()
    (tmp_path / "state" / EPOCH_FILENAME).mkdir()  # cannot be mapped: logged, not raised
    forget_remembered_grants(settings)
    assert "could not tell workers to forget" in caplog.text


async def test_clients_are_kept_and_read_back(store: GrantStore) -> None:
    registered = ClientRecord("dcr-1", "registered", "Test app", (REDIRECT,), "none", 1000.0)
    document = ClientRecord(
        "https://chatgpt.com/oauth/client.json", "document", "ChatGPT", (REDIRECT,), "none", 2.5
    )
    await store.save_client(registered)
    await store.save_client(document)
    assert await store.client("dcr-1") == registered
    assert await store.client(document.client_id) == document
    assert await store.client("nobody") is None


async def test_a_secret_is_made_once_and_shared_by_every_opener(open_store: Opener) -> None:
    first, second = open_store(), open_store()
    made = await first.secret("login-csrf")
    assert len(made) == 32
    assert await second.secret("login-csrf") == made
    assert await first.secret("other") != made


# ---------------------------------------------------------------- Redis only


async def _redis_keys(client: Redis) -> list[str]:
    return sorted(k.decode() for k in await client.keys("relayd:*"))


async def test_every_temporary_grant_key_expires_and_one_family_shares_a_tag(
    redis_url: str,
) -> None:
    settings = updated(Settings(), store={"backend": "redis", "redis_url": redis_url})
    client = connect(settings)
    store = open_grant_store(settings, client)
    try:
        family = await _family(store)
        now = time.time()
        await store.add_tokens(
            family, [(_digest(), "access", now + 3600), (_digest(), "refresh", now + 86400)]
        )
        document = ClientRecord("https://c.example/client.json", "document", "D", (), "none")
        await store.save_client(document)
        await store.save_client(ClientRecord("dcr-2", "registered", "R", (), "none"))
        await store.secret("login-csrf")
        keys = await _redis_keys(client)
        assert all(f"{{{GRANTS_TAG}}}" in k for k in keys), keys
        kept = {k for k in keys if k.endswith((":client:dcr-2", ":secret:login-csrf"))}
        assert len(kept) == 2  # a registered client and the CSRF key are not temporary
        for name in set(keys) - kept:
            ttl = await client.pttl(name)
            assert ttl > 0, f"{name} never expires"
        # A refresh token is remembered a day past its own expiry, and so is its family.
        family_key = next(k for k in keys if ":family:" in k)
        assert await client.pttl(family_key) > (86400 + 86400 - 60) * 1000
    finally:
        await store.close()
        await client.aclose()


async def test_a_stopped_server_fails_fast_and_the_same_store_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    settings = updated(
        Settings(), store={"backend": "redis", "redis_url": server.url, "timeout_s": 0.2}
    )
    client = connect(settings)
    store = open_grant_store(settings, client)
    try:
        family = await _family(store)
        access = _digest()
        await store.add_tokens(family, [(access, "access", time.time() + 60)])
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as failed:
            await store.access(access)
        assert time.monotonic() - started < 1.5
        assert failed.value.status == 503 and failed.value.code == "store_unavailable"
        server.start()  # empty again (no persistence): the store answers, nothing hangs
        assert await store.access(access) is None
        await _family(store)
    finally:
        await store.close()
        await client.aclose()
        server.stop()
