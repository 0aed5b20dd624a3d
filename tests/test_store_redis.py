"""The connection to a real redis-server: deadlines, names, and a server that goes away."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from relayd.config import Settings, updated
from relayd.store.redis import connect, key, tagged
from tests.redisserver import RedisServer


def _settings(url: str, **store: object) -> Settings:
    return updated(Settings(), store={"backend": "redis", "redis_url": url, **store})


async def test_a_client_reads_what_it_wrote(redis_url: str) -> None:
    client = connect(_settings(redis_url))
    try:
        await client.set(key(_settings(redis_url), "probe"), b"1", px=1000)
        assert await client.get("relayd:probe") == b"1"
    finally:
        await client.aclose()


def test_keys_of_one_relay_key_share_a_cluster_slot() -> None:
    settings = _settings("redis://127.0.0.1:1/0", redis_prefix="team")
    assert tagged(settings, "alice", "spent", "total") == "team:{alice}:spent:total"
    assert key(settings, "secret") == "team:secret"


async def test_a_stopped_server_fails_a_call_within_the_deadline(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r")
    server.start()
    client = connect(_settings(server.url, timeout_s=0.3))
    try:
        assert await client.ping()
        server.stop()
        started = time.monotonic()
        with pytest.raises((RedisError, OSError)):
            await client.get("relayd:probe")
        assert time.monotonic() - started < 2.5
        server.start()  # back on the same port: the same client recovers
        assert await client.ping()
    finally:
        await client.aclose()
        server.stop()
