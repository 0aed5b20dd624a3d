"""The processes under test: fake upstreams, relayd (two log levels), the aiohttp
floor (bench.floor) and nginx.

A *profile* is one fake upstream with its own knobs; every profile gets its own
relayd instances, its own floor and an nginx server block, because relayd (and the
floor) has one upstream.
"default" is the fake as tests use it (7 SSE events, no pacing); "paced" sends 50
events 20 ms apart to the ``slow`` model.
"""

from __future__ import annotations

import atexit
import importlib
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import HOST, Server, free_port, start_server

__all__ = [
    "EVERY_FLOOR_LIMITS",
    "FLOOR",
    "RELAYD_LEVELS",
    "Stack",
    "Target",
    "fake_argv",
    "find_nginx",
    "floor_argv",
]

REPO = Path(__file__).resolve().parent.parent

# The key the fake checks. Looked up at run time so that type-checking bench/ does
# not type-check the fake as well (it is the test suite's, with its own settings).
UPSTREAM_KEY: str = importlib.import_module("tests.fakes.openai").UPSTREAM_KEY

# Knobs every fake gets: a deep accept queue and uvloop, so the upstream is not the
# bottleneck of any target.
FAKE_COMMON = ("--backlog", "4096", "--uvloop", "--no-realtime-record")
PROFILES: dict[str, tuple[str, ...]] = {
    "default": (),
    "paced": ("--events", "50", "--pace", "0.02"),
    "soak": ("--pace", "0.05"),  # bench.soak: its ``slow`` streams last ~0.35 s
}
# "relayd" is the figure of record: every feature on, one access-log line per request.
RELAYD_LEVELS: dict[str, str] = {"relayd": "info", "relayd-warn": "warning"}
# The plainest aiohttp pass-through on uvloop (bench/floor.py): the ceiling.
FLOOR = "aiohttp"
# ``--every-floor``: spend limits on the bench key (rpm, tpm and a day budget, high
# enough never to refuse, so every request pays for one admission and one
# settlement), next to OAuth (a public url), metrics and the access log at info.
EVERY_FLOOR_LIMITS = """
[spend.keys.bench]
rpm = 100000000
tpm = 100000000000
usd_per_day = 100000.0
"""


@dataclass(frozen=True)
class Target:
    """Where load goes: a base URL, the credentials it wants, and whose RSS to watch."""

    name: str
    base_url: str
    headers: dict[str, str]
    server: Server | None = None  # None: nothing between the load and the fake

    def url(self, path: str) -> str:
        return self.base_url + path


def fake_argv(port: int, *extra: str) -> list[str]:
    """The fake upstream (tests/fakes/openai.py) on ``port``, as every bench runs it."""
    return [sys.executable, "-m", "tests.fakes.openai", "--port", str(port), *FAKE_COMMON, *extra]


def floor_argv(port: int, upstream: str) -> list[str]:
    """The aiohttp floor (bench/floor.py) on ``port`` in front of ``upstream``."""
    return [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", upstream]


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def _relayd_env(
    upstream_port: int, port: int, relay_key: str, level: str, workers: int | str = 1
) -> dict[str, str]:
    # Drop inherited relayd/OpenAI settings so a developer's shell cannot skew a run.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYD_", "OPENAI_"))}
    env.update(
        OPENAI_API_KEY=UPSTREAM_KEY,
        RELAYD_UPSTREAM=f"http://{HOST}:{upstream_port}",
        RELAYD_LISTEN=f"{HOST}:{port}",
        RELAYD_KEYS=f"bench:{relay_key}",
        RELAYD_LOG_LEVEL=level,
        RELAYD_WORKERS=str(workers),
        # State of its own (a ledger, grants), never the user's; gone when the run ends.
        RELAYD_STATE_DIR=_scratch_state(),
        PYTHONUNBUFFERED="1",
    )
    return env


def _scratch_state() -> str:
    path = tempfile.mkdtemp(prefix="relayd-bench-state-")
    atexit.register(shutil.rmtree, path, True)
    return path


def nginx_conf(tmp: Path, pairs: Sequence[tuple[int, int]]) -> str:
    """A pure streaming reverse proxy: one server block per (listen, upstream) pair."""
    blocks = []
    for index, (listen, upstream) in enumerate(pairs):
        blocks.append(f"""
    upstream fake{index} {{
        server {HOST}:{upstream};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{listen} backlog=4096;
        location = /v1/realtime {{
            proxy_pass http://fake{index};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{
            proxy_pass http://fake{index};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}""")
    return nginx_main(tmp, "".join(blocks))


def nginx_main(tmp: Path, servers: str) -> str:
    """nginx.conf around ``servers`` (upstream and server blocks): one worker, its
    files in ``tmp``, no access log, streaming proxies' temp paths."""
    temp = tmp / "nginx-temp"
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_max_body_size 0;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
    keepalive_requests 1000000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{servers}
}}
"""


@dataclass
class Stack:
    tmp: Path
    profiles: Sequence[str]
    use_nginx: bool = True
    use_floor: bool = False  # python -m bench turns it on (--no-floor); the soak does not
    relayd_workers: int | str = 1  # a count, or "auto" (one per CPU)
    every_floor: bool = False  # --every-floor: spend limits and OAuth on every relayd
    levels: Mapping[str, str] = field(default_factory=lambda: dict(RELAYD_LEVELS))
    relay_key: str = field(default_factory=lambda: secrets.token_hex(16))  # 32 chars
    servers: list[Server] = field(default_factory=list)
    targets: dict[str, dict[str, Target]] = field(default_factory=dict)
    fakes: dict[str, Server] = field(default_factory=dict)
    nginx_skipped: str | None = None

    def start(self) -> None:
        """Start everything, then wait (bounded) for every port; stop() undoes it."""
        upstream_auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
        relay_auth = {"Authorization": f"Bearer {self.relay_key}"}
        nginx_pairs: list[tuple[int, int]] = []
        for profile in self.profiles:
            fake_port = free_port()
            fake = self._spawn(
                f"fake-{profile}",
                fake_argv(fake_port, *PROFILES[profile]),
                fake_port,
            )
            self.fakes[profile] = fake
            targets = {"direct": Target("direct", f"http://{HOST}:{fake_port}", upstream_auth)}
            for name, level in self.levels.items():
                port = free_port()
                env = _relayd_env(fake_port, port, self.relay_key, level, self.relayd_workers)
                if self.every_floor:
                    env.update(self._every_floor_env(f"{name}-{profile}", port))
                relayd = self._spawn(
                    f"{name}-{profile}", [sys.executable, "-m", "relayd", "serve"], port, env=env
                )
                targets[name] = Target(name, f"http://{HOST}:{port}", relay_auth, relayd)
            if self.use_floor:  # like nginx, it forwards the client's key: the fake's
                port = free_port()
                floor = self._spawn(
                    f"{FLOOR}-{profile}",
                    floor_argv(port, f"http://{HOST}:{fake_port}"),
                    port,
                )
                targets[FLOOR] = Target(FLOOR, f"http://{HOST}:{port}", upstream_auth, floor)
            self.targets[profile] = targets
            nginx_pairs.append((free_port(), fake_port))
        if self.use_nginx:
            self._start_nginx(nginx_pairs, upstream_auth)
        for server in self.servers:
            server.wait_ready()

    def _every_floor_env(self, name: str, port: int) -> dict[str, str]:
        """Spend limits on the bench key, the SQLite ledger in a state directory of
        its own, and relayd's OAuth server (a loopback public url turns it on)."""
        # The paced fake's model "slow" gets a price (gpt-5's): a key with a budget is
        # refused an unpriced model (403 model_not_priced).
        prices = self.tmp / "every-floor-prices.toml"
        prices.write_text(
            '[models."slow"]\ninput = 1.25\noutput = 10.0\nsource = "bench"\nchecked = 2026-01-01\n'
        )
        config = self.tmp / "every-floor.toml"
        config.write_text(f'[spend]\nprices_file = "{prices}"\n{EVERY_FLOOR_LIMITS}')
        state = self.tmp / f"state-{name}"
        state.mkdir(exist_ok=True)
        return {
            "RELAYD_CONFIG": str(config),
            "RELAYD_STATE_DIR": str(state),
            "RELAYD_PUBLIC_URL": f"http://{HOST}:{port}",
        }

    def _start_nginx(self, pairs: list[tuple[int, int]], auth: dict[str, str]) -> None:
        binary = find_nginx()
        if binary is None:
            self.nginx_skipped = "nginx not found (apt-get install -y nginx-light): skipped"
            return
        self.tmp.chmod(0o755)  # nginx workers run as nobody when we are root
        conf = self.tmp / "nginx.conf"
        conf.write_text(nginx_conf(self.tmp, pairs))
        (self.tmp / "nginx-temp").mkdir(exist_ok=True)
        nginx = self._spawn(
            "nginx",
            [binary, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "nginx-error.log")],
            pairs[0][0],
        )
        for profile, (listen, _) in zip(self.profiles, pairs, strict=True):
            self.targets[profile]["nginx"] = Target("nginx", f"http://{HOST}:{listen}", auth, nginx)

    def _spawn(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None
    ) -> Server:
        log = self.tmp / f"{name}.log"
        server = start_server(name, argv, port=port, log=log, env=env, cwd=REPO)
        self.servers.append(server)
        return server

    def relayds(self) -> list[Server]:
        return [s for s in self.servers if s.name.startswith("relayd")]

    def floors(self) -> list[Server]:
        return [s for s in self.servers if s.name.startswith(f"{FLOOR}-")]

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
