"""Config loading: TOML, environment, secret files and credentials, and validation.

Every test hands ``load_settings`` its own ``environ`` dict and writes files under
``tmp_path``: nothing here reads the real environment or the real /etc.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from relayd.app import load_tools
from relayd.cli import main
from relayd.config import (
    SECTIONS,
    ConfigError,
    Listen,
    Settings,
    declared,
    load_settings,
    parse_keys_file,
    redacted,
)
from relayd.routes import TABLE
from tests.conftest import RelayFactory
from tests.test_tls_config import write_pair

UPSTREAM = "sk-test-upstream-0123456789abcdef"
KEY_A = "rk-test-alpha-0123456789abcdef"
KEY_B = "rk-test-bravo-fedcba9876543210"
KEY_C = "rk-test-charlie-00112233445566"

CONF = Path(__file__).resolve().parent.parent / "conf"


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def load(
    environ: dict[str, str] | None = None, path: Path | None = None, **kwargs: Any
) -> Settings:
    """``load_settings`` with an upstream key and nothing from the real environment."""
    return load_settings(path, environ={"OPENAI_API_KEY": UPSTREAM, **(environ or {})}, **kwargs)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


TomlFile = Callable[[str], Path]


@pytest.fixture
def toml(tmp_path: Path) -> TomlFile:
    def make(text: str) -> Path:
        return write(tmp_path / "relayd.toml", text)

    return make


# --------------------------------------------------------------------------- defaults


def test_defaults_need_only_an_upstream_key() -> None:
    settings = load()
    assert settings.upstream.api_key == UPSTREAM
    assert settings.upstream.url == "https://api.openai.com"
    assert settings.server.listen == Listen("127.0.0.1", 8080)
    assert settings.auth.keys == ()
    assert settings.auth.required
    assert settings.server.public_url is None
    upstream = settings.upstream
    assert (upstream.connect_timeout_s, upstream.first_byte_timeout_s) == (10.0, 600.0)


def test_a_missing_upstream_key_is_an_error_naming_where_to_put_it() -> None:
    with pytest.raises(ConfigError, match="no upstream key") as caught:
        load_settings(environ={})
    message = str(caught.value)
    assert "OPENAI_API_KEY" in message and "openai_api_key" in message


def test_commands_that_never_call_upstream_load_without_a_key() -> None:
    assert load_settings(environ={}, require_upstream_key=False).upstream.api_key == ""


# --------------------------------------------------------------------------- TOML + env


FULL_TOML = """
[server]
listen = "127.0.0.2:9000"
public_url = "https://relay.example.com"
workers = 2
drain_timeout = 5

[upstream]
url = "http://127.0.0.1:7000"
organization = "org-toml"
project = "proj_toml"
connect_timeout = 1.5
first_byte_timeout = 20
idle_timeout = 30
max_connections = 8
sse_keepalive = 0

[auth]
header = "X-Team-Key"
public_paths = ["/health"]

[[auth.keys]]
name = "hashed"
sha256 = "{digest}"
scopes = ["files", "meta"]

[limits]
max_body_bytes = 1000
max_json_bytes = 100
max_header_bytes = 4096
keepalive_timeout = 4

[policy]
allow = ["/v1/fine_tuning/*"]
deny = ["/v1/admin*"]

[meta]
name = "team-relay"
environment = "staging"
default_model = "gpt-5-mini"

[meta.ai_plugin]
name_for_human = "Team relay"

[logging]
format = "json"
level = "debug"
"""


def test_every_toml_section_is_read(toml: TomlFile) -> None:
    settings = load(path=toml(FULL_TOML.replace("{digest}", sha256(KEY_A))))
    assert settings.server.listen == Listen("127.0.0.2", 9000)
    assert settings.server.public_url == "https://relay.example.com"
    assert (settings.server.workers, settings.server.drain_timeout_s) == (2, 5.0)
    assert settings.upstream.url == "http://127.0.0.1:7000"
    assert (settings.upstream.organization, settings.upstream.project) == ("org-toml", "proj_toml")
    assert settings.upstream.connect_timeout_s == 1.5
    upstream = settings.upstream
    assert (upstream.first_byte_timeout_s, upstream.idle_timeout_s) == (20.0, 30.0)
    assert settings.upstream.max_connections == 8
    assert settings.upstream.sse_keepalive_s is None  # 0 turns keepalives off
    assert settings.auth.header == "X-Team-Key"
    assert settings.auth.public_paths == ("/health",)
    [key] = settings.auth.keys
    assert (key.name, key.digest, key.scopes) == (
        "hashed",
        bytes.fromhex(sha256(KEY_A)),
        frozenset({"files", "meta"}),
    )
    assert (settings.limits.max_body_bytes, settings.limits.max_json_bytes) == (1000, 100)
    assert settings.limits.max_header_bytes == 4096
    assert settings.limits.keepalive_timeout_s == 4.0
    assert settings.policy.allow == ("/v1/fine_tuning/*",)
    assert settings.policy.deny == ("/v1/admin*",)
    assert (settings.meta.name, settings.meta.environment) == ("team-relay", "staging")
    assert settings.meta.default_model == "gpt-5-mini"
    assert settings.meta.ai_plugin == {"name_for_human": "Team relay"}
    assert (settings.logging.format, settings.logging.level) == ("json", "debug")


ENV_OVER_TOML = [
    (
        "RELAYD_UPSTREAM",
        "http://10.0.0.1:9",
        '[upstream]\nurl = "http://10.0.0.2:9"',
        "upstream.url",
        "http://10.0.0.1:9",
    ),
    (
        "RELAYD_LISTEN",
        "127.0.0.1:9001",
        '[server]\nlisten = "127.0.0.1:9002"',
        "server.listen",
        Listen("127.0.0.1", 9001),
    ),
    (
        "RELAYD_PUBLIC_URL",
        "https://env.example.com",
        # A public relay needs keys (issue 11).
        '[server]\npublic_url = "https://toml.example.com"\n'
        f'[[auth.keys]]\nname = "a"\nkey = "{KEY_A}"',
        "server.public_url",
        "https://env.example.com",
    ),
    ("RELAYD_WORKERS", "3", "[server]\nworkers = 2", "server.workers", 3),
    (
        "RELAYD_CONNECT_TIMEOUT",
        "2.5",
        "[upstream]\nconnect_timeout = 9",
        "upstream.connect_timeout_s",
        2.5,
    ),
    (
        "RELAYD_FIRST_BYTE_TIMEOUT",
        "45",
        "[upstream]\nfirst_byte_timeout = 9",
        "upstream.first_byte_timeout_s",
        45.0,
    ),
    (
        "RELAYD_IDLE_TIMEOUT",
        "0.25",
        "[upstream]\nidle_timeout = 9",
        "upstream.idle_timeout_s",
        0.25,
    ),
    (
        "OPENAI_ORGANIZATION",
        "org-env",
        '[upstream]\norganization = "org-toml"',
        "upstream.organization",
        "org-env",
    ),
    (
        "OPENAI_PROJECT",
        "proj_env",
        '[upstream]\nproject = "proj_toml"',
        "upstream.project",
        "proj_env",
    ),
    ("RELAYD_ENVIRONMENT", "dev", '[meta]\nenvironment = "prod"', "meta.environment", "dev"),
    (
        "RELAYD_DEFAULT_MODEL",
        "gpt-env",
        '[meta]\ndefault_model = "gpt-toml"',
        "meta.default_model",
        "gpt-env",
    ),
    ("RELAYD_LOG_FORMAT", "json", '[logging]\nformat = "console"', "logging.format", "json"),
    ("RELAYD_LOG_LEVEL", "warning", '[logging]\nlevel = "debug"', "logging.level", "warning"),
]


@pytest.mark.parametrize(
    ("env_name", "env_value", "toml_text", "attribute", "expected"),
    ENV_OVER_TOML,
    ids=[row[0] for row in ENV_OVER_TOML],
)
def test_the_environment_wins_over_the_toml_file(
    toml: TomlFile, env_name: str, env_value: str, toml_text: str, attribute: str, expected: Any
) -> None:
    path = toml(toml_text)
    read = operator.attrgetter(attribute)  # "section.field"
    assert read(load(path=path)) != expected
    assert read(load({env_name: env_value}, path=path)) == expected


def test_an_empty_environment_variable_falls_back_to_the_toml_file(toml: TomlFile) -> None:
    path = toml('[upstream]\nurl = "http://10.0.0.2:9"')
    assert load({"RELAYD_UPSTREAM": ""}, path=path).upstream.url == "http://10.0.0.2:9"


def test_relayd_config_names_the_file_and_an_explicit_path_wins(tmp_path: Path) -> None:
    from_env = write(tmp_path / "env.toml", '[meta]\nname = "from-env"')
    explicit = write(tmp_path / "explicit.toml", '[meta]\nname = "explicit"')
    assert load({"RELAYD_CONFIG": str(from_env)}).meta.name == "from-env"
    assert load({"RELAYD_CONFIG": str(from_env)}, path=explicit).meta.name == "explicit"


def test_relative_paths_in_the_toml_file_are_relative_to_it(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    write(conf / "keys", f"team:{KEY_A}\n")
    path = write(
        conf / "relayd.toml", '[auth]\nkeys_file = "keys"\n[meta]\ntools_manifest = "t.json"'
    )
    settings = load(path=path)
    assert settings.auth.keys_file == str(conf / "keys")
    assert settings.meta.tools_manifest == str(conf / "t.json")
    assert [k.name for k in settings.auth.keys] == ["team"]


# --------------------------------------------------------------------------- upstream key


def test_openai_api_key_is_taken_without_surrounding_whitespace() -> None:
    assert load({"OPENAI_API_KEY": f"  {UPSTREAM}\n"}).upstream.api_key == UPSTREAM


def test_openai_api_key_file_holds_the_key_alone(tmp_path: Path) -> None:
    key_file = write(tmp_path / "key", f"{UPSTREAM}\n")
    settings = load_settings(environ={"OPENAI_API_KEY_FILE": str(key_file)})
    assert settings.upstream.api_key == UPSTREAM


def test_an_unreadable_or_empty_key_file_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="cannot read OPENAI_API_KEY_FILE .*nope"):
        load_settings(environ={"OPENAI_API_KEY_FILE": str(missing)})
    empty = write(tmp_path / "empty", "\n")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY_FILE .*empty.* is empty"):
        load_settings(environ={"OPENAI_API_KEY_FILE": str(empty)})


def test_systemd_credentials_supply_the_upstream_and_relay_keys(tmp_path: Path) -> None:
    write(tmp_path / "openai_api_key", UPSTREAM + "\n")
    write(tmp_path / "relay_keys", f"team:{KEY_A}\nbot:sha256:{sha256(KEY_B)} scopes=meta\n")
    settings = load_settings(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert settings.upstream.api_key == UPSTREAM
    assert settings.auth.keys_file == str(tmp_path / "relay_keys")
    assert [(k.name, k.scopes) for k in settings.auth.keys] == [
        ("team", None),
        ("bot", frozenset({"meta"})),
    ]


def test_a_credentials_directory_without_relayd_files_is_ignored(tmp_path: Path) -> None:
    settings = load({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    auth = settings.auth
    assert (settings.upstream.api_key, auth.keys, auth.keys_file) == (UPSTREAM, (), None)


def test_upstream_key_sources_in_order_of_precedence(tmp_path: Path) -> None:
    """OPENAI_API_KEY, OPENAI_API_KEY_FILE, credential, [upstream] api_key_file, api_key."""
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "openai_api_key", "sk-from-credential")
    write(tmp_path / "toml-key", "sk-from-toml-file")
    write(tmp_path / "env-key", "sk-from-env-file")
    path = write(
        tmp_path / "relayd.toml",
        '[upstream]\napi_key_file = "toml-key"\napi_key = "sk-from-toml"',
    )
    env = {
        "OPENAI_API_KEY": "sk-from-env",
        "OPENAI_API_KEY_FILE": str(tmp_path / "env-key"),
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    seen = []
    for name in ("OPENAI_API_KEY", "OPENAI_API_KEY_FILE", "CREDENTIALS_DIRECTORY"):
        seen.append(load_settings(path, environ=env).upstream.api_key)
        del env[name]
    seen.append(load_settings(path, environ=env).upstream.api_key)
    (tmp_path / "toml-key").unlink()
    write(path, '[upstream]\napi_key = "sk-from-toml"')
    seen.append(load_settings(path, environ=env).upstream.api_key)
    assert seen == [
        "sk-from-env",
        "sk-from-env-file",
        "sk-from-credential",
        "sk-from-toml-file",
        "sk-from-toml",
    ]


def test_an_upstream_key_with_inner_whitespace_is_refused(tmp_path: Path) -> None:
    key_file = write(tmp_path / "key", "sk-one two\n")
    with pytest.raises(ConfigError, match="whitespace"):
        load_settings(environ={"OPENAI_API_KEY_FILE": str(key_file)})


# --------------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("text", "listen", "shown", "loopback"),
    [
        ("127.0.0.1:9000", Listen("127.0.0.1", 9000), "127.0.0.1:9000", True),
        ("localhost:8080", Listen("localhost", 8080), "localhost:8080", True),
        ("[::1]:8080", Listen("::1", 8080), "[::1]:8080", True),
        ("[::]:8080", Listen("::", 8080), "[::]:8080", False),
        ("0.0.0.0:80", Listen("0.0.0.0", 80), "0.0.0.0:80", False),
        ("127.0.0.1:0", Listen("127.0.0.1", 0), "127.0.0.1:0", True),
        (
            "unix:/run/relayd/relayd.sock",
            Listen(None, None, "/run/relayd/relayd.sock"),
            "unix:/run/relayd/relayd.sock",
            True,
        ),
    ],
)
def test_relayd_listen_forms(text: str, listen: Listen, shown: str, loopback: bool) -> None:
    settings = load({"RELAYD_LISTEN": text, "RELAYD_KEYS": KEY_A})
    assert settings.server.listen == listen
    assert str(settings.server.listen) == shown
    assert settings.server.listen.is_loopback is loopback
    assert settings.server.listen.is_unix is text.startswith("unix:")


@pytest.mark.parametrize(
    "text", ["8080", "127.0.0.1", "127.0.0.1:http", "[::1]", "unix:", "127.0.0.1:70000"]
)
def test_a_malformed_listen_address_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="listen"):
        load({"RELAYD_LISTEN": text})


# --------------------------------------------------------------------------- relay keys


def test_relayd_keys_without_names_are_numbered_in_order() -> None:
    settings = load({"RELAYD_KEYS": f"{KEY_A}, {KEY_B}"})
    assert [(k.name, k.digest.hex()) for k in settings.auth.keys] == [
        ("key1", sha256(KEY_A)),
        ("key2", sha256(KEY_B)),
    ]
    assert all(k.scopes is None for k in settings.auth.keys)


def test_relayd_keys_with_names() -> None:
    settings = load({"RELAYD_KEYS": f"team:{KEY_A},ci.bot@ops:{KEY_B}"})
    assert [(k.name, k.digest.hex()) for k in settings.auth.keys] == [
        ("team", sha256(KEY_A)),
        ("ci.bot@ops", sha256(KEY_B)),
    ]


def test_relayd_keys_may_name_a_digest() -> None:
    [key] = load({"RELAYD_KEYS": f"team:sha256:{sha256(KEY_A)}"}).auth.keys
    assert (key.name, key.digest) == ("team", bytes.fromhex(sha256(KEY_A)))


KEYS_FILE = f"""\
# relay keys for the team
team:{KEY_A}

bot:sha256:{sha256(KEY_B).upper()} scopes=meta,files   # rotated in June
  scraper:{KEY_C}  scopes=meta
hashy:{KEY_A}#not-a-comment
"""


def test_keys_file_entries_digests_scopes_and_comments(tmp_path: Path) -> None:
    path = write(tmp_path / "keys", KEYS_FILE)
    keys = parse_keys_file(str(path))
    assert [(k.name, k.digest.hex(), k.scopes) for k in keys] == [
        ("team", sha256(KEY_A), None),
        ("bot", sha256(KEY_B), frozenset({"meta", "files"})),
        ("scraper", sha256(KEY_C), frozenset({"meta"})),
        ("hashy", sha256(f"{KEY_A}#not-a-comment"), None),  # "#" inside a key is kept
    ]
    assert keys[1].allows("files") and not keys[1].allows("responses")
    assert keys[0].allows("responses")


def test_relayd_keys_file_is_read_and_wins_over_the_credential(tmp_path: Path) -> None:
    write(tmp_path / "relay_keys", f"from-credential:{KEY_A}\n")
    path = write(tmp_path / "keys", f"from-file:{KEY_B}\n")
    environ = {"RELAYD_KEYS_FILE": str(path), "CREDENTIALS_DIRECTORY": str(tmp_path)}
    settings = load(environ)
    assert [k.name for k in settings.auth.keys] == ["from-file"]
    assert settings.auth.keys_file == str(path)


def test_keys_from_every_source_are_combined(tmp_path: Path) -> None:
    keys_file = write(tmp_path / "keys", f"file:{KEY_B}\n")
    path = write(
        tmp_path / "relayd.toml",
        f'[[auth.keys]]\nname = "toml"\nsha256 = "{sha256(KEY_C)}"\n',
    )
    settings = load({"RELAYD_KEYS": f"env:{KEY_A}", "RELAYD_KEYS_FILE": str(keys_file)}, path)
    assert [k.name for k in settings.auth.keys] == ["env", "file", "toml"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("team:short", "at least 16 characters"),
        (f"team:sha256:{sha256(KEY_A)[:-1]}", "malformed sha256"),
        (f"team:sha256:{'g' * 64}", "malformed sha256"),
        (f"sha256:{sha256(KEY_A)}", "needs a name"),
        (f"{KEY_A}", "expected name:key"),
        ("team:", "expected name:key"),
        (f"te am:{KEY_A}", "expected name:key"),
        (f"t/eam:{KEY_A}", "key name 't/eam'"),
        (f"team:{KEY_A} scope=meta", "unknown option 'scope'"),
        (f"team:{KEY_A} scopes=", "scopes= lists no route group"),
        # 64 hex digits: a digest missing its "sha256:", or a key? Not guessed.
        (f"team:{sha256(KEY_A)}", "write team:sha256:<hex> for a digest"),
        (f"team:{'f' * 63}  -", "malformed sha256"),
        ("team:rk-caf\u00e9-0123456789abcdef", "printable ASCII with no spaces"),
        ("team:rk-del\x7f-0123456789abcdef", "printable ASCII"),
        ("team:ek_68af0123456789abcdef0123", "starts with 'ek_'"),
    ],
)
def test_a_bad_keys_file_line_is_refused_with_its_line_number(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = write(tmp_path / "keys", f"# header\nok:{KEY_B}\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load({"RELAYD_KEYS_FILE": str(path)})
    message = str(caught.value)
    assert problem in message
    assert f"{path}, line 3" in message


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("team:short-key", "at least 16 characters"),
        ("0123456789", "at least 16 characters"),
        (f"team:sha256:{'0' * 63}", "malformed sha256"),
        (f"sha256:{sha256(KEY_A)}", "needs a name"),
        (f"team:{KEY_A},team:{KEY_B}", "unique; repeated: team"),
    ],
)
def test_a_bad_relayd_keys_value_is_refused(value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load({"RELAYD_KEYS": value})


@pytest.mark.parametrize("marker", ["  -", " *-"], ids=["text-mode", "binary-mode"])
def test_sha256sum_output_pasted_after_the_name_is_a_digest(tmp_path: Path, marker: str) -> None:
    # printf %s "$KEY" | sha256sum  prints "<hex>  -"; pasted as is after "name:".
    path = write(
        tmp_path / "keys",
        f"team:{sha256(KEY_A)}{marker}\nbot:{sha256(KEY_B)}{marker}  scopes=meta  # June\n",
    )
    team, bot = parse_keys_file(str(path))
    assert (team.name, team.digest.hex(), team.scopes) == ("team", sha256(KEY_A), None)
    assert (bot.name, bot.digest.hex(), bot.scopes) == ("bot", sha256(KEY_B), frozenset({"meta"}))


def test_a_key_of_64_hex_digits_is_refused_from_every_source(toml: TomlFile) -> None:
    with pytest.raises(ConfigError, match="team:sha256:<hex>"):
        load({"RELAYD_KEYS": f"team:{sha256(KEY_A)}"})
    with pytest.raises(ConfigError, match="reads as a SHA-256 digest"):
        load(path=toml(f'[[auth.keys]]\nname = "t"\nkey = "{sha256(KEY_A)}"\n'))


def test_an_unknown_scope_is_refused_with_the_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "keys", f"ok:{KEY_A} scopes=files\nbot:{KEY_B} scopes=meta,file\n")
    with pytest.raises(ConfigError) as caught:
        load({"RELAYD_KEYS_FILE": str(path)}, route_groups=TABLE.groups)
    message = str(caught.value)
    assert "relay key 'bot': unknown scope 'file'" in message
    assert ", ".join(sorted(TABLE.groups)) in message
    assert {"files", "meta", "metrics", "proxy", "responses"} <= TABLE.groups


def test_the_example_scopes_are_route_groups() -> None:
    example = _switched_on((CONF / "keys.example").read_text())
    for match in re.finditer(r"(?m)^[A-Za-z].* scopes=(\S+)", example):
        assert set(match.group(1).split(",")) <= TABLE.groups
    for match in re.finditer(r"(?m)^#?scopes = (\[.*\])", (CONF / "relayd.toml").read_text()):
        assert set(json.loads(match.group(1))) <= TABLE.groups


def test_key_names_must_be_unique_across_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "keys", f"team:{KEY_B}\n")
    with pytest.raises(ConfigError, match="unique; repeated: team"):
        load({"RELAYD_KEYS": f"team:{KEY_A}", "RELAYD_KEYS_FILE": str(path)})


# --------------------------------------------------------------------------- secret files' modes


def secret_file(path: Path, text: str, mode: int) -> Path:
    write(path, text)
    path.chmod(mode)
    return path


def too_open(settings: Settings) -> tuple[str, ...]:
    """The secret-file warnings among a configuration's warnings."""
    return tuple(w for w in settings.warnings if "too open" in w)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_an_upstream_key_file_others_can_use_is_warned_about_like_ssh(
    tmp_path: Path, mode: int
) -> None:
    # Issue 11, item 7: secret files readable by others loaded silently.
    path = secret_file(tmp_path / "openai_api_key", UPSTREAM, mode)
    settings = load_settings(None, {"OPENAI_API_KEY_FILE": str(path)})
    (warning,) = too_open(settings)
    assert f"permissions {mode:04o}" in warning and str(path) in warning
    assert "too open" in warning and f"chmod 600 '{path}'" in warning
    assert UPSTREAM not in warning


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_secret_files_of_their_owner_alone_load_quietly(tmp_path: Path, mode: int) -> None:
    key = secret_file(tmp_path / "openai_api_key", UPSTREAM, mode)
    keys = secret_file(tmp_path / "relay_keys", f"team:{KEY_A}\n", mode)
    signing = secret_file(tmp_path / "signing", "s" * 40, mode)
    environ = {
        "OPENAI_API_KEY_FILE": str(key),
        "RELAYD_KEYS_FILE": str(keys),
        "RELAYD_SIGNING_SECRET_FILE": str(signing),
    }
    assert too_open(load_settings(None, environ)) == ()


def test_a_keys_file_is_secret_only_while_it_holds_a_key(tmp_path: Path) -> None:
    digests = secret_file(tmp_path / "keys", f"team:sha256:{sha256(KEY_A)}\n", 0o644)
    assert too_open(load({"RELAYD_KEYS_FILE": str(digests)})) == ()
    pasted = secret_file(tmp_path / "pasted", f"team:{sha256(KEY_A)}  -\n", 0o644)
    assert too_open(load({"RELAYD_KEYS_FILE": str(pasted)})) == ()  # sha256sum's output
    mixed = secret_file(
        tmp_path / "mixed", f"team:sha256:{sha256(KEY_A)}\n# ops\nops:{KEY_B}\n", 0o644
    )
    (warning,) = too_open(load({"RELAYD_KEYS_FILE": str(mixed)}))
    assert "keys file" in warning and str(mixed) in warning and KEY_B not in warning


def test_credentials_signing_secret_and_a_config_file_holding_keys_are_checked(
    tmp_path: Path,
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    secret_file(credentials / "openai_api_key", UPSTREAM, 0o644)
    secret_file(credentials / "actions_signing_secret", "s" * 40, 0o644)
    config = secret_file(
        tmp_path / "relayd.toml", f'[[auth.keys]]\nname = "team"\nkey = "{KEY_A}"\n', 0o644
    )
    settings = load_settings(config, {"CREDENTIALS_DIRECTORY": str(credentials)})
    named = sorted(Path(w.split("'")[1]).name for w in too_open(settings))
    assert named == ["actions_signing_secret", "openai_api_key", "relayd.toml"]
    # A config file with digests only is not secret, whatever its mode.
    config.write_text(f'[[auth.keys]]\nname = "team"\nsha256 = "{sha256(KEY_A)}"\n')
    assert too_open(load(path=config)) == ()


def test_check_config_prints_each_warning_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("RELAYD_CONFIG", "OPENAI_API_KEY", "RELAYD_KEYS", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    path = secret_file(tmp_path / "openai_api_key", UPSTREAM, 0o644)
    monkeypatch.setenv("OPENAI_API_KEY_FILE", str(path))
    assert main(["check-config"]) == 0
    err = capsys.readouterr().err
    assert f"relayd: warning: permissions 0644 for OPENAI_API_KEY_FILE '{path}'" in err
    assert UPSTREAM not in err


def test_a_missing_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read keys file .*absent"):
        load({"RELAYD_KEYS_FILE": str(tmp_path / "absent")})


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('sha256 = "abc"', "needs name and sha256"),
        ('name = "t"', 'needs sha256 = "<hex>"'),
        ('name = "t"\nsha256 = "xyz"', "malformed sha256"),
        ('name = "t"\nkey = "short"', "at least 16 characters"),
        (f'name = "t"\nsha256 = "{"a" * 64}"\nscopes = "meta"', "scopes must be a list"),
        (f'name = "t"\nsha256 = "{"a" * 64}"\nscopes = []', "scopes lists no route group"),
    ],
)
def test_a_bad_auth_keys_table_is_refused(toml: TomlFile, entry: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as caught:
        load(path=toml(f"[[auth.keys]]\n{entry}\n"))
    assert "[[auth.keys]] #1" in str(caught.value)


# --------------------------------------------------------------------------- safe default


def test_no_keys_on_a_public_address_refuses_to_start() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"RELAYD_LISTEN": "0.0.0.0:8080"})
    message = str(caught.value)
    assert "no relay keys are configured" in message
    assert "0.0.0.0:8080" in message and "not a loopback address" in message
    assert "RELAYD_KEYS" in message and "disabled = true" in message


@pytest.mark.parametrize("listen", ["[::]:8080", "192.0.2.10:8080", "relay.example.com:8080"])
def test_no_keys_on_any_non_loopback_address_refuses_to_start(listen: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        load({"RELAYD_LISTEN": listen})


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:8080", "127.8.9.10:8080", "[::1]:8080", "localhost:8080", "unix:/tmp/r.sock"],
)
def test_no_keys_on_loopback_is_allowed(listen: str) -> None:
    assert load({"RELAYD_LISTEN": listen}).auth.keys == ()


def test_auth_disabled_allows_a_public_address_without_keys(toml: TomlFile) -> None:
    settings = load({"RELAYD_LISTEN": "0.0.0.0:8080"}, toml("[auth]\ndisabled = true"))
    assert not settings.auth.required


def test_keys_allow_a_public_address() -> None:
    settings = load({"RELAYD_LISTEN": "0.0.0.0:8080", "RELAYD_KEYS": KEY_A})
    assert settings.server.listen.host == "0.0.0.0"


# --------------------------------------------------------------------------- proxy loop


@pytest.mark.parametrize(
    ("listen", "upstream"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("127.0.0.1:8080", "http://localhost:8080/"),
        ("127.0.0.1:8080", "http://LOCALHOST:8080"),
        ("localhost:8080", "http://127.0.0.1:8080"),
        ("localhost:8080", "http://[::1]:8080"),
        ("[::1]:8080", "http://localhost:8080"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("0.0.0.0:8080", "http://localhost:8080"),
        ("[::]:8080", "http://[::1]:8080"),
        ("127.0.0.1:80", "http://127.0.0.1"),
        ("127.0.0.1:443", "https://127.0.0.1/v1"),
    ],
)
def test_an_upstream_that_is_relayd_itself_is_refused(listen: str, upstream: str) -> None:
    environ = {"RELAYD_LISTEN": listen, "RELAYD_UPSTREAM": upstream, "RELAYD_KEYS": KEY_A}
    with pytest.raises(ConfigError, match="points back at relayd itself"):
        load(environ)


@pytest.mark.parametrize(
    ("public_url", "upstream"),
    [
        ("https://relay.example.com", "https://relay.example.com"),
        ("https://relay.example.com", "https://RELAY.example.com:443/v1"),
        ("https://relay.example.com:8443/", "https://relay.example.com:8443"),
    ],
)
def test_an_upstream_that_is_the_public_url_is_refused(public_url: str, upstream: str) -> None:
    environ = {"RELAYD_PUBLIC_URL": public_url, "RELAYD_UPSTREAM": upstream, "RELAYD_KEYS": KEY_A}
    with pytest.raises(ConfigError, match="points back at relayd itself"):
        load(environ)


@pytest.mark.parametrize(
    ("listen", "upstream"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8081"),
        ("127.0.0.1:0", "http://127.0.0.1:8080"),
        ("unix:/tmp/relayd.sock", "http://127.0.0.1:8080"),
        ("127.0.0.1:443", "https://api.openai.com"),
    ],
)
def test_an_upstream_elsewhere_is_not_a_loop(listen: str, upstream: str) -> None:
    settings = load({"RELAYD_LISTEN": listen, "RELAYD_UPSTREAM": upstream})
    assert settings.upstream.url == upstream


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    "name", ["RELAYD_CONNECT_TIMEOUT", "RELAYD_FIRST_BYTE_TIMEOUT", "RELAYD_IDLE_TIMEOUT"]
)
@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf", "1e999"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        load({name: value})


@pytest.mark.parametrize("value", ['"10s"', "0", "-5", "nan", "inf", "true"])
def test_a_toml_timeout_that_is_not_a_positive_number_is_refused(
    toml: TomlFile, value: str
) -> None:
    with pytest.raises(ConfigError, match=r"\[upstream\] idle_timeout must be a"):
        load(path=toml(f"[upstream]\nidle_timeout = {value}"))


# --------------------------------------------------------------------------- malformed input


def test_a_file_that_is_not_toml_is_refused_with_its_path(toml: TomlFile) -> None:
    path = toml("[server\nlisten = 127.0.0.1:8080")
    with pytest.raises(ConfigError, match="is not valid TOML") as caught:
        load(path=path)
    assert str(path) in str(caught.value)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*absent.toml"):
        load(path=tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("server = 5", "[server] must be a table"),
        # Unknown names, with the closest known one (issue 12).
        (
            "[upstrem]\nurl = 'https://api.openai.com'",
            "unknown table [upstrem]; did you mean [upstream]?",
        ),
        (
            "[upstream]\nidel_timeout = 5",
            "unknown key `idel_timeout` in [upstream]; did you mean `idle_timeout`?",
        ),
        ("[realtime]\nallowed_model = []", "did you mean `allowed_models`?"),
        ("[actions]\nsigning_secret = 'x'", "did you mean `signing_secret_file`?"),
        ("[nothing_alike]\nx = 1", "unknown table [nothing_alike]"),
        ("[meta]\nzzz = 1", "unknown key `zzz` in [meta]"),
        ("[server]\nlisten = 8080", "[server] listen must be a string"),
        ("[server]\nworkers = 1.5", "[server] workers must be a whole number"),
        ("[server]\nworkers = 0", "workers must be at least 1"),
        ('[server]\nworkers = 2\nlisten = "unix:/tmp/r.sock"', "several workers need a TCP"),
        ("[upstream]\nurl = 443", "[upstream] url must be a string"),
        ("[upstream]\nmax_connections = 0", "max_connections must be at least 1"),
        ("[upstream]\nsse_keepalive = -1", "[upstream] sse_keepalive must be a positive"),
        ('[auth]\ndisabled = "yes"', "[auth] disabled must be true or false"),
        ("[auth]\nkeys_file = 3", "[auth] keys_file must be a string"),
        ('[auth]\nkeys = "abc"', "[auth] keys must be an array of tables"),
        ('[auth]\npublic_paths = "/health"', "auth.public_paths must be a list of strings"),
        ('[auth]\nheader = "Authorization"', "is not a usable header name"),
        ('[auth]\nheader = "X Relay Key"', "is not a usable header name"),
        ('[limits]\nmax_body_bytes = "1MB"', "[limits] max_body_bytes must be a whole number"),
        ("[limits]\nmax_json_bytes = -1", "[limits] max_json_bytes must be a positive"),
        ("[limits]\nkeepalive_timeout = 0", "[limits] keepalive_timeout must be a positive"),
        ('[policy]\nallow = "/v1/x"', "policy.allow must be a list of strings"),
        ("[policy]\ndeny = [1]", "policy.deny must be a list of strings"),
        ("[meta]\nai_plugin = 3", "[meta] ai_plugin must be a table"),
        ("[meta]\ntools_manifest = false", "[meta] tools_manifest must be a string"),
        ('[logging]\nformat = "xml"', "log format must be 'console' or 'json'"),
        ('[logging]\nlevel = "loud"', "log level must be one of"),
    ],
)
def test_a_value_of_the_wrong_type_or_range_is_refused(
    toml: TomlFile, text: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load(path=toml(text))


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        ("api.openai.com", "must be an absolute http(s) URL"),
        ("ftp://api.openai.com", "must be an absolute http(s) URL"),
        ("https://", "must be an absolute http(s) URL"),
        ("https://api.openai.com/?x=1", "must not carry a query or fragment"),
        ("https://user:secret@api.openai.com", "must not carry credentials"),
    ],
)
def test_an_unusable_upstream_url_is_refused(upstream: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load({"RELAYD_UPSTREAM": upstream})


@pytest.mark.parametrize(
    "public_url", ["http://relay.example.com", "relay.example.com", "https://"]
)
def test_a_public_url_that_is_not_an_https_origin_is_refused(public_url: str) -> None:
    with pytest.raises(ConfigError, match="must be an https origin"):
        load({"RELAYD_PUBLIC_URL": public_url})


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8080", "http://localhost:8080"])
def test_an_http_public_url_is_allowed_on_loopback_only(origin: str) -> None:
    # Local testing: a loopback origin while relayd listens on loopback only.
    assert load({"RELAYD_PUBLIC_URL": origin}).server.public_url == origin
    keyed = {"RELAYD_KEYS": KEY_A, "RELAYD_PUBLIC_URL": origin, "RELAYD_LISTEN": "0.0.0.0:8080"}
    with pytest.raises(ConfigError, match="ChatGPT calls only https"):
        load(keyed)


def test_relayd_workers_must_be_a_whole_number() -> None:
    with pytest.raises(ConfigError, match="RELAYD_WORKERS must be a whole number or 'auto'"):
        load({"RELAYD_WORKERS": "two"})


def test_workers_auto_is_one_per_cpu_and_a_flag_wins(toml: TomlFile) -> None:
    cpus = os.cpu_count() or 1
    assert load({"RELAYD_WORKERS": "auto"}).server.workers == cpus
    path = toml('[server]\nworkers = "auto"\n')
    assert load(path=path).server.workers == cpus
    settings = load({"RELAYD_WORKERS": "3"}, path, overrides={"server.workers": 2})
    assert (settings.server.workers, settings.sources["server.workers"]) == (2, "flag --workers")


# --------------------------------------------------------------------------- warnings, sources


def test_warnings_name_what_works_but_probably_should_not(tmp_path: Path) -> None:
    commented = write(tmp_path / "keys", f"# team:{KEY_A}\n\n")
    settings = load_settings(
        environ={"RELAYD_KEYS_FILE": str(commented)}, require_upstream_key=False
    )
    text = "\n".join(settings.warnings)
    assert f"keys file {commented} holds no key" in text
    assert "no public URL" in text and "RELAYD_PUBLIC_URL" in text
    assert "ChatGPT calls only a public https origin" in text
    assert "no upstream key" in text and "OPENAI_API_KEY" in text
    assert KEY_A not in text
    complete = load({"RELAYD_KEYS": KEY_A, "RELAYD_PUBLIC_URL": "https://relay.example.com"})
    assert complete.warnings == ()


def test_sources_say_where_each_value_came_from(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "openai_api_key", UPSTREAM)
    write(creds / "relay_keys", f"cred:{KEY_B}\n")
    path = write(tmp_path / "relayd.toml", '[server]\nworkers = 2\n[meta]\nname = "t"\n')
    settings = load_settings(
        path,
        environ={
            "CREDENTIALS_DIRECTORY": str(creds),
            "RELAYD_KEYS": f"env:{KEY_A}",
            "RELAYD_LISTEN": "127.0.0.1:9000",
        },
    )
    sources = settings.sources
    assert sources["server.listen"] == "env RELAYD_LISTEN"
    assert sources["server.workers"] == sources["meta.name"] == "file"
    assert sources["upstream.api_key"] == "credential openai_api_key"
    assert sources["auth.keys"] == "env RELAYD_KEYS, credential relay_keys"
    assert sources["upstream.url"] == sources["server.public_url"] == "default"
    assert set(sources) == {f"{table}.{key}" for table, key in toml_keys() if key != "api_key_file"}


# --------------------------------------------------------------------------- redaction


def test_redacted_settings_never_contain_a_secret(tmp_path: Path) -> None:
    key_file = write(tmp_path / "openai", UPSTREAM)
    keys_file = write(tmp_path / "keys", f"file:{KEY_B} scopes=meta\n")
    path = write(
        tmp_path / "relayd.toml",
        f'[[auth.keys]]\nname = "toml"\nsha256 = "{sha256(KEY_C)}"\nscopes = ["files"]\n',
    )
    settings = load_settings(
        path,
        environ={
            "OPENAI_API_KEY_FILE": str(key_file),
            "RELAYD_KEYS": f"env:{KEY_A}",
            "RELAYD_KEYS_FILE": str(keys_file),
        },
    )
    shown = redacted(settings)
    text = json.dumps(shown, default=str)
    for secret in (UPSTREAM, KEY_A, KEY_B, KEY_C, sha256(KEY_A), sha256(KEY_B), sha256(KEY_C)):
        assert secret not in text
    assert UPSTREAM not in repr(settings)
    assert shown["upstream"]["api_key"] == "<set>"
    assert shown["auth"]["keys"] == [
        {"name": "env", "scopes": "all"},
        {"name": "file", "scopes": ["meta"]},
        {"name": "toml", "scopes": ["files"]},
    ]


def test_redacted_settings_say_when_the_upstream_key_is_missing() -> None:
    settings = load_settings(environ={}, require_upstream_key=False)
    assert redacted(settings)["upstream"]["api_key"] == "<missing>"


def test_redacted_settings_are_plain_json() -> None:
    shown = redacted(load({"RELAYD_LISTEN": "[::1]:8080"}))
    assert json.loads(json.dumps(shown)) == shown
    assert shown["server"]["listen"] == "[::1]:8080"
    assert set(shown) == {*SECTIONS, "warnings", "sources"}


# --------------------------------------------------------------------------- conf/ examples


def _switched_on(text: str) -> str:
    """The example with every optional setting (``#key = value`` lines) switched on."""
    return re.sub(r"(?m)^#(?=[A-Za-z_\[])", "", text)


def test_the_example_config_loads_with_safe_defaults() -> None:
    settings = load(path=CONF / "relayd.toml")
    assert settings.server.listen.is_loopback
    assert settings.auth.required
    assert settings.auth.keys == ()
    assert settings.upstream.url == "https://api.openai.com"
    assert settings.policy.deny == Settings().policy.deny
    assert settings.meta.tools_manifest == str(CONF / "tools.json")
    for name in (
        "upstream.connect_timeout_s",
        "upstream.first_byte_timeout_s",
        "upstream.idle_timeout_s",
        "server.workers",
        "limits.max_body_bytes",
        "limits.max_json_bytes",
        "limits.max_header_bytes",
        "limits.keepalive_timeout_s",
        "server.drain_timeout_s",
        "upstream.sse_keepalive_s",
        "upstream.max_connections",
        "auth.header",
        "meta.name",
        "meta.environment",
        "meta.default_model",
        "logging.format",
        "logging.level",
    ):
        read = operator.attrgetter(name)
        assert read(settings) == read(Settings()), name


def test_every_optional_setting_in_the_example_config_is_valid(tmp_path: Path) -> None:
    path = write(tmp_path / "relayd.toml", _switched_on((CONF / "relayd.toml").read_text()))
    keys_file = write(tmp_path / "keys", "")
    secret = write(tmp_path / "signing_secret", "s" * 32)  # the env wins over the example
    cert, key = write_pair(trustme.CA(), tmp_path)
    env = {"RELAYD_KEYS_FILE": str(keys_file), "RELAYD_SIGNING_SECRET_FILE": str(secret)}
    env |= {"RELAYD_TLS_CERT_FILE": str(cert), "RELAYD_TLS_KEY_FILE": str(key)}
    password = write(tmp_path / "redis_password", "pw-" + "r" * 20)
    env |= {"RELAYD_REDIS_PASSWORD_FILE": str(password), "RELAYD_REDIS_CA_FILE": str(cert)}
    env |= {"RELAYD_REDIS_URL": "rediss://redis.example:6380/0"}  # redis_ca_file needs TLS
    settings = load(env, path)
    assert settings.server.public_url == "https://relay.example.com"
    assert settings.upstream.organization and settings.upstream.project
    assert [(k.name, k.scopes) for k in settings.auth.keys] == [
        ("team", None),
        ("files-bot", frozenset({"files", "uploads"})),
    ]
    assert settings.auth.public_paths is not None and "/health" in settings.auth.public_paths
    assert settings.meta.ai_plugin is not None and "name_for_human" in settings.meta.ai_plugin


def toml_keys() -> set[tuple[str, str]]:
    """Every (table, key) load_settings reads, from the section dataclasses."""
    return {
        (table, key)
        for table, section in SECTIONS.items()
        for record in declared(section)
        for key in record.keys
    }


# Keys the example shows commented out only as an alternative it advises against.
NOT_IN_EXAMPLE = {("upstream", "api_key")}


def test_the_example_config_shows_every_toml_key() -> None:
    text = (CONF / "relayd.toml").read_text()
    document = tomllib.loads(_switched_on(text))
    shown = {(table, key) for table in document for key in document[table]}
    assert shown == toml_keys() - NOT_IN_EXAMPLE
    assert set(document["auth"]["keys"][1]) == {"name", "sha256", "scopes"}
    # [upstream] api_key is read too, but the example only mentions it, in prose.
    assert "`api_key = " in text


def test_the_keys_example_is_switched_off_and_valid_when_switched_on(tmp_path: Path) -> None:
    text = (CONF / "keys.example").read_text()
    assert parse_keys_file(str(CONF / "keys.example")) == ()  # published keys stay inert
    keys = parse_keys_file(str(write(tmp_path / "keys", _switched_on(text))))
    by_name = {k.name: k for k in keys}
    assert set(by_name) == {"team", "scraper", "reader", "files-bot"}
    # The documented digests really are those of the documented sample keys.
    assert by_name["scraper"].digest.hex() == sha256("rk-example-scraper-2b7e151628aed2a6")
    assert by_name["reader"].digest.hex() == sha256("rk-example-reader-5be0c9a1d7f24e83")
    assert by_name["scraper"].scopes == frozenset({"meta"})
    assert by_name["files-bot"].scopes == frozenset({"files", "uploads"})
    assert "printf %s" in text and "sha256sum" in text


def test_the_env_example_holds_only_non_secret_settings_that_load(tmp_path: Path) -> None:
    text = (CONF / "relayd.env.example").read_text()
    lines = _switched_on(text).splitlines()
    assignments = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))
    assert {"RELAYD_LISTEN", "RELAYD_UPSTREAM", "RELAYD_CONNECT_TIMEOUT"} <= set(assignments)
    for secret in ("OPENAI_API_KEY", "RELAYD_KEYS", "OPENAI_API_KEY_FILE", "RELAYD_KEYS_FILE"):
        assert secret not in assignments
    assignments.pop("RELAYD_CONFIG")  # names the file the operator installs
    settings = load({**assignments, "RELAYD_KEYS": KEY_A})  # keys come as a credential
    assert settings.server.public_url == "https://relay.example.com"
    assert "LoadCredential=openai_api_key" in text and "LoadCredential=relay_keys" in text


def test_the_tools_manifest_is_read_by_id() -> None:
    tools = load_tools(str(CONF / "tools.json"))
    assert list(tools) == ["web_search", "file_search"]
    for tool_id, tool in tools.items():
        assert tool["name"] == tool_id
        assert (tool["object"], tool["type"]) == ("tool", "function")
        assert tool["description"]
        schema = tool["parameters"]
        assert schema["type"] == "object" and "query" in schema["properties"]
        assert schema["required"] == ["query"]


async def test_relayd_serves_the_tools_manifest(
    relay_factory: RelayFactory, auth: dict[str, str]
) -> None:
    client = await relay_factory(meta={"tools_manifest": str(CONF / "tools.json")})
    manifest = json.loads((CONF / "tools.json").read_text())

    listing = await client.get("/v1/tools", headers=auth)
    assert listing.status == 200
    assert await listing.json() == manifest

    one = await client.get("/v1/tools/file_search", headers=auth)
    assert one.status == 200
    assert await one.json() == manifest["data"][1]

    missing = await client.get("/v1/tools/image_generation", headers=auth)
    assert missing.status == 404
    error = (await missing.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "tool_not_found"
    assert "image_generation" in error["message"]


async def test_the_tools_routes_need_a_relay_key(relay_factory: RelayFactory) -> None:
    client = await relay_factory(meta={"tools_manifest": str(CONF / "tools.json")})
    response = await client.get("/v1/tools")
    assert response.status == 401
    assert "error" in await response.json()


# --------------------------------------------------------------------------- sections (issue 12)


def test_unset_and_off_are_different(toml: TomlFile) -> None:
    unset = load(path=toml("[upstream]\n"))
    assert unset.upstream.sse_keepalive_s == 15.0
    assert unset.sources["upstream.sse_keepalive"] == "default"
    off = load(path=toml("[upstream]\nsse_keepalive = 0"))
    assert off.upstream.sse_keepalive_s is None
    assert off.sources["upstream.sse_keepalive"] == "file"


def test_the_key_file_and_the_key_ring_hash_alike() -> None:
    from relayd.auth import KeyRing
    from relayd.config import hash_key

    [key] = load({"RELAYD_KEYS": f"team:{KEY_A}"}).auth.keys
    assert key.digest == hash_key(KEY_A) == bytes.fromhex(sha256(KEY_A))
    assert KeyRing([key]).identify(KEY_A) == key
    # A presented key with bytes that are not UTF-8 is simply no match, never a crash.
    assert KeyRing([key]).identify("rk-caf\udcff-0123456789abcdef") is None
