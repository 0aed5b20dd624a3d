"""The ``relayd`` command, run as a real process: check-config, openapi and serve.

Each test starts ``python -m relayd`` with a clean environment (no OPENAI_* or
RELAYD_* from the machine running the tests), bounds every wait, and kills what it
started if a wait runs out.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = "sk-cli-canary-upstream-a1b2c3d4e5f60718"
KEY_ENV = "rk-cli-canary-env-0123456789abcdef"
KEY_FILE = "rk-cli-canary-file-fedcba9876543210"
KEY_CRED = "rk-cli-canary-cred-00112233445566aa"
STARTUP_S = 15.0
STOP_S = 10.0
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def clean_env(**extra: str) -> dict[str, str]:
    """The test runner's environment minus anything relayd reads, plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENAI_", "RELAYD_"))
        and name not in ("CREDENTIALS_DIRECTORY", "JOURNAL_STREAM", "PYTHONWARNINGS")
    }
    env["PYTHONPATH"] = str(ROOT)  # the working tree, whatever is installed
    env.update(extra)
    return env


def relayd(
    *args: str, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- check-config


def test_check_config_prints_the_settings_with_every_secret_redacted(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "relay_keys").write_text(f"cred:{KEY_CRED} scopes=meta\n")
    key_file = tmp_path / "openai_api_key"
    key_file.write_text(UPSTREAM + "\n")
    env = clean_env(
        OPENAI_API_KEY_FILE=str(key_file),
        RELAYD_KEYS=f"env:{KEY_ENV}",
        CREDENTIALS_DIRECTORY=str(creds),
    )
    result = relayd("check-config", env=env)
    assert result.returncode == 0, result.stderr
    for secret in (UPSTREAM, KEY_ENV, KEY_CRED):
        assert secret not in result.stdout + result.stderr
    shown = json.loads(result.stdout)
    assert shown["upstream"]["api_key"] == "<set>"
    assert shown["auth"]["keys"] == [
        {"name": "env", "scopes": "all"},
        {"name": "cred", "scopes": ["meta"]},
    ]
    assert shown["server"]["listen"] == "127.0.0.1:8080"


def test_check_config_reads_the_file_given_with_config(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"filed:{KEY_FILE}\n")
    config = tmp_path / "relayd.toml"
    config.write_text(f'[auth]\nkeys_file = "{keys}"\n[meta]\nname = "from-toml"\n')
    env = clean_env(OPENAI_API_KEY=UPSTREAM)
    result = relayd("check-config", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert UPSTREAM not in result.stdout and KEY_FILE not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["meta"]["name"] == "from-toml"
    assert shown["auth"]["keys"] == [{"name": "filed", "scopes": "all"}]


def test_the_example_config_passes_check_config() -> None:
    env = clean_env(OPENAI_API_KEY=UPSTREAM)
    result = relayd("check-config", "--config", str(ROOT / "conf" / "relayd.toml"), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["meta"]["tools_manifest"] == str(ROOT / "conf" / "tools.json")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"RELAYD_LISTEN": "nowhere"}, "listen 'nowhere' must be host:port"),
        ({"RELAYD_KEYS": "team:short"}, "at least 16 characters"),
        ({"RELAYD_PUBLIC_URL": "http://relay.example.com"}, "must be an https origin"),
        ({"RELAYD_UPSTREAM": "http://127.0.0.1:8080"}, "points back at relayd itself"),
        ({"RELAYD_CONFIG": "/nonexistent/relayd.toml"}, "cannot read config file"),
        ({"RELAYD_TOOLS_MANIFEST": "/nonexistent/tools.json"}, "cannot read tools manifest"),
    ],
    ids=["listen", "short-key", "http-public-url", "loop", "no-file", "no-tools"],
)
def test_a_bad_config_exits_2_with_a_message_and_no_traceback(
    extra: dict[str, str], problem: str
) -> None:
    env = clean_env(OPENAI_API_KEY=UPSTREAM, **extra)
    result = relayd("check-config", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("relayd: configuration error: ")
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert UPSTREAM not in result.stderr


def test_check_config_validates_a_file_without_an_upstream_key_and_serve_refuses(
    tmp_path: Path,
) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text('[server]\npublic_url = "https://relay.example.com"\n')
    env = clean_env(RELAYD_KEYS=f"team:{KEY_ENV}")
    result = relayd("check-config", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["upstream"]["api_key"] == "<missing>"
    assert result.stderr.startswith("relayd: warning: no upstream key")
    assert len(result.stderr.splitlines()) == 1
    served = relayd("serve", "--config", str(config), env=env)
    assert served.returncode == 2
    assert "relayd: configuration error: no upstream key" in served.stderr


def test_check_config_warns_and_says_where_each_value_came_from(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# team:{KEY_FILE}\n")  # the example's way: every line commented
    config = tmp_path / "relayd.toml"
    config.write_text(f'[auth]\nkeys_file = "{keys}"\n[meta]\nname = "from-toml"\n')
    env = clean_env(OPENAI_API_KEY=UPSTREAM, RELAYD_LISTEN="127.0.0.1:9000")
    result = relayd("check-config", "--config", str(config), "--workers", "auto", env=env)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert all(line.startswith("relayd: warning: ") for line in warnings)
    assert any(f"keys file {keys} holds no key" in line for line in warnings)
    assert any("NO RELAY KEYS ARE CONFIGURED" in line for line in warnings)
    assert any("no public URL" in line for line in warnings)
    shown = json.loads(result.stdout)
    assert shown["server"]["workers"] == (os.cpu_count() or 1)
    assert shown["sources"]["server.workers"] == "flag --workers"
    assert shown["sources"]["server.listen"] == "env RELAYD_LISTEN"
    assert shown["sources"]["upstream.api_key"] == "env OPENAI_API_KEY"
    assert shown["sources"]["meta.name"] == shown["sources"]["auth.keys_file"] == "file"
    assert shown["sources"]["server.public_url"] == "default"
    assert UPSTREAM not in result.stdout + result.stderr
    assert KEY_FILE not in result.stdout + result.stderr


def test_check_config_refuses_an_unknown_scope_listing_the_valid_ones(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"bot:{KEY_FILE} scopes=response\n")
    env = clean_env(OPENAI_API_KEY=UPSTREAM, RELAYD_KEYS_FILE=str(keys))
    result = relayd("check-config", env=env)
    assert result.returncode == 2
    assert "relay key 'bot': unknown scope 'response'" in result.stderr
    assert "responses" in result.stderr and "metrics" in result.stderr


@pytest.mark.parametrize("problem", ["store-dir", "unix-dir"])
def test_check_config_tests_the_directories_serve_needs(tmp_path: Path, problem: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = clean_env(OPENAI_API_KEY=UPSTREAM)
    config = tmp_path / "relayd.toml"
    if problem == "store-dir":
        config.write_text(f'[actions]\nstore_dir = "{blocker}/files"\n')
        expected = f"{blocker} is not a directory"
    else:
        config.write_text(f'[server]\nlisten = "unix:{tmp_path}/run/relayd.sock"\n')
        expected = f"the directory {tmp_path}/run does not exist"
    result = relayd("check-config", "--config", str(config), env=env)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    if problem == "unix-dir":
        (tmp_path / "run").mkdir()
        assert relayd("check-config", "--config", str(config), env=env).returncode == 0


def test_a_unix_socket_another_process_serves_is_not_taken_over(tmp_path: Path) -> None:
    # asyncio deletes an existing socket file before it binds: without this check a
    # second relayd would silently take the address of a running server.
    path = tmp_path / "relayd.sock"
    with socket.socket(socket.AF_UNIX) as holder:
        holder.bind(str(path))
        holder.listen()
        env = clean_env(OPENAI_API_KEY=UPSTREAM, RELAYD_LISTEN=f"unix:{path}")
        result = relayd("serve", env=env)
        assert result.returncode == 2
        assert f"cannot listen on unix:{path}: {path} is already in use by" in result.stderr
        assert f"(pid {os.getpid()})" in result.stderr
        assert path.exists()
    # Once nothing answers there, the file is stale and serve may replace it.
    assert relayd("check-config", env=env).returncode == 0


def test_check_config_try_bind_finds_a_port_in_use() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = clean_env(OPENAI_API_KEY=UPSTREAM, RELAYD_LISTEN=f"127.0.0.1:{port}")
        assert relayd("check-config", env=env).returncode == 0  # the port is not tried
        result = relayd("check-config", "--try-bind", env=env)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert relayd("check-config", "--try-bind", env=env).returncode == 0  # free again


def test_bad_toml_exits_2_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[server\n")
    result = relayd("check-config", "--config", str(config), env=clean_env(OPENAI_API_KEY=UPSTREAM))
    assert result.returncode == 2
    assert "is not valid TOML" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- openapi


def _operation_ids(document: dict[str, Any]) -> list[str]:
    return [
        operation["operationId"]
        for item in document["paths"].values()
        for operation in item.values()
        if isinstance(operation, dict) and "operationId" in operation
    ]


@pytest.mark.parametrize("args", [(), ("--actions",)], ids=["full", "actions"])
def test_openapi_prints_a_3_1_document_with_unique_operation_ids(args: tuple[str, ...]) -> None:
    env = clean_env(RELAYD_PUBLIC_URL="https://relay.example.com")  # no upstream key needed
    result = relayd("openapi", *args, env=env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["openapi"] == "3.1.0"
    ids = _operation_ids(document)
    assert ids, "the document lists no operation"
    repeated = [name for name, count in collections.Counter(ids).items() if count > 1]
    assert repeated == []
    assert document["servers"] == [{"url": "https://relay.example.com"}]


def test_the_actions_document_is_a_subset_of_the_full_one() -> None:
    env = clean_env()
    full = json.loads(relayd("openapi", env=env).stdout)
    actions = json.loads(relayd("openapi", "--actions", env=env).stdout)
    assert set(_operation_ids(actions)) < set(_operation_ids(full))


# --------------------------------------------------------------------------- serve


class Relayd:
    """A ``relayd serve`` process and what it has said on stderr so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr: list[str] = []
        self.port = 0

    async def wait_ready(self, key: str | None = None) -> dict[str, Any]:
        """Read stderr up to the listening line, then GET /health (with ``key``, to
        see the detailed sections); its JSON body.

        The health answer matters beyond itself: relayd logs "listening" a moment
        before it installs its signal handlers, and a SIGTERM in that gap kills it
        with the default action. Once the loop has served a request, they are in.
        """
        assert self.process.stderr is not None
        async with asyncio.timeout(STARTUP_S):
            while not self.port:
                raw = await self.process.stderr.readline()
                if not raw:
                    raise AssertionError(f"relayd exited before listening: {self.output}")
                self.stderr.append(raw.decode())
                if match := LISTENING.search(self.stderr[-1]):
                    self.port = int(match.group(1))
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                url = f"http://127.0.0.1:{self.port}/health"
                async with http.get(url, headers=headers) as response:
                    assert response.status == 200
                    health: dict[str, Any] = await response.json()
        return health

    async def stop(self) -> int:
        """SIGTERM, then wait (bounded) for the exit code and the rest of stderr."""
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_S):
            _, rest = await self.process.communicate()
        self.stderr.append(rest.decode())
        assert self.process.returncode is not None
        return self.process.returncode

    @property
    def output(self) -> str:
        return "".join(self.stderr)


@asynccontextmanager
async def serving(env: dict[str, str]) -> AsyncIterator[Relayd]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "serve",
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    server = Relayd(process)
    try:
        yield server
    finally:
        if process.returncode is None:
            process.kill()
            async with asyncio.timeout(STOP_S):
                await process.wait()


async def test_serve_answers_health_and_exits_0_on_sigterm() -> None:
    env = clean_env(
        OPENAI_API_KEY=UPSTREAM, RELAYD_KEYS=f"team:{KEY_ENV}", RELAYD_LISTEN="127.0.0.1:0"
    )
    async with serving(env) as server:
        health = await server.wait_ready(KEY_ENV)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"http://127.0.0.1:{server.port}/v1/models") as response:
                assert response.status == 401  # a key is required off the public routes
        assert await server.stop() == 0
    assert health["object"] == "health" and health["status"] == "ok"
    assert health["relay"]["keys_configured"] == 1
    assert "NO RELAY KEYS" not in server.output
    for secret in (UPSTREAM, KEY_ENV):
        assert secret not in server.output + json.dumps(health)


async def test_serve_without_keys_on_loopback_warns_loudly() -> None:
    env = clean_env(OPENAI_API_KEY=UPSTREAM, RELAYD_LISTEN="127.0.0.1:0")
    async with serving(env) as server:
        health = await server.wait_ready()
        assert await server.stop() == 0
    assert health["relay"]["keys_configured"] == 0
    (warning,) = [line for line in server.output.splitlines() if "NO RELAY KEYS" in line]
    # The address really served (issue 11: not the configured one, here port 0).
    assert f"http://127.0.0.1:{server.port}" in warning and "RELAYD_KEYS" in warning


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_serve_refuses_a_public_address_without_keys(listen: str) -> None:
    result = relayd("serve", env=clean_env(OPENAI_API_KEY=UPSTREAM, RELAYD_LISTEN=listen))
    assert result.returncode == 2
    assert "no relay keys are configured" in result.stderr
    assert "not a loopback address" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr


# --------------------------------------------------------------------------- refusals (issue 12)


def _check_config_file(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "relayd.toml"
    config.write_text(text)
    return relayd("check-config", "--config", str(config), env=clean_env(OPENAI_API_KEY=UPSTREAM))


def test_check_config_passes_a_minimal_config(tmp_path: Path) -> None:
    result = _check_config_file(tmp_path, '[server]\nlisten = "127.0.0.1:8080"\n')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"]["listen"] == "127.0.0.1:8080"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "[upstrem]\nurl = 'https://api.openai.com'\n",
            "unknown table [upstrem]; did you mean [upstream]?",
        ),
        (
            "[upstream]\nidel_timeout = 5\n",
            "unknown key `idel_timeout` in [upstream]; did you mean `idle_timeout`?",
        ),
        (
            '[actions]\noperations = ["generateImageAktion"]\n',
            "[actions] operations: 'generateImageAktion' is not an operationId",
        ),
    ],
    ids=["unknown-table", "unknown-key", "unknown-actions-operation"],
)
def test_check_config_refuses_in_one_line(tmp_path: Path, text: str, problem: str) -> None:
    result = _check_config_file(tmp_path, text)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("relayd: configuration error: ") and problem in line


def test_a_relay_key_with_a_byte_that_is_not_utf8_is_one_config_error() -> None:
    # os.environ decodes such a byte as a lone surrogate (surrogateescape).
    env = clean_env(OPENAI_API_KEY=UPSTREAM, RELAYD_KEYS="team:rk-caf\udcff-0123456789abcdef")
    result = relayd("check-config", env=env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("relayd: configuration error: RELAYD_KEYS")
