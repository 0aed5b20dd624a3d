"""One deadline around every call to the shared store, and one translation of its failures.

The client's own socket timeouts bound each read and each connect, but a call may
reconnect and retry; :func:`bounded` caps the whole call, so a request waiting on
the store waits at most this long whatever the server does, and turns whatever
went wrong into :class:`~relayd.store.redis.StoreUnavailableError` (never the
server's own words, which may name keys).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from relayd.config import Settings
from relayd.store.redis import CONNECT_TIMEOUT_S, StoreUnavailableError, unavailable

__all__ = ["bounded", "call_deadline"]


def call_deadline(settings: Settings) -> float:
    """Seconds one store call may take in all: a reconnect, then the call itself."""
    timeout = settings.store.timeout_s
    return min(CONNECT_TIMEOUT_S, timeout * 4) + timeout


@asynccontextmanager
async def bounded(settings: Settings, what: str) -> AsyncIterator[None]:
    """Run the block under :func:`call_deadline`; a failure or a late answer raises
    StoreUnavailableError naming ``what``."""
    from redis.exceptions import RedisError  # loaded with the client by then

    try:
        async with asyncio.timeout(call_deadline(settings)):
            yield
    except (RedisError, OSError) as exc:  # TimeoutError (the deadline) is an OSError
        raise unavailable(exc, what) from None
    except StoreUnavailableError:
        raise
