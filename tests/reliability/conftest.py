"""Fixtures for the reliability suites: misbehaving upstreams, and leak accounting.

A leak is measured, not guessed: open file descriptors of this process
(``/proc/self/fd``; relayd, its upstream and its clients all live in it), asyncio
tasks, relayd's named background tasks, and the connections of relayd's upstream
connector. After a fault everything must come back to the baseline within a
bounded wait; only idle keep-alive connections in relayd's pool (two descriptors
and one server task each, both ends being in this process) may remain.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from relayd import tasks as relayd_tasks
from relayd.state import UPSTREAM
from tests.conftest import CANARY, RELAY_KEY
from tests.reliability.faults import FaultServer

AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
SETTLE_S = 3.0  # how long freed resources may take to be given back

# Small timeouts so every fault ends quickly; the assertions allow this much slack.
FAST = {
    "connect_timeout_s": 0.5,
    "first_byte_timeout_s": 0.5,
    "idle_timeout_s": 0.5,
    "realtime_idle_timeout_s": 0.5,
}
# FAST as a settings layer for relay_factory.
FAST_SETTINGS = {
    "upstream": {
        name: FAST[name] for name in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s")
    },
    "realtime": {"idle_timeout_s": FAST["realtime_idle_timeout_s"]},
}
SLACK_S = 1.5


@pytest.fixture
async def fault_server() -> AsyncIterator[FaultServer]:
    server = await FaultServer().start()
    yield server
    await server.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OfflineResolver(aiohttp.abc.AbstractResolver):
    """A resolver that knows no name: DNS failure, without asking any real resolver."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        pass

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        raise OSError(socket.EAI_NONAME, f"{host}: Name or service not known (offline test)")

    async def close(self) -> None:
        pass


@pytest.fixture
def offline_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every connector created from now on resolves nothing (names under .invalid)."""
    monkeypatch.setattr(aiohttp.connector, "DefaultResolver", OfflineResolver)
    yield


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    """A client that keeps no connection after each request, watched for canaries."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        trace_configs=[CANARY.trace()],
        **kwargs,
    )


# --------------------------------------------------------------------------- leaks


@dataclass(frozen=True)
class Footprint:
    fds: int
    tasks: int
    spawned: int
    idle_upstream: int


def upstream_pool(relay: TestClient) -> tuple[int, int]:
    """(acquired, idle) connections of relayd's upstream connector."""
    session = relay.app[UPSTREAM]._session
    assert session is not None
    connector: Any = session.connector
    idle = sum(len(conns) for conns in connector._conns.values())
    return len(connector._acquired), idle


def footprint(relay: TestClient) -> Footprint:
    return Footprint(
        fds=len(os.listdir("/proc/self/fd")),
        tasks=len(asyncio.all_tasks()),
        spawned=len(relayd_tasks._running),
        idle_upstream=upstream_pool(relay)[1],
    )


async def assert_settles(
    relay: TestClient, baseline: Footprint, server: FaultServer | None = None, *, held: int = 0
) -> None:
    """Wait (bounded) until the fault's resources are all given back.

    Idle pooled upstream connections beyond the baseline's are allowed (they are
    reusable, not leaked): each costs two descriptors (both ends are in this
    process when the upstream is local) and one server task. ``held`` counts
    upstream-side connections the fault server keeps on purpose (a descriptor and a
    task each), when it cannot see relayd leave.
    """
    upstream = relay.app[UPSTREAM]
    problems: list[str] = []
    try:
        async with asyncio.timeout(SETTLE_S):
            while True:
                acquired, idle = upstream_pool(relay)
                now = footprint(relay)
                extra_idle = max(0, idle - baseline.idle_upstream)
                local = server is not None
                problems = []
                if upstream.in_flight:
                    problems.append(f"{upstream.in_flight} upstream requests in flight")
                if acquired:
                    problems.append(f"{acquired} upstream connections still acquired")
                if server is not None and server.open_connections > idle:
                    problems.append(
                        f"upstream has {server.open_connections} open connections, "
                        f"relayd pools {idle}"
                    )
                if now.fds > baseline.fds + extra_idle * (2 if local else 1) + held:
                    problems.append(f"{now.fds - baseline.fds} more file descriptors")
                if now.tasks > baseline.tasks + (extra_idle if local else 0) + held:
                    problems.append(f"{now.tasks - baseline.tasks} more asyncio tasks")
                if now.spawned > baseline.spawned:
                    problems.append(f"{now.spawned - baseline.spawned} relayd tasks still running")
                if not problems:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError("resources not given back: " + "; ".join(problems)) from None
