"""systemd/README.md, followed word for word, gives a relayd that passes check-config.

The guide's shell blocks (the ```bash fences of its "Install" section, then in a
second test those of "Several cores" too) run, in order, in one bash process,
against a temporary root that stands in for a fresh machine:

- Paths under ``/etc/``, ``/opt/``, ``/var/lib/`` and ``/usr/local/`` are rewritten
  to the same paths under ``tmp_path / "root"`` (:data:`MAPPED_PREFIXES`); the
  skeleton a fresh Debian has (``/etc/systemd/system``, ``/opt``, ``/var/lib``,
  ``/usr/local/bin``) is created first. Nothing else is rewritten, so ``/dev/stdin``
  and relative paths (the guide runs from a relayd checkout) stay what they are.
- Commands that need a real systemd, root or a network are replaced by shell
  functions that only record their arguments: ``systemctl``, ``useradd``, and the
  venv/pip install (the test runs the relayd already installed here instead: the
  stub venv's ``bin/relayd`` is ``python -m relayd``). The recorded list must be
  exactly :data:`EXPECTED_SKIPPED`, so a guide that grows a step the test cannot run
  fails here rather than being skipped silently.
- stdin holds what the operator types: the upstream key.

Then the result is checked as systemd would use it: every file the unit names
(``Documentation=``, ``LoadCredential=``, ``ExecStart=``, its ``--config``) exists,
and the guide's own ``check-config`` step printed a config with one relay key, the
upstream key, the tools manifest, and no warning.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.fakes.openai import UPSTREAM_KEY
from tests.test_daemon import Relayd

REPO = Path(__file__).parent.parent
GUIDE = REPO / "systemd" / "README.md"
UNIT = REPO / "systemd" / "relayd.service"

MAPPED_PREFIXES = ("/etc/", "/opt/", "/var/lib/", "/usr/local/")
FRESH_MACHINE = ("etc/systemd/system", "opt", "var/lib", "usr/local/bin")
EXPECTED_SKIPPED = [
    "python3 -m venv /opt/relayd/venv",
    "/opt/relayd/venv/bin/pip install .",
    "systemctl daemon-reload",
    "systemctl enable --now relayd.service",
]
TYPED_UPSTREAM_KEY = "sk-guide-test-upstream-0123456789abcdef"

_PATH = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(p) for p in MAPPED_PREFIXES) + ")")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

# Runs before the guide's steps: the stand-ins for what needs systemd or a network.
_PRELUDE = r"""
set -euo pipefail
skip() { printf '%s\n' "$*" >> "$SKIPPED"; }
systemctl() { skip systemctl "$@"; }
useradd() { skip useradd "$@"; }
python3() {
    if [ "${1-}" = -m ] && [ "${2-}" = venv ]; then
        skip python3 "$@"
        mkdir -p "$3/bin"
        printf '#!/bin/sh\necho "$0 $*" >> "%s"\n' "$SKIPPED" > "$3/bin/pip"
        printf '#!/bin/sh\nexec "%s" -m relayd "$@"\n' "$PYTHON" > "$3/bin/relayd"
        chmod 0755 "$3/bin/pip" "$3/bin/relayd"
    else
        command python3 "$@"
    fi
}
"""


def section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match is not None, f"systemd/README.md has no '## {title}' section"
    return match.group(1)


def shell_blocks(text: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang in ("bash", "sh", "shell")]


def mapped(text: str, root: Path) -> str:
    return _PATH.sub(lambda m: f"{root}{m.group(1)}", text)


def unmapped(text: str, root: Path) -> str:
    return text.replace(str(root), "")


def unit_values(unit: str, name: str) -> list[str]:
    return re.findall(rf"^{name}=(.*)$", unit, re.M)


def _follow(root: Path, skipped: Path, blocks: list[str]) -> subprocess.CompletedProcess[str]:
    for directory in FRESH_MACHINE:
        (root / directory).mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "RELAYD_", "NOTIFY_", "LISTEN_", "WATCHDOG_"))
        and k not in ("CREDENTIALS_DIRECTORY", "JOURNAL_STREAM")
    }
    env.update(SKIPPED=str(skipped), PYTHON=sys.executable)
    script = _PRELUDE + "\n".join(mapped(block, root) for block in blocks)
    return subprocess.run(
        ["bash", "-c", script],
        cwd=REPO,
        env=env,
        input=TYPED_UPSTREAM_KEY + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )


def printed_documents(stdout: str) -> list[dict[str, Any]]:
    """The JSON documents the guide's check-config steps printed, in order."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    while at < len(stdout):
        if stdout[at].isspace():
            at += 1
            continue
        document, at = decoder.raw_decode(stdout, at)
        documents.append(document)
    return documents


def test_install_steps_give_a_config_that_checks_clean(tmp_path: Path) -> None:
    root, skipped = tmp_path / "root", tmp_path / "skipped"
    blocks = shell_blocks(section(GUIDE.read_text(), "Install"))
    assert blocks, "the Install section has no ```bash block"
    result = _follow(root, skipped, blocks)
    assert result.returncode == 0, result.stderr
    assert unmapped(skipped.read_text(), root).splitlines() == EXPECTED_SKIPPED

    # The guide's check-config step printed the effective settings, and nothing else.
    [settings] = printed_documents(result.stdout)
    assert [k["name"] for k in settings["auth"]["keys"]] == ["team"]
    assert settings["upstream"]["api_key"] == "<set>"
    assert settings["meta"]["tools_manifest"] == f"{root}/etc/relayd/tools.json"
    assert settings["server"]["public_url"] and settings["server"]["public_url"].startswith(
        "https://"
    )
    assert not re.search(r"(?i)warn|error|cannot|no such", result.stderr), result.stderr
    assert TYPED_UPSTREAM_KEY not in result.stdout + result.stderr

    # The relay key is a real one, generated, in a file only root reads.
    keys = root / "etc/relayd/relay_keys"
    assert keys.stat().st_mode & 0o077 == 0
    [line] = [x for x in keys.read_text().splitlines() if x.strip() and not x.startswith("#")]
    name, _, secret = line.partition(":")
    assert name == "team" and len(secret) >= 32 and "example" not in secret
    upstream_key = root / "etc/relayd/openai_api_key"
    assert upstream_key.read_text().strip() == TYPED_UPSTREAM_KEY
    assert upstream_key.stat().st_mode & 0o077 == 0

    # Every file the installed unit names is where the unit looks for it.
    unit = (root / "etc/systemd/system/relayd.service").read_text()
    assert unit == UNIT.read_text()
    for doc in unit_values(unit, "Documentation")[0].split():
        if doc.startswith("file://"):
            assert (root / doc.removeprefix("file:///")).is_file(), doc
    for credential in unit_values(unit, "LoadCredential"):
        name, _, source = credential.partition(":")
        assert Path(mapped(source, root)).is_file(), credential
        # Named after its credential, so check-config with CREDENTIALS_DIRECTORY=/etc/relayd
        # sees exactly what the service sees.
        assert Path(source).name == name and Path(source).parent == Path("/etc/relayd")
    [exec_start] = unit_values(unit, "ExecStart")
    argv = shlex.split(mapped(exec_start, root))
    assert Path(argv[0]).is_file() and Path(argv[argv.index("--config") + 1]).is_file()


def test_several_cores_steps_share_one_signing_secret_and_store(tmp_path: Path) -> None:
    root, skipped = tmp_path / "root", tmp_path / "skipped"
    guide = GUIDE.read_text()
    blocks = shell_blocks(section(guide, "Install")) + shell_blocks(section(guide, "Several cores"))
    result = _follow(root, skipped, blocks)
    assert result.returncode == 0, result.stderr
    assert unmapped(skipped.read_text(), root).splitlines() == [
        *EXPECTED_SKIPPED,
        "systemctl daemon-reload",
        "systemctl restart relayd",
    ]
    settings = printed_documents(result.stdout)[-1]
    assert settings["server"]["workers"] == 2
    assert settings["actions"]["signing_secret_file"] == "<set>"
    # The store lives in the directory systemd makes writable for the service.
    [state] = unit_values(UNIT.read_text(), "StateDirectory")
    assert settings["actions"]["store_dir"] == f"{root}/var/lib/{state}/files"
    assert not re.search(r"(?i)warn|error|cannot|no such", result.stderr), result.stderr
    dropin = (root / "etc/systemd/system/relayd.service.d/workers.conf").read_text()
    [credential] = unit_values(dropin, "LoadCredential")
    name, _, source = credential.partition(":")
    assert name == "actions_signing_secret" and Path(source).name == name
    assert Path(source).is_file() and Path(source).stat().st_mode & 0o077 == 0


CREDENTIAL_KEY = "rk-canary-credential-key-000000000"
TOML_KEY = "rk-canary-toml-key-1111111111111111"
ROTATED_KEY = "rk-canary-rotated-key-22222222222222"


def _toml_key(name: str, secret: str) -> str:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return f'[[auth.keys]]\nname = "{name}"\nsha256 = "{digest}"\n'


@pytest.mark.process
async def test_reload_takes_keys_from_the_config_and_rereads_the_credential_copy(
    fake_server: TestServer, tmp_path: Path
) -> None:
    """The guide's rotation table, relayd's side: SIGHUP applies [[auth.keys]] edited in
    the config file and keeps the keys of the relay_keys credential, whose copy
    systemd made at start and does not refresh (hence a restart for those)."""
    credentials = tmp_path / "credentials"  # what LoadCredential= would have made
    credentials.mkdir()
    (credentials / "openai_api_key").write_text(UPSTREAM_KEY + "\n")
    (credentials / "relay_keys").write_text(f"cred:{CREDENTIAL_KEY}\n")
    config = tmp_path / "relayd.toml"
    config.write_text(_toml_key("toml", TOML_KEY))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "RELAYD_", "NOTIFY_", "LISTEN_", "WATCHDOG_"))
    }
    env.update(
        CREDENTIALS_DIRECTORY=str(credentials),
        RELAYD_UPSTREAM=str(fake_server.make_url("")).rstrip("/"),
        RELAYD_LISTEN="127.0.0.1:0",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "serve",
        "--config",
        str(config),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    relayd = Relayd(process)
    try:
        await relayd.wait_line("listening on")
        config.write_text(_toml_key("rotated", ROTATED_KEY))
        process.send_signal(signal.SIGHUP)
        line = await relayd.wait_line("reloaded")
        assert "added: rotated" in line and "removed: toml" in line
        async with aiohttp.ClientSession() as session:

            async def status(key: str) -> int:
                async with session.get(
                    relayd.url("/v1/models"), headers={"Authorization": f"Bearer {key}"}
                ) as response:
                    return response.status

            assert await status(ROTATED_KEY) == 200
            assert await status(TOML_KEY) == 401
            assert await status(CREDENTIAL_KEY) == 200
        assert await relayd.stop() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        relayd._reader.cancel()
    log = "\n".join(relayd.lines)
    for secret in (UPSTREAM_KEY, CREDENTIAL_KEY, TOML_KEY, ROTATED_KEY):
        assert secret not in log


def subsection(markdown: str, title: str) -> str:
    """The text of the ``### title`` subsection, up to the next heading of its level."""
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^##+ |\Z)", markdown, re.M | re.S)
    assert match is not None, f"systemd/README.md has no '### {title}' subsection"
    return match.group(1)


def test_own_tls_steps_install_a_renewal_hook_that_hands_relayd_the_pair(
    tmp_path: Path,
) -> None:
    """Issue 13: certbot's deploy hook copies the pair where relayd reads it, owned by
    relayd, the key private, then reloads; check-config takes the pair clean."""
    import trustme

    from tests.test_tls_config import write_pair

    root, skipped, issued = tmp_path / "root", tmp_path / "skipped", tmp_path / "issued"
    issued.mkdir()
    cert, key = write_pair(trustme.CA(), issued)
    # certbot stand-in: "issues" the throwaway CA's pair into its live directory;
    # the hook is a script of its own, so it finds a systemctl stand-in on PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text('#!/bin/sh\necho "systemctl $*" >> "$SKIPPED"\n')
    (bin_dir / "systemctl").chmod(0o755)
    stubs = f"""
export PATH="{bin_dir}:$PATH"
apt-get() {{ skip apt-get "$@"; }}
certbot() {{
    skip certbot "$@"
    while [ "$1" != -d ]; do shift; done
    install -d "/etc/letsencrypt/live/$2"
    cp {cert} "/etc/letsencrypt/live/$2/fullchain.pem"
    cp {key} "/etc/letsencrypt/live/$2/privkey.pem"
}}
"""
    guide = GUIDE.read_text()
    blocks = [
        *shell_blocks(section(guide, "Install")),
        stubs,
        *shell_blocks(subsection(guide, "relayd's own TLS")),
    ]
    result = _follow(root, skipped, blocks)
    assert result.returncode == 0, result.stderr
    assert unmapped(skipped.read_text(), root).splitlines() == [
        *EXPECTED_SKIPPED,
        "apt-get install -y certbot",
        "certbot certonly --standalone --non-interactive --agree-tos -m admin@example.com "
        "-d relay.example.com",
        "systemctl reload relayd",
        "systemctl daemon-reload",
        "systemctl stop relayd.service",
        "systemctl enable --now relayd.socket",
        "systemctl start relayd.service",
    ]
    settings = printed_documents(result.stdout)[-1]
    tls = root / "var/lib/relayd/tls"
    assert settings["server"]["tls_cert"] == f"{tls}/fullchain.pem"
    assert settings["server"]["public_url"] == "https://relay.example.com"
    assert not re.search(r"(?i)warn|error|cannot|no such", result.stderr), result.stderr
    assert (tls / "privkey.pem").read_bytes() == key.read_bytes()
    assert (tls / "privkey.pem").stat().st_mode & 0o077 == 0
    dropin = (root / "etc/systemd/system/relayd.service.d/tls.conf").read_text()
    assert f"RELAYD_TLS_KEY_FILE={tls}/privkey.pem" in dropin
    socket_dropin = (root / "etc/systemd/system/relayd.socket.d/https.conf").read_text()
    assert socket_dropin.splitlines()[-1] == "ListenStream=0.0.0.0:443"
