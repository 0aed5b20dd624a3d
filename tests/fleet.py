"""Two ``relayd serve`` processes on one Redis behind a real nginx: a fleet (issue 16).

:func:`fleet_of_two` starts, on loopback, what an operator runs on two machines:

- two relayd processes (``a`` and ``b``, each on a port of its own and with a state
  directory of its own), both with ``[store] backend = "redis"`` on the one Redis
  the caller gives, the same keys file and the same signing secret file;
- in front of them (unless ``front=False``), the SHIPPED nginx site
  (``conf/nginx/relayd.conf``, tests/test_fronts.py substitutes ports and a
  throwaway certificate) with both instances in its ``upstream relayd`` block:
  round-robin, upstream keepalive, TLS on the client side.

``RELAYD_PUBLIC_URL`` is the front's origin, so a link either instance hands out
points at the front, as it would in production. Every wait is bounded; the
processes are killed on the way out (the ``start`` fixture reaps relayd, and checks
its log for the suite's secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from tests.conftest import OTHER_KEY, RELAY_KEY
from tests.test_daemon import Relayd, Start, _env
from tests.test_fronts import _binary, _free_port, _nginx_conf, _wait_port
from tests.test_tls_config import write_pair

__all__ = ["BOUND", "KEYS", "Fleet", "Instance", "all_served", "fleet_of_two", "served"]

BOUND = 20.0  # the most any one step of a fleet test may take
KEYS = f"team:{RELAY_KEY}\nother:{OTHER_KEY}\n"
# What every instance's config starts with: the shared store, and every file handed
# out as a signed link (never inline), so a link is there to follow.
BASE_CONFIG = '[store]\nbackend = "redis"\n\n[actions]\ninline_max_bytes = 0\n'


@dataclass
class Instance:
    """One relayd of the fleet: its process, config file and environment."""

    name: str
    relayd: Relayd
    config: Path
    env: dict[str, str]

    def url(self, path: str) -> str:
        return self.relayd.url(path)

    async def usage(self, *args: str) -> list[dict[str, Any]]:
        """``relayd usage --format json`` as an operator runs it on this machine (its
        config, its environment): the rows it prints."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relayd",
            "usage",
            "--config",
            str(self.config),
            "--format",
            "json",
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(BOUND):
            out, err = await process.communicate()
        assert process.returncode == 0, err.decode(errors="replace")
        rows = json.loads(out or b"[]")
        assert isinstance(rows, list)
        return rows

    async def reloaded(self, seen: int) -> str:
        """The line answering a SIGHUP sent when the log had ``seen`` lines."""
        async with asyncio.timeout(BOUND):
            while True:
                self.relayd._changed.clear()  # before the scan, so no line slips past
                for line in self.relayd.lines[seen:]:
                    if "reloaded" in line or "reload refused" in line:
                        return line
                await self.relayd._changed.wait()


@dataclass
class Fleet:
    a: Instance
    b: Instance
    keys: Path
    public: str  # RELAYD_PUBLIC_URL: the front's origin
    trust: ssl.SSLContext

    @property
    def instances(self) -> tuple[Instance, Instance]:
        return self.a, self.b

    def front(self, path: str) -> str:
        return self.public + path

    def session(self, base: str | None = None) -> aiohttp.ClientSession:
        """A client for the front (its certificate trusted) and the instances (plain
        http), relative to ``base`` if given; it keeps cookies for IP hosts."""
        connector = aiohttp.TCPConnector(ssl=self.trust, limit=200)
        # The login cookie is Secure (the public URL is https); like a browser on
        # localhost, send it to the instances' plain-http loopback origins too.
        origins = [i.url("") for i in self.instances]
        jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=origins)
        return aiohttp.ClientSession(base, connector=connector, cookie_jar=jar)

    async def reload_keys(self, text: str) -> list[str]:
        """Rewrite the shared keys file and SIGHUP every instance, as the guide says;
        the line each answered with."""
        self.keys.write_text(text)
        seen = [len(i.relayd.lines) for i in self.instances]
        for instance in self.instances:
            instance.relayd.process.send_signal(signal.SIGHUP)
        return [await i.reloaded(n) for i, n in zip(self.instances, seen, strict=True)]


def served(instance: Instance, route: str) -> int:
    """How many access lines of ``instance`` name ``route`` so far."""
    return sum(1 for line in instance.relayd.lines if f"route={route}" in line)


async def all_served(instances: Sequence[Instance], route: str, total: int) -> tuple[int, ...]:
    """Which instance answered how many of ``total`` requests to ``route``: waits
    (bounded) for their access lines, written just after each answer."""
    async with asyncio.timeout(BOUND):
        while sum(counts := tuple(served(i, route) for i in instances)) < total:
            await asyncio.sleep(0.02)
    return counts


@contextlib.asynccontextmanager
async def fleet_of_two(
    start: Start,
    upstream: str,
    tmp: Path,
    redis_url: str,
    *,
    configs: Sequence[str] = ("", ""),
    front: bool = True,
) -> AsyncIterator[Fleet]:
    """Start the fleet; ``configs`` are TOML appended to each instance's config (``a``
    first), e.g. ``[spend]`` tables."""
    keys = tmp / "relay_keys"
    keys.write_text(KEYS)
    keys.chmod(0o600)
    secret = tmp / "signing_secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    front_port = _free_port()
    public = f"https://127.0.0.1:{front_port}"

    async def launch(name: str, extra: str) -> Instance:
        config = tmp / f"relayd-{name}.toml"
        config.write_text(BASE_CONFIG + extra)
        state = tmp / f"state-{name}"
        env = _env(
            upstream,
            RELAYD_KEYS="",
            RELAYD_KEYS_FILE=str(keys),
            RELAYD_REDIS_URL=redis_url,
            RELAYD_SIGNING_SECRET_FILE=str(secret),
            RELAYD_STATE_DIR=str(state),
            RELAYD_PUBLIC_URL=public,
            RELAYD_TRUSTED_PROXIES="127.0.0.1",
        )
        relayd = await start("--config", str(config), env=env)
        return Instance(name, relayd, config, env)

    a, b = await asyncio.gather(*(launch(n, c) for n, c in zip("ab", configs, strict=True)))
    ca = trustme.CA()
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    fleet = Fleet(a, b, keys, public, trust)
    if not front:
        yield fleet
        return
    assert a.relayd.port is not None and b.relayd.port is not None
    cert, key = write_pair(ca, tmp)
    for directory in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "certbot"):
        (tmp / directory).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    ports = [a.relayd.port, b.relayd.port]
    conf.write_text(_nginx_conf(tmp, front_port, _free_port(), ports, cert, key))
    log = tmp / "front.log"
    argv = [_binary("nginx"), "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        await _wait_port(front_port, process, log)
        yield fleet
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
