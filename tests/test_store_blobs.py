"""The bytes behind download links, on both backends: files under the state directory,
and a real redis-server. Two stores opened by one test are two workers (local) or two
instances (redis) sharing the same blobs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from relayd.config import Settings, updated
from relayd.store.blobs import MAX_BLOB_BYTES, BlobStore, BlobTooLargeError, open_blob_store
from relayd.store.redis import connect

Opener = Callable[..., BlobStore]


async def _bytes(store: BlobStore, blob_id: str) -> bytes | None:
    found = await store.get(blob_id)
    if isinstance(found, Path):
        return found.read_bytes()
    return found


@pytest.fixture(params=["local", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    clients: list[Redis] = []
    stores: list[BlobStore] = []
    store: dict[str, object] = {"dir": str(tmp_path / "state")}
    if request.param == "redis":
        store = {"backend": "redis", "redis_url": request.getfixturevalue("redis_url")}

    def opener(**actions: object) -> BlobStore:
        settings = updated(Settings(), store=store, actions=actions)
        client = connect(settings) if request.param == "redis" else None
        if client is not None:
            clients.append(client)
        stores.append(open_blob_store(settings, client))
        return stores[-1]

    yield opener
    for opened in stores:
        await opened.close()
    for client in clients:
        await client.aclose()


async def test_a_blob_put_by_one_is_read_by_another(open_store: Opener) -> None:
    maker, server = open_store(), open_store()
    blob_id = await maker.put(b"\x89PNG image bytes", 60)
    assert await _bytes(server, blob_id) == b"\x89PNG image bytes"
    assert await server.get("0" * 32) is None
    assert await server.get("../../etc/passwd") is None


async def test_a_blob_is_gone_once_its_time_is_up(open_store: Opener) -> None:
    store = open_store()
    blob_id = await store.put(b"brief", 0.2)
    assert await _bytes(store, blob_id) == b"brief"
    async with asyncio.timeout(3):
        while await store.get(blob_id) is not None:
            await asyncio.sleep(0.05)


async def test_a_blob_over_ten_megabytes_is_refused_and_nothing_is_kept(
    open_store: Opener,
) -> None:
    store = open_store()
    with pytest.raises(BlobTooLargeError, match="at most 10485760 bytes"):
        await store.put(bytes(MAX_BLOB_BYTES + 1), 60)
    assert await _bytes(store, await store.put(bytes(MAX_BLOB_BYTES), 60)) == bytes(MAX_BLOB_BYTES)


# ---------------------------------------------------------------- one backend only


async def test_local_blobs_live_in_the_state_directory_and_keep_to_the_budget(
    tmp_path: Path,
) -> None:
    settings = updated(
        Settings(), store={"dir": str(tmp_path / "state")}, actions={"store_max_bytes": 2500}
    )
    store = open_blob_store(settings, None)
    older = await store.put(bytes(1000), 30)
    newer = await store.put(bytes(1000), 60)
    found = await store.get(newer)
    assert isinstance(found, Path) and found.parent == tmp_path / "state" / "files"
    assert os.stat(tmp_path / "state").st_mode & 0o777 == 0o700
    await store.put(bytes(1000), 90)  # over budget: the one closest to expiry goes
    assert await store.get(older) is None
    assert await store.get(newer) is not None


async def test_a_redis_blob_expires_with_its_link(redis_url: str) -> None:
    settings = updated(Settings(), store={"backend": "redis", "redis_url": redis_url})
    client = connect(settings)
    try:
        store = open_blob_store(settings, client)
        blob_id = await store.put(b"x", 300)
        ttl = await client.pttl(f"relayd:blob:{blob_id}")
        assert 299_000 < ttl <= 300_000
    finally:
        await client.aclose()
