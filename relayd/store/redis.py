"""The connection to a shared Redis or Valkey server (``[store] backend = "redis"``).

One client per process (:func:`connect`), every call bounded by ``[store] timeout``:
a server that stops answering fails the call in that time instead of hanging a
request. Keys are named by :func:`key`, always under ``[store] redis_prefix`` and,
for anything that belongs to one relay key, hash-tagged by that key's name so every
key a script touches at once lives in one Redis Cluster slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from relayd.config import Settings
from relayd.errors import RelaydError

__all__ = ["StoreUnavailableError", "connect", "key", "tagged", "unavailable"]

if TYPE_CHECKING:  # the library itself loads with the first client (connect)
    from redis import asyncio as aioredis
    from redis.exceptions import RedisError

# The longest a new connection may take, whatever [store] timeout says: a
# server that is down refuses at once, one that is unreachable should not hold a
# request for longer than a call would.
CONNECT_TIMEOUT_S: Final = 2.0
# Connections to the store one process holds at most; more calls wait their turn. A
# call takes well under a millisecond, so a few dozen carry any load one process
# makes, and opening them all at once still fits in a deadline (256 did not).
MAX_CONNECTIONS: Final = 64


class StoreUnavailableError(RelaydError):
    """The shared store did not answer in time, or refused; the caller decides what the
    request gets (never a hang, never a 500 with the server's words in it). Left to
    the error middleware it is a 503 ``store_unavailable`` that says to retry."""

    status = 503
    type = "server_error"
    default_code = "store_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


def connect(settings: Settings) -> aioredis.Redis:
    """A client for ``[store] redis_url``; it connects on first use. The password of
    ``[store] redis_password_file`` (or its credential) and, for ``rediss://``, the CA
    of ``[store] redis_ca_file`` go with it."""
    # Here, not at the top: a relay on the local store never loads redis-py (its
    # memory and start-up time).
    from redis import asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    store = settings.store
    if not store.redis_url:
        raise ValueError("[store] redis_url is not set")
    options: dict[str, Any] = {}
    if store.redis_password:  # from a credential: wins over one in the URL
        options["password"] = store.redis_password
    if store.redis_url.startswith("rediss://") and store.redis_ca_file:
        options["ssl_ca_certs"] = store.redis_ca_file
    # A call that finds every connection busy waits for one (within the deadline),
    # where the default pool failed it at once past 100 calls in flight.
    pool = aioredis.BlockingConnectionPool.from_url(
        store.redis_url,
        max_connections=MAX_CONNECTIONS,
        timeout=store.timeout_s,
        socket_timeout=store.timeout_s,
        socket_connect_timeout=min(CONNECT_TIMEOUT_S, store.timeout_s * 4),
        retry_on_timeout=False,
        # Once more, at once, on a fresh connection when a pooled one turns out dead
        # (Redis restarted or failed over): else each stale connection fails one call
        # after recovery. Never after a timeout: that would double the deadline.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
        decode_responses=False,
        **options,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def key(settings: Settings, *parts: str) -> str:
    """``<prefix>:<part>:<part>…``: a key of relayd's own, in any slot."""
    return ":".join((settings.store.redis_prefix, *parts))


def tagged(settings: Settings, tag: str, *parts: str) -> str:
    """``<prefix>:{<tag>}:<part>…``: keys with the same ``tag`` (a relay key's name)
    share one Redis Cluster slot, so one script may touch them all."""
    return ":".join((settings.store.redis_prefix, "{" + tag + "}", *parts))


def unavailable(exc: RedisError | OSError, what: str) -> StoreUnavailableError:
    """The error to raise for a failed call: says what failed, not the server's words
    (which may name keys)."""
    kind = type(exc).__name__
    return StoreUnavailableError(f"the shared store did not answer ({what}: {kind})")
