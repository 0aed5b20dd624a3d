"""``python -m bench.stores``: what one call to each shared store costs, local against
Redis (issue 16), in one process on loopback.

Both backends in the same run: the local one in a temporary state directory, the
Redis one on a ``redis-server`` started for the run (tests/redisserver.py) on a
loopback port. Each operation runs sequentially, ``--calls`` times (default 2000),
after a warm-up; the table gives p50 and p99 in milliseconds:

- ``token check``: ``GrantStore.access``, the one store read of a request that
  carries an OAuth access token;
- ``code + tokens``: ``add_code`` then ``take_code`` then ``add_tokens`` (a login's
  token exchange, without the HTTP);
- ``refresh``: ``use_refresh`` then ``add_tokens`` (a rotation);
- ``blob 1 MiB``: ``BlobStore.put`` then ``get`` of one decoded image's size.

This is not a test: CI never runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from redis.asyncio import Redis

from relayd.config import Settings, updated
from relayd.store.blobs import BlobStore, open_blob_store
from relayd.store.grants import Grant, GrantStore, open_grant_store
from relayd.store.redis import connect
from tests.redisserver import RedisServer

__all__ = ["main"]

GRANT = Grant("client", "bench", "print", ("mcp",), "https://relay.example/mcp", True)
BLOB = secrets.token_bytes(1024 * 1024)


def _digest() -> bytes:
    return hashlib.sha256(secrets.token_bytes(16)).digest()


async def _timed(calls: int, one: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    for _ in range(min(100, calls)):
        await one()
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        await one()
        seconds.append(time.perf_counter() - started)
    cuts = statistics.quantiles(seconds, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


async def _measure(
    grants: GrantStore, blobs: BlobStore, calls: int
) -> dict[str, tuple[float, float]]:
    code = _digest()
    await grants.add_code(code, GRANT, "https://a.example/cb", "c" * 43, time.time() + 60)
    record = await grants.take_code(code)
    assert record is not None
    access, refresh = _digest(), _digest()
    now = time.time()
    await grants.add_tokens(
        record.family, [(access, "access", now + 3600), (refresh, "refresh", now + 86400)]
    )

    async def check() -> None:
        assert await grants.access(access) == GRANT

    async def exchange() -> None:
        fresh = _digest()
        await grants.add_code(fresh, GRANT, "https://a.example/cb", "c" * 43, time.time() + 60)
        taken = await grants.take_code(fresh)
        assert taken is not None
        await grants.add_tokens(taken.family, [(_digest(), "access", time.time() + 3600)])

    held = [refresh]

    async def rotate() -> None:
        used = await grants.use_refresh(held[0])
        assert used is not None
        held[0] = _digest()
        await grants.add_tokens(used[0], [(held[0], "refresh", time.time() + 86400)])

    async def blob() -> None:
        found = await blobs.get(await blobs.put(BLOB, 60))
        assert found is not None

    return {
        "token check": await _timed(calls, check),
        "code + tokens": await _timed(calls, exchange),
        "refresh": await _timed(calls, rotate),
        "blob 1 MiB": await _timed(max(50, calls // 10), blob),
    }


async def _run(calls: int, directory: Path) -> dict[str, dict[str, tuple[float, float]]]:
    results = {}
    local = updated(Settings(), store={"dir": str(directory / "state")})
    grants, blobs = open_grant_store(local, None), open_blob_store(local, None)
    results["local"] = await _measure(grants, blobs, calls)
    await grants.close()
    server = RedisServer(directory / "redis")
    server.start()
    client: Redis | None = None
    try:
        shared = updated(Settings(), store={"backend": "redis", "redis_url": server.url})
        client = connect(shared)
        grants, blobs = open_grant_store(shared, client), open_blob_store(shared, client)
        results["redis"] = await _measure(grants, blobs, calls)
    finally:
        if client is not None:
            await client.aclose()
        server.stop()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stores", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per operation")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relayd-bench-stores-") as directory:
        results = asyncio.run(_run(args.calls, Path(directory)))
    print("| operation | local p50 / p99 ms | redis p50 / p99 ms |")
    print("|---|---|---|")
    for name in results["local"]:
        cells = [f"{results[b][name][0]:.3f} / {results[b][name][1]:.3f}" for b in results]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
