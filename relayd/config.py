"""Settings: one frozen dataclass, loaded once from TOML, environment and secret files.

Precedence, lowest first: built-in defaults, the TOML file (``--config`` or
``RELAYD_CONFIG``), then the environment. The upstream key is taken from the first
of ``OPENAI_API_KEY``, ``OPENAI_API_KEY_FILE``, the systemd credential
``openai_api_key`` (``$CREDENTIALS_DIRECTORY``), ``[upstream] api_key_file`` and
``[upstream] api_key``. Relay keys are not overridden but collected: ``RELAYD_KEYS``,
plus one keys file (``RELAYD_KEYS_FILE``, else ``[auth] keys_file``, else the
credential ``relay_keys``), plus ``[[auth.keys]]``. Everything is validated here;
a problem raises :class:`ConfigError` with a message an operator can act on.

This module imports nothing of relayd (DESIGN: ``config.py`` is stdlib only).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = [
    "ConfigError",
    "Listen",
    "RelayKey",
    "Settings",
    "load_settings",
    "parse_keys_file",
    "parse_workers",
    "redacted",
]

MiB: Final = 1024 * 1024

# Path families that never pass the catch-all unless explicitly allowed (SPEC §3).
DEFAULT_DENY: Final = ("/v1/organization/*", "/v1/organization", "/v1/admin*")

# Where ChatGPT's file links (openaiFileIdRefs download_link) point: exact host
# names, no patterns. A wildcard can match hosts OpenAI does not control (anyone
# can register an Azure storage account called oaidalle<anything>), and a link
# there would make relayd fetch an attacker's file as if the user had sent it.
# ChatGPT's signed links use files.oaiusercontent.com; DALL-E's image URLs the
# oaidalleapiprodscus storage account. Operators may still list patterns.
DEFAULT_FETCH_HOSTS: Final = (
    "files.oaiusercontent.com",
    "files.openai.com",
    "oaidalleapiprodscus.blob.core.windows.net",
)

CREDENTIAL_UPSTREAM_KEY: Final = "openai_api_key"
CREDENTIAL_RELAY_KEYS: Final = "relay_keys"
CREDENTIAL_SIGNING_SECRET: Final = "actions_signing_secret"

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_PRINTABLE = re.compile(r"[!-~]")  # printable ASCII, space excluded
_SHA256SUM_STDIN = ("-", "*-")
MIN_KEY_CHARS: Final = 16
# OpenAI's ephemeral client secrets (relayd.auth.EPHEMERAL_PREFIX): the auth layer
# skips them when looking for a relay key, so a relay key like that would never match.
EPHEMERAL_KEY_PREFIX: Final = "ek_"
_KEY_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_COMMENT = re.compile(r"(?:^|\s)#")


class ConfigError(ValueError):
    """The configuration cannot be used; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class RelayKey:
    """A relay key as relayd keeps it: a name for logs and only a SHA-256 digest."""

    name: str
    digest: bytes
    scopes: frozenset[str] | None = None  # None: every route group
    # Made from the key itself, not from a digest: its source is a secret to guard.
    from_plaintext: bool = field(default=False, compare=False)

    def allows(self, group: str) -> bool:
        return self.scopes is None or group in self.scopes


@dataclass(frozen=True, slots=True)
class Listen:
    """Where relayd listens: ``host:port`` or ``unix:/path``."""

    host: str | None = "127.0.0.1"
    port: int | None = 8080
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_loopback(self) -> bool:
        if self.path is not None:
            return True  # a Unix socket is only reachable from this machine
        assert self.host is not None
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything relayd needs to run. Durations are seconds, sizes are bytes."""

    upstream_key: str = field(default="", repr=False)
    upstream_url: str = "https://api.openai.com"
    organization: str | None = None
    project: str | None = None

    listen: Listen = field(default_factory=Listen)
    public_url: str | None = None
    workers: int = 1
    drain_timeout_s: float = 30.0
    # Listen queue length; aiohttp's 128 overflows under a burst of new connections
    # (clients then wait 1, 3, 7 s for SYN retries). The kernel caps it at somaxconn.
    backlog: int = 4096

    keys: tuple[RelayKey, ...] = ()
    keys_file: str | None = None
    auth_disabled: bool = False
    key_header: str = "X-Relay-Key"
    # None: the routes the table marks public (SPEC §2). A list replaces that set.
    public_paths: tuple[str, ...] | None = None

    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 600.0
    idle_timeout_s: float = 300.0
    max_upstream_connections: int = 1024
    sse_keepalive_s: float | None = 15.0

    max_body_bytes: int = 520 * MiB  # 512 MiB OpenAI file limit plus multipart framing
    max_json_bytes: int = 32 * MiB  # bodies relayd itself parses (wrappers, :stream)
    max_header_bytes: int = 64 * 1024
    keepalive_timeout_s: float = 75.0
    # What relayd holds whole at once (JSON bodies it parses, unfinished WebSocket
    # messages), in all and per relay key; the process peaks at a small multiple
    # (parsing copies), well inside the unit's MemoryMax=512M (issue 11).
    max_buffered_bytes: int = 96 * MiB
    max_buffered_bytes_per_key: int = 64 * MiB
    # One key's share of max_upstream_connections; None: three quarters of them.
    max_upstream_connections_per_key: int | None = None

    policy_allow: tuple[str, ...] = ()
    policy_deny: tuple[str, ...] = DEFAULT_DENY

    relay_name: str = "relayd"
    environment: str = "production"
    default_model: str = "gpt-5"
    tools_manifest: str | None = None
    ai_plugin: Mapping[str, Any] | None = None

    log_format: str = "console"
    log_level: str = "info"
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # Where each setting came from ("default", "file", "env NAME", "credential NAME",
    # "flag --NAME"), for check-config (issue 11).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    # [realtime]: every route under /v1/realtime (handlers/realtime.py applies it).
    realtime_enabled: bool = True
    realtime_allowed_models: tuple[str, ...] = ()  # empty: any model
    realtime_default_model: str = "gpt-realtime"
    # OpenAI caps one client event at 15 MiB (base64 audio in JSON); leave room.
    realtime_max_message_bytes: int = 16 * MiB
    realtime_idle_timeout_s: float = 600.0
    # OpenAI ends a session at 60 minutes with its own close; this is the backstop.
    realtime_max_session_s: float = 3900.0

    # [actions] (SPEC §3, §5): the ChatGPT GPT Actions surface.
    # operationIds offered in /openapi.actions.json (at most 30); None: relayd's default.
    actions_operations: tuple[str, ...] | None = None
    actions_auth: str = "bearer"  # the one security scheme: "bearer" or "header"
    # ChatGPT waits 45 s for an action and reads under 100,000 characters (notes A3).
    actions_answer_budget_s: float = 25.0
    actions_poll_interval_s: float = 1.0
    actions_max_answer_chars: int = 90_000
    actions_privacy_text: str | None = None
    actions_privacy_url: str | None = None
    # Fetching user file links (download_link, image_url): allowlist, caps, timeout.
    actions_fetch_hosts: tuple[str, ...] = DEFAULT_FETCH_HOSTS
    actions_fetch_https_only: bool = True
    actions_fetch_allow_private: bool = False  # tests on loopback only
    actions_fetch_ca_file: str | None = None
    actions_fetch_timeout_s: float = 10.0
    actions_max_file_bytes: int = 25 * MiB  # decoded base64 payloads and fetched files
    # Files handed back as openaiFileResponse: inline when small, else signed URLs.
    actions_inline_max_bytes: int = 32 * 1024  # 43,692 base64 characters
    actions_link_ttl_s: float = 300.0
    # HMAC key for those URLs; None: a random one per process (workers > 1 need one).
    actions_signing_secret: str | None = field(default=None, repr=False)
    actions_store_dir: str | None = None  # None: a private temporary directory
    actions_store_max_bytes: int = 256 * MiB
    # /v1/actions/videos/generations: the predecessor's allowed sets and size cap.
    actions_video_models: tuple[str, ...] = ("sora-2", "sora-2-pro")
    actions_video_sizes: tuple[str, ...] = ("720x1280", "1280x720", "1024x1792", "1792x1024")
    actions_video_seconds: tuple[int, ...] = (4, 8, 12)
    actions_video_max_bytes: int = 25 * MiB

    @property
    def upstream_connections_per_key(self) -> int:
        if self.max_upstream_connections_per_key is not None:
            return self.max_upstream_connections_per_key
        return max(1, self.max_upstream_connections * 3 // 4)

    @property
    def auth_required(self) -> bool:
        return not self.auth_disabled

    def with_keys(self, keys: tuple[RelayKey, ...]) -> Settings:
        return replace(self, keys=keys)


# --------------------------------------------------------------------------- loading


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream_key: bool = True,
    overrides: Mapping[str, Any] | None = None,
    route_groups: Collection[str] | None = None,
) -> Settings:
    """Load and validate settings.

    ``path`` wins over ``RELAYD_CONFIG``; without either, only the environment and
    defaults apply. ``require_upstream_key=False`` serves commands that never call
    upstream (``relayd openapi``) and ``check-config``, which then warns instead.
    ``overrides`` are command-line values by field name (``serve --workers``); they
    win over everything. ``route_groups``, the groups of the route table, makes an
    unknown scope name an error (this module cannot import the table itself).
    """
    env = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    warnings: list[str] = []

    def from_env(name: str, env_name: str) -> str | None:
        value = env.get(env_name) or None
        if value is not None:
            sources[name] = f"env {env_name}"
        return value

    path = path or env.get("RELAYD_CONFIG") or None
    doc: dict[str, Any] = _read_toml(Path(path)) if path else {}
    base = Path(path).parent if path else Path.cwd()

    server = _table(doc, "server")
    upstream = _table(doc, "upstream")
    auth = _table(doc, "auth")
    limits = _table(doc, "limits")
    policy = _table(doc, "policy")
    meta = _table(doc, "meta")
    logging_ = _table(doc, "logging")

    values: dict[str, Any] = {}

    # [upstream]
    values["upstream_url"] = from_env("upstream_url", "RELAYD_UPSTREAM") or _str(
        upstream, "url", "upstream"
    )
    values["organization"] = from_env("organization", "OPENAI_ORGANIZATION") or _str(
        upstream, "organization", "upstream"
    )
    values["project"] = from_env("project", "OPENAI_PROJECT") or _str(
        upstream, "project", "upstream"
    )
    values["upstream_key"], key_source = _upstream_key(env, upstream, base, warnings)
    if key_source:
        sources["upstream_key"] = key_source
    for name, key in (
        ("connect_timeout_s", "connect_timeout"),
        ("first_byte_timeout_s", "first_byte_timeout"),
        ("idle_timeout_s", "idle_timeout"),
    ):
        env_name = f"RELAYD_{key.upper()}"
        values[name] = _seconds(from_env(name, env_name), env_name) or _num(
            upstream, key, "upstream"
        )
    values["max_upstream_connections"] = _int(upstream, "max_connections", "upstream")
    keepalive = upstream.get("sse_keepalive")
    if keepalive is not None and keepalive != 0:
        values["sse_keepalive_s"] = _positive(keepalive, "[upstream] sse_keepalive")

    # [server]
    listen_text = from_env("listen", "RELAYD_LISTEN") or _str(server, "listen", "server")
    if listen_text:
        values["listen"] = parse_listen(listen_text)
    values["public_url"] = from_env("public_url", "RELAYD_PUBLIC_URL") or _str(
        server, "public_url", "server"
    )
    workers = from_env("workers", "RELAYD_WORKERS")
    if workers:
        values["workers"] = parse_workers(workers, "RELAYD_WORKERS")
    elif server.get("workers") is not None:
        values["workers"] = parse_workers(server["workers"], "[server] workers")
    values["drain_timeout_s"] = _num(server, "drain_timeout", "server")
    values["backlog"] = _int(server, "backlog", "server")

    # [auth]
    keys_file = from_env("keys_file", "RELAYD_KEYS_FILE") or _path(
        auth, "keys_file", "auth", base
    )
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if not keys_file and cred_dir and (Path(cred_dir) / CREDENTIAL_RELAY_KEYS).is_file():
        keys_file = str(Path(cred_dir) / CREDENTIAL_RELAY_KEYS)
        sources["keys_file"] = f"credential {CREDENTIAL_RELAY_KEYS}"
    values["keys_file"] = keys_file
    values["keys"] = _collect_keys(
        env.get("RELAYD_KEYS"), keys_file, auth.get("keys", []), warnings
    )
    sources["keys"] = ", ".join(
        origin
        for origin, present in (
            ("env RELAYD_KEYS", bool(env.get("RELAYD_KEYS"))),
            (sources.get("keys_file", "file"), bool(keys_file)),
            ("file", bool(auth.get("keys"))),
        )
        if present
    ) or "default"
    # A keys file of digests only is no secret; one with a key in it is (issue 11).
    if keys_file and (too_open := _too_open(Path(keys_file), "keys file")):
        if any(key.from_plaintext for key in parse_keys_file(keys_file)):
            warnings.append(too_open)
    values["auth_disabled"] = _bool(auth, "disabled", "auth")
    values["key_header"] = _str(auth, "header", "auth")
    public = auth.get("public_paths")
    if public is not None:
        values["public_paths"] = tuple(_str_list(public, "auth.public_paths"))

    # [limits]
    for name, key in (
        ("max_body_bytes", "max_body_bytes"),
        ("max_json_bytes", "max_json_bytes"),
        ("max_header_bytes", "max_header_bytes"),
    ):
        values[name] = _int(limits, key, "limits")
    values["keepalive_timeout_s"] = _num(limits, "keepalive_timeout", "limits")
    for name, table, section in (
        ("max_buffered_bytes", limits, "limits"),
        ("max_buffered_bytes_per_key", limits, "limits"),
        # Next to max_connections, where an operator looks for it.
        ("max_upstream_connections_per_key", upstream, "upstream"),
    ):
        env_name = f"RELAYD_{name.upper()}"
        key = "max_connections_per_key" if section == "upstream" else name
        text = env.get(env_name)
        values[name] = _int_text(text, env_name) if text else _int(table, key, section)

    # [policy]
    if "allow" in policy:
        values["policy_allow"] = tuple(_str_list(policy["allow"], "policy.allow"))
    if "deny" in policy:
        values["policy_deny"] = tuple(_str_list(policy["deny"], "policy.deny"))

    # [meta]
    values["relay_name"] = _str(meta, "name", "meta")
    values["environment"] = from_env("environment", "RELAYD_ENVIRONMENT") or _str(
        meta, "environment", "meta"
    )
    values["default_model"] = from_env("default_model", "RELAYD_DEFAULT_MODEL") or _str(
        meta, "default_model", "meta"
    )
    values["tools_manifest"] = from_env("tools_manifest", "RELAYD_TOOLS_MANIFEST") or _path(
        meta, "tools_manifest", "meta", base
    )
    plugin = meta.get("ai_plugin")
    if plugin is not None:
        if not isinstance(plugin, dict):
            raise ConfigError("[meta] ai_plugin must be a table")
        values["ai_plugin"] = plugin

    # [logging]
    values["log_format"] = from_env("log_format", "RELAYD_LOG_FORMAT") or _str(
        logging_, "format", "logging"
    )
    values["log_level"] = from_env("log_level", "RELAYD_LOG_LEVEL") or _str(
        logging_, "level", "logging"
    )

    # [realtime]
    realtime = _table(doc, "realtime")
    values["realtime_enabled"] = _bool(realtime, "enabled", "realtime")
    if "allowed_models" in realtime:
        values["realtime_allowed_models"] = tuple(
            _str_list(realtime["allowed_models"], "[realtime] allowed_models")
        )
    values["realtime_default_model"] = _str(realtime, "default_model", "realtime")
    values["realtime_max_message_bytes"] = _int(realtime, "max_message_bytes", "realtime")
    values["realtime_idle_timeout_s"] = _num(realtime, "idle_timeout", "realtime")
    values["realtime_max_session_s"] = _num(realtime, "max_session", "realtime")

    # [actions]
    values.update(_actions_values(_table(doc, "actions"), env, base, sources, warnings))
    if path and _holds_secrets(upstream, auth) and (
        too_open := _too_open(Path(path), "config file holding a key")
    ):
        warnings.append(too_open)

    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
            sources[name] = f"flag --{name.replace('_', '-')}"
    if keepalive == 0:
        sources["sse_keepalive_s"] = "file"
    for name in Settings.__dataclass_fields__:
        if name not in sources and name not in ("warnings", "sources"):
            # Not from the environment, a credential or a flag: the file set it, or
            # nothing did.
            sources[name] = "file" if values.get(name) is not None else "default"
    settings = Settings(**{k: v for k, v in values.items() if v is not None})
    if keepalive == 0:
        # None means "off" here, which the filter above would read as "unset".
        settings = replace(settings, sse_keepalive_s=None)
    validate(settings, require_upstream_key=require_upstream_key, route_groups=route_groups)
    warnings += _warnings(settings)
    return replace(settings, warnings=tuple(warnings), sources=sources)


def keyless_warning(settings: Settings, addresses: str) -> str | None:
    """The warning of keyless mode, naming the addresses served; ``serve`` says it once
    its sockets are bound (the real addresses), ``check-config`` with the configured
    one."""
    if settings.keys or settings.auth_disabled:
        return None
    return (
        "NO RELAY KEYS ARE CONFIGURED: relayd accepts requests without a key, only "
        f"for this machine (loopback Host and Origin), on {addresses}. Set RELAYD_KEYS "
        "or RELAYD_KEYS_FILE before exposing it."
    )


def _warnings(settings: Settings) -> list[str]:
    """What works but is probably not what the operator wants (issue 11). Keyless
    mode is said apart (:func:`keyless_warning`), with the addresses really served."""
    found = []
    if not settings.upstream_key:
        found.append(
            "no upstream key: `relayd serve` refuses to start without one; set "
            "OPENAI_API_KEY, OPENAI_API_KEY_FILE, or a systemd credential named "
            f"{CREDENTIAL_UPSTREAM_KEY!r}"
        )
    if settings.public_url is None:
        found.append(
            "no public URL (RELAYD_PUBLIC_URL, [server] public_url): the Actions document "
            "names no server, so ChatGPT cannot import it, and no download link can be "
            "handed out"
        )
    return found


def validate(
    settings: Settings,
    *,
    require_upstream_key: bool = True,
    route_groups: Collection[str] | None = None,
) -> None:
    """Raise ConfigError for settings that would be unsafe or cannot work."""
    if require_upstream_key and not settings.upstream_key:
        raise ConfigError(
            "no upstream key: set OPENAI_API_KEY, OPENAI_API_KEY_FILE, or a systemd "
            f"credential named {CREDENTIAL_UPSTREAM_KEY!r}"
        )
    if settings.upstream_key and any(c.isspace() for c in settings.upstream_key):
        raise ConfigError("the upstream key contains whitespace; check the key file")
    parts = urlsplit(settings.upstream_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"upstream url {settings.upstream_url!r} must be an absolute http(s) URL"
        )
    if parts.query or parts.fragment:
        raise ConfigError("upstream url must not carry a query or fragment")
    if parts.username is not None or parts.password is not None:
        # check-config and /health show the upstream url; credentials there would leak.
        raise ConfigError("upstream url must not carry credentials; use OPENAI_API_KEY")
    if settings.public_url is not None:
        public = urlsplit(settings.public_url)
        if public.scheme != "https" or not public.hostname:
            raise ConfigError(
                f"public url {settings.public_url!r} must be an https origin "
                "(ChatGPT only calls https servers)"
            )
    if settings.log_format not in ("console", "json"):
        raise ConfigError("log format must be 'console' or 'json'")
    if settings.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log level must be one of debug, info, warning, error")
    if settings.backlog < 1:
        raise ConfigError("[server] backlog must be at least 1")
    if settings.workers < 1:
        raise ConfigError("workers must be at least 1")
    if settings.workers > 1 and settings.listen.is_unix:
        raise ConfigError("several workers need a TCP listen address (SO_REUSEPORT)")
    if settings.max_upstream_connections < 1:
        raise ConfigError("upstream max_connections must be at least 1")
    for name in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name.removesuffix('_s')} must be a positive number of seconds")
    for name in (
        "max_body_bytes",
        "max_json_bytes",
        "max_header_bytes",
        "max_buffered_bytes",
        "max_buffered_bytes_per_key",
    ):
        if getattr(settings, name) < 1:
            raise ConfigError(f"[limits] {name} must be a positive number of bytes")
    _check_buffered(settings)
    _check_realtime(settings)
    _check_actions(settings)
    header = settings.key_header
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", header) or header.lower() in (
        "authorization",
        "host",
        "cookie",
    ):
        raise ConfigError(f"auth header {settings.key_header!r} is not a usable header name")
    names = [k.name for k in settings.keys]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"relay key names must be unique; repeated: {', '.join(dupes)}")
    if route_groups is not None:
        for key in settings.keys:
            unknown = sorted((key.scopes or frozenset()) - set(route_groups))
            if unknown:
                raise ConfigError(
                    f"relay key {key.name!r}: unknown scope {', '.join(map(repr, unknown))}; "
                    f"the route groups are: {', '.join(sorted(route_groups))}"
                )
    if not settings.keys and not settings.auth_disabled and not settings.listen.is_loopback:
        raise ConfigError(
            f"no relay keys are configured and relayd would listen on {settings.listen}, "
            "which is not a loopback address: set RELAYD_KEYS or RELAYD_KEYS_FILE, or set "
            "[auth] disabled = true if another layer authenticates every request"
        )
    if require_upstream_key and not settings.keys and not settings.auth_disabled and (
        settings.public_url
    ):
        # Issue 11, item 3: a relay published at a public origin cannot be keyless.
        # (Commands that never serve, such as printing the OpenAPI documents, may
        # name the public url of a relay whose keys live elsewhere.)
        raise ConfigError(
            f"public url {settings.public_url} is set but no relay keys are configured: "
            "a public relay needs keys (RELAYD_KEYS or RELAYD_KEYS_FILE), or "
            "[auth] disabled = true if another layer authenticates every request"
        )
    _check_proxy_loop(settings)


def _check_buffered(settings: Settings) -> None:
    """Every body and message a setting allows must fit the budgets whole, or it
    could never be read at all."""
    budget = min(settings.max_buffered_bytes, settings.max_buffered_bytes_per_key)
    for name, size in (
        ("max_json_bytes", settings.max_json_bytes),
        ("[realtime] max_message_bytes", settings.realtime_max_message_bytes),
    ):
        if size > budget:
            raise ConfigError(
                f"[limits] max_buffered_bytes and max_buffered_bytes_per_key must be at "
                f"least {name} ({size}); such a body could never be held whole"
            )
    per_key = settings.max_upstream_connections_per_key
    if per_key is not None and not 1 <= per_key <= settings.max_upstream_connections:
        raise ConfigError(
            "[upstream] max_connections_per_key must be from 1 to max_connections "
            f"({settings.max_upstream_connections})"
        )


def _check_realtime(settings: Settings) -> None:
    if settings.realtime_max_message_bytes < 1:
        raise ConfigError("[realtime] max_message_bytes must be a positive number of bytes")
    for name in ("realtime_idle_timeout_s", "realtime_max_session_s"):
        if getattr(settings, name) <= 0:
            key = name.removeprefix("realtime_").removesuffix("_s")
            raise ConfigError(f"[realtime] {key} must be a positive number of seconds")
    allowed = settings.realtime_allowed_models
    if allowed and settings.realtime_default_model not in allowed:
        raise ConfigError(
            f"[realtime] default_model {settings.realtime_default_model!r} is not in "
            "allowed_models; requests without a model would all be refused"
        )


def _actions_values(
    actions: Mapping[str, Any],
    env: Mapping[str, str],
    base: Path,
    sources: dict[str, str],
    warnings: list[str],
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "operations" in actions:
        values["actions_operations"] = tuple(
            _str_list(actions["operations"], "[actions] operations")
        )
    for name, key in (
        ("actions_auth", "auth"),
        ("actions_privacy_text", "privacy_text"),
        ("actions_privacy_url", "privacy_url"),
    ):
        values[name] = _str(actions, key, "actions")
    values["actions_store_dir"] = _path(actions, "store_dir", "actions", base)
    values["actions_fetch_ca_file"] = _path(actions, "fetch_ca_file", "actions", base)
    for name, key in (
        ("actions_answer_budget_s", "answer_budget"),
        ("actions_poll_interval_s", "poll_interval"),
        ("actions_fetch_timeout_s", "fetch_timeout"),
        ("actions_link_ttl_s", "link_ttl"),
    ):
        values[name] = _num(actions, key, "actions")
    for key in (
        "max_answer_chars",
        "max_file_bytes",
        "inline_max_bytes",
        "store_max_bytes",
        "video_max_bytes",
    ):
        values[f"actions_{key}"] = _int(actions, key, "actions")
    for key in ("fetch_https_only", "fetch_allow_private"):
        values[f"actions_{key}"] = _bool(actions, key, "actions")
    for key in ("fetch_hosts", "video_models", "video_sizes"):
        if key in actions:
            values[f"actions_{key}"] = tuple(_str_list(actions[key], f"[actions] {key}"))
    if "video_seconds" in actions:
        seconds = actions["video_seconds"]
        if not isinstance(seconds, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in seconds
        ):
            raise ConfigError("[actions] video_seconds must be a list of whole numbers")
        values["actions_video_seconds"] = tuple(seconds)
    secret_file = env.get("RELAYD_SIGNING_SECRET_FILE") or _path(
        actions, "signing_secret_file", "actions", base
    )
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if secret_file:
        values["actions_signing_secret"] = _read_secret(
            Path(secret_file), "signing secret file", warnings
        )
        if env.get("RELAYD_SIGNING_SECRET_FILE"):
            sources["actions_signing_secret"] = "env RELAYD_SIGNING_SECRET_FILE"
    elif cred_dir and (Path(cred_dir) / CREDENTIAL_SIGNING_SECRET).is_file():
        values["actions_signing_secret"] = _read_secret(
            Path(cred_dir) / CREDENTIAL_SIGNING_SECRET, "systemd credential", warnings
        )
        sources["actions_signing_secret"] = f"credential {CREDENTIAL_SIGNING_SECRET}"
    return values


def _check_actions(settings: Settings) -> None:
    operations = settings.actions_operations
    if operations is not None:
        if len(operations) > 30:
            # The GPT builder: "OpenAPI spec can have a maximum of 30 operations".
            raise ConfigError(
                f"[actions] operations lists {len(operations)}; a GPT action takes at most 30"
            )
        bad = [o for o in operations if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", o)]
        if bad:
            raise ConfigError(f"[actions] operations: {bad[0]!r} is not an operationId")
        if len(set(operations)) != len(operations):
            raise ConfigError("[actions] operations lists an operationId twice")
    if settings.actions_auth not in ("bearer", "header"):
        raise ConfigError("[actions] auth must be 'bearer' or 'header'")
    if not 0 < settings.actions_answer_budget_s <= 40:
        raise ConfigError(
            "[actions] answer_budget must be between 0 and 40 seconds "
            "(ChatGPT abandons an action after 45)"
        )
    if not 1000 <= settings.actions_max_answer_chars < 100_000:
        raise ConfigError(
            "[actions] max_answer_chars must be from 1000 to 99999 "
            "(ChatGPT refuses answers of 100,000 characters)"
        )
    if settings.actions_privacy_text and settings.actions_privacy_url:
        raise ConfigError("[actions] set privacy_text or privacy_url, not both")
    if settings.actions_privacy_url is not None:
        url = urlsplit(settings.actions_privacy_url)
        if url.scheme != "https" or not url.hostname:
            raise ConfigError("[actions] privacy_url must be an https URL")
    if not settings.actions_fetch_hosts or not all(settings.actions_fetch_hosts):
        raise ConfigError("[actions] fetch_hosts must list at least one host pattern")
    if not 10 * 1024 * 1024 >= settings.actions_inline_max_bytes >= 0:
        raise ConfigError("[actions] inline_max_bytes must be from 0 to 10485760 (10 MB)")
    for name in ("actions_max_file_bytes", "actions_store_max_bytes", "actions_video_max_bytes"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"[actions] {name.removeprefix('actions_')} must be positive")
    if settings.actions_link_ttl_s > 86400:
        raise ConfigError("[actions] link_ttl must be at most 86400 seconds")
    secret = settings.actions_signing_secret
    if secret is not None and len(secret) < 32:
        raise ConfigError("[actions] the signing secret must be at least 32 characters")
    for name in ("actions_video_models", "actions_video_sizes", "actions_video_seconds"):
        if not getattr(settings, name):
            raise ConfigError(f"[actions] {name.removeprefix('actions_')} must not be empty")


def _check_proxy_loop(settings: Settings) -> None:
    """Refuse an upstream that is relayd itself (the predecessor's "proxy loop" check)."""
    up = urlsplit(settings.upstream_url)
    up_port = up.port or (443 if up.scheme == "https" else 80)
    up_host = (up.hostname or "").lower()
    ours: list[tuple[str, int]] = []
    if not settings.listen.is_unix and settings.listen.host and settings.listen.port:
        host = settings.listen.host.lower()
        ours.append((host, settings.listen.port))
        if host in ("0.0.0.0", "::", ""):
            ours += [("127.0.0.1", settings.listen.port), ("localhost", settings.listen.port)]
        if host == "::":  # dual-stack on Linux: the IPv6 loopback reaches us too
            ours.append(("::1", settings.listen.port))
        if host in ("127.0.0.1", "::1"):
            ours.append(("localhost", settings.listen.port))
        if host == "localhost":
            ours += [("127.0.0.1", settings.listen.port), ("::1", settings.listen.port)]
    if settings.public_url:
        pub = urlsplit(settings.public_url)
        ours.append(((pub.hostname or "").lower(), pub.port or 443))
    if (up_host, up_port) in ours:
        raise ConfigError(
            f"upstream {settings.upstream_url} points back at relayd itself "
            f"({up_host}:{up_port}); requests would loop forever"
        )


# --------------------------------------------------------------------------- secrets


def _upstream_key(
    env: Mapping[str, str], upstream: Mapping[str, Any], base: Path, warnings: list[str]
) -> tuple[str | None, str | None]:
    """The upstream key and where it came from (None, None: nowhere)."""
    if env.get("OPENAI_API_KEY"):
        return env["OPENAI_API_KEY"].strip(), "env OPENAI_API_KEY"
    if env.get("OPENAI_API_KEY_FILE"):
        key = _read_secret(Path(env["OPENAI_API_KEY_FILE"]), "OPENAI_API_KEY_FILE", warnings)
        return key, "env OPENAI_API_KEY_FILE"
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / CREDENTIAL_UPSTREAM_KEY).is_file():
        key = _read_secret(
            Path(cred_dir) / CREDENTIAL_UPSTREAM_KEY, "systemd credential", warnings
        )
        return key, f"credential {CREDENTIAL_UPSTREAM_KEY}"
    key_file = _path(upstream, "api_key_file", "upstream", base)
    if key_file:
        return _read_secret(Path(key_file), "[upstream] api_key_file", warnings), "file"
    inline = _str(upstream, "api_key", "upstream")
    return inline, ("file" if inline else None)


def _read_secret(path: Path, origin: str, warnings: list[str]) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {origin} {str(path)!r}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"{origin} {str(path)!r} is empty")
    if too_open := _too_open(path, origin):
        warnings.append(too_open)
    return text


def _too_open(path: Path, what: str) -> str | None:
    """ssh's check for private key files: a secret's file must be its owner's alone.

    Only a warning (issue 11, item 7): refusing to start would take a running
    relay down over a file mode, and the operator reads the warning at start and
    in ``check-config``.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    rights = (("read", mode & 0o044), ("change", mode & 0o022), ("run", mode & 0o011))
    can = " and ".join(right for right, granted in rights if granted)
    return (
        f"permissions {mode:04o} for {what} {str(path)!r} are too open: users other "
        f"than its owner can {can} it. Run: chmod 600 {str(path)!r}"
    )


def _holds_secrets(upstream: Mapping[str, Any], auth: Mapping[str, Any]) -> bool:
    """The TOML file itself names the upstream key or a relay key (not a digest)."""
    keys = auth.get("keys")
    return bool(upstream.get("api_key")) or (
        isinstance(keys, list) and any(isinstance(k, dict) and "key" in k for k in keys)
    )


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _make_key(name: str, secret: str, scopes: frozenset[str] | None, origin: str) -> RelayKey:
    if not _KEY_NAME.match(name):
        raise ConfigError(f"{origin}: key name {name!r} may use letters, digits and _.@- only")
    if name == "sha256":
        # "sha256:<hex>" without a name would otherwise make the digest itself a valid key.
        raise ConfigError(f"{origin}: a hashed key needs a name: write name:sha256:<hex>")
    if secret.startswith("sha256:"):
        hexdigest = secret.removeprefix("sha256:")
        if not _HEX64.match(hexdigest):
            raise ConfigError(f"{origin}: key {name!r} has a malformed sha256 digest")
        return RelayKey(name, bytes.fromhex(hexdigest), scopes)
    if len(secret) < MIN_KEY_CHARS or not all(_PRINTABLE.match(c) for c in secret):
        raise ConfigError(
            f"{origin}: key {name!r} must be at least {MIN_KEY_CHARS} characters, printable "
            "ASCII with no spaces"
        )
    if _HEX64.match(secret):
        # Is it a digest pasted without its "sha256:" or a key that happens to be 64
        # hex digits? Guessing wrong locks the key holder out, or makes the digest
        # itself a key: refuse and ask (issue 11).
        raise ConfigError(
            f"{origin}: key {name!r} is 64 hex digits, which reads as a SHA-256 digest: "
            f"write {name}:sha256:<hex> for a digest; a key itself must not look like one"
        )
    if secret.startswith(EPHEMERAL_KEY_PREFIX):
        raise ConfigError(
            f"{origin}: key {name!r} starts with {EPHEMERAL_KEY_PREFIX!r}, the prefix of "
            "OpenAI's ephemeral client secrets, which relayd never takes for a relay key"
        )
    return RelayKey(name, hash_key(secret), scopes, from_plaintext=True)


def _parse_scopes(text: str, origin: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    if not scopes:
        raise ConfigError(f"{origin}: scopes= lists no route group")
    return scopes


def parse_keys_env(text: str) -> tuple[RelayKey, ...]:
    """``RELAYD_KEYS``: comma-separated ``key`` or ``name:key`` entries."""
    keys = []
    for index, item in enumerate(s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, secret = item.partition(":")
        if not sep:
            name, secret = f"key{index + 1}", item
        keys.append(_make_key(name, secret, None, "RELAYD_KEYS"))
    return tuple(keys)


def parse_keys_file(path: str) -> tuple[RelayKey, ...]:
    """One ``name:key`` or ``name:sha256:<hex>`` per line, optionally followed by
    ``scopes=group,group``; ``#`` starts a comment. ``name:<hex>  -``, the line
    ``printf %s KEY | sha256sum`` prints after ``name:``, is a digest too."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read keys file {path!r}: {exc.strerror}") from None
    keys = []
    for number, raw in enumerate(lines, 1):
        # A comment starts at a "#" that begins the line or follows a space, so a
        # key containing "#" is never silently cut short.
        line = _COMMENT.split(raw, maxsplit=1)[0].strip()
        if not line:
            continue
        origin = f"keys file {path}, line {number}"
        entry, *rest = line.split()
        name, sep, secret = entry.partition(":")
        if not sep or not secret:
            raise ConfigError(f"{origin}: expected name:key or name:sha256:<hex>")
        if rest and rest[0] in _SHA256SUM_STDIN:
            # sha256sum names its input after the digest; "-" (or "*-" in binary
            # mode) is standard input.
            if not _HEX64.match(secret):
                raise ConfigError(f"{origin}: key {name!r} has a malformed sha256 digest")
            secret, rest = f"sha256:{secret}", rest[1:]
        scopes = None
        for option in rest:
            label, _, value = option.partition("=")
            if label != "scopes":
                raise ConfigError(f"{origin}: unknown option {label!r} (only scopes=)")
            scopes = _parse_scopes(value, origin)
        keys.append(_make_key(name, secret, scopes, origin))
    return tuple(keys)


def _collect_keys(
    env_keys: str | None, keys_file: str | None, toml_keys: Any, warnings: list[str]
) -> tuple[RelayKey, ...]:
    keys: list[RelayKey] = []
    if env_keys:
        keys += parse_keys_env(env_keys)
    if keys_file:
        from_file = parse_keys_file(keys_file)
        if not from_file:
            warnings.append(
                f"keys file {keys_file} holds no key: every line is blank or a comment"
            )
        keys += from_file
    if not isinstance(toml_keys, list):
        raise ConfigError("[auth] keys must be an array of tables ([[auth.keys]])")
    for index, entry in enumerate(toml_keys, 1):
        origin = f"[[auth.keys]] #{index}"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{origin}: needs name and sha256 (or key)")
        if "sha256" in entry:
            secret = f"sha256:{entry['sha256']}"
        elif "key" in entry:
            secret = str(entry["key"])
        else:
            raise ConfigError(f"{origin}: needs sha256 = \"<hex>\" (or key)")
        scopes = None
        if "scopes" in entry:
            scopes = frozenset(_str_list(entry["scopes"], f"{origin}.scopes"))
            if not scopes:
                raise ConfigError(f"{origin}: scopes lists no route group")
        keys.append(_make_key(str(entry["name"]), secret, scopes, origin))
    return tuple(keys)


# --------------------------------------------------------------------------- helpers


def parse_listen(text: str) -> Listen:
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise ConfigError("listen unix: needs a socket path")
        return Listen(host=None, port=None, path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"listen {text!r} must be host:port or unix:/path")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen port {port} is out of range")
    host = host.strip("[]") or "0.0.0.0"
    return Listen(host=host, port=port)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings with every secret replaced, for ``check-config``."""
    out: dict[str, Any] = {}
    for name in settings.__dataclass_fields__:
        value = getattr(settings, name)
        if name == "upstream_key":
            value = "<set>" if value else "<missing>"
        elif name == "keys":
            value = [
                {"name": k.name, "scopes": "all" if k.scopes is None else sorted(k.scopes)}
                for k in value
            ]
        elif name == "actions_signing_secret":
            value = "<set>" if value else "<random per process>"
        elif isinstance(value, Listen):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def _table(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _str(table: Mapping[str, Any], key: str, section: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"[{section}] {key} must be a string")
    return value or None


def _path(table: Mapping[str, Any], key: str, section: str, base: Path) -> str | None:
    value = _str(table, key, section)
    return None if value is None else str(base / value)


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings")
    return list(value)


def _bool(table: Mapping[str, Any], key: str, section: str) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"[{section}] {key} must be true or false")
    return value


def _num(table: Mapping[str, Any], key: str, section: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"[{section}] {key} must be a number")
    return _positive(value, f"[{section}] {key}")


def _positive(value: Any, where: str) -> float:
    # TOML and float() both accept nan and inf; neither is a usable duration.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{where} must be a positive number")
    return float(value)


def _int(table: Mapping[str, Any], key: str, section: str) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"[{section}] {key} must be a whole number")
    return value


def parse_workers(value: Any, where: str) -> int:
    """A worker count: a whole number, or ``"auto"`` for one per CPU."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        return _int_text(value, where, "or 'auto'")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number or 'auto'")
    return value


def _int_text(text: str, name: str, alternative: str = "") -> int:
    try:
        return int(text)
    except ValueError:
        also = f" {alternative}" if alternative else ""
        raise ConfigError(f"{name} must be a whole number{also}, got {text!r}") from None


def _seconds(text: str | None, name: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {text!r}") from None
    return _positive(value, name)


def scopes_of(keys: Iterable[RelayKey]) -> set[str]:
    return {scope for key in keys if key.scopes for scope in key.scopes}
