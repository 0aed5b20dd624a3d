"""The settings: one frozen dataclass per TOML table, nested in :class:`Settings`.

Each field declares its TOML key and environment name once (:func:`setting`);
durations are seconds (``_s``), sizes bytes. ``None`` is a value of its own where
a setting can be off or derived; the comment on the field says which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from relayd.config.casts import Listen, parse_listen, parse_trusted_proxies, parse_workers
from relayd.config.fields import setting
from relayd.config.keys import RelayKey
from relayd.config.spend_limits import KeyLimits

__all__ = [
    "DEFAULT_DENY",
    "DEFAULT_CLIENT_DOCUMENTS",
    "DEFAULT_FETCH_HOSTS",
    "SECTIONS",
    "Actions",
    "Auth",
    "Limits",
    "Logging",
    "Mcp",
    "Meta",
    "OAuth",
    "Policy",
    "Realtime",
    "Server",
    "Settings",
    "Spend",
    "Store",
    "Upstream",
]

MiB: Final = 1024 * 1024

# Path families that never pass the catch-all unless explicitly allowed
# (docs/security.md#path-policy).
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


@dataclass(frozen=True, slots=True)
class Server:
    """[server]: where and how relayd listens."""

    listen: Listen = setting(factory=Listen, key="listen", env="RELAYD_LISTEN", parse=parse_listen)
    public_url: str | None = setting(None, key="public_url", env="RELAYD_PUBLIC_URL")
    workers: int = setting(1, key="workers", env="RELAYD_WORKERS", parse=parse_workers)
    drain_timeout_s: float = setting(30.0, key="drain_timeout")
    # Listen queue length; aiohttp's 128 overflows under a burst of new connections
    # (clients then wait 1, 3, 7 s for SYN retries). The kernel caps it at somaxconn.
    backlog: int = setting(4096, key="backlog")
    # relayd's own TLS (docs/security.md#own-tls): both or neither; None: plain http.
    # Also the systemd credentials tls_cert and tls_key (secrets.py).
    tls_cert: str | None = setting(None, key="tls_cert", env="RELAYD_TLS_CERT_FILE", path=True)
    tls_key: str | None = setting(None, key="tls_key", env="RELAYD_TLS_KEY_FILE", path=True)
    # How long a client may take over its TLS handshake before the connection is
    # closed; a stalled one would otherwise hold a socket for asyncio's 60 s.
    tls_handshake_timeout_s: float = setting(10.0, key="tls_handshake_timeout")
    # Front proxies whose X-Forwarded-For / Forwarded relayd believes for the client
    # address (docs/security.md#client-address); "unix" trusts Unix-socket peers.
    trusted_proxies: tuple[str, ...] = setting(
        (), key="trusted_proxies", env="RELAYD_TRUSTED_PROXIES", parse=parse_trusted_proxies
    )


@dataclass(frozen=True, slots=True)
class Upstream:
    """[upstream]: the OpenAI API, its key and the timeouts of the upstream leg."""

    url: str = setting("https://api.openai.com", key="url", env="RELAYD_UPSTREAM")
    api_key: str = setting("", key="api_key", also=("api_key_file",), special=True, repr=False)
    organization: str | None = setting(None, key="organization", env="OPENAI_ORGANIZATION")
    project: str | None = setting(None, key="project", env="OPENAI_PROJECT")
    connect_timeout_s: float = setting(10.0, key="connect_timeout", env="RELAYD_CONNECT_TIMEOUT")
    first_byte_timeout_s: float = setting(
        600.0, key="first_byte_timeout", env="RELAYD_FIRST_BYTE_TIMEOUT"
    )
    idle_timeout_s: float = setting(300.0, key="idle_timeout", env="RELAYD_IDLE_TIMEOUT")
    max_connections: int = setting(1024, key="max_connections")
    # One key's share of max_connections; None: three quarters of them.
    max_connections_per_key: int | None = setting(
        None, key="max_connections_per_key", env="RELAYD_MAX_UPSTREAM_CONNECTIONS_PER_KEY"
    )
    # None: off (sse_keepalive = 0), which is not the same as unset (the default).
    sse_keepalive_s: float | None = setting(15.0, key="sse_keepalive", off=0)

    @property
    def connections_per_key(self) -> int:
        if self.max_connections_per_key is not None:
            return self.max_connections_per_key
        return max(1, self.max_connections * 3 // 4)


@dataclass(frozen=True, slots=True)
class Auth:
    """[auth]: relay keys and the routes open without one."""

    disabled: bool = setting(False, key="disabled")
    header: str = setting("X-Relay-Key", key="header")
    keys_file: str | None = setting(None, key="keys_file", env="RELAYD_KEYS_FILE", path=True)
    # Collected from RELAYD_KEYS, the keys file and [[auth.keys]] (load.py).
    keys: tuple[RelayKey, ...] = setting((), key="keys", special=True)
    # None: the routes the table marks public (docs/security.md#public-routes);
    # a list replaces that set.
    public_paths: tuple[str, ...] | None = setting(None, key="public_paths")

    @property
    def required(self) -> bool:
        return not self.disabled


@dataclass(frozen=True, slots=True)
class Limits:
    """[limits]: sizes of what relayd reads and holds, and the keep-alive timer."""

    max_body_bytes: int = setting(520 * MiB, key="max_body_bytes")  # 512 MiB file + framing
    max_json_bytes: int = setting(32 * MiB, key="max_json_bytes")  # bodies relayd parses
    max_header_bytes: int = setting(64 * 1024, key="max_header_bytes")
    keepalive_timeout_s: float = setting(75.0, key="keepalive_timeout")
    # What relayd holds whole at once (JSON bodies it parses, unfinished WebSocket
    # messages), in all and per relay key; the process peaks at a small multiple
    # (parsing copies), well inside the unit's MemoryMax=512M (issue 11).
    max_buffered_bytes: int = setting(
        96 * MiB, key="max_buffered_bytes", env="RELAYD_MAX_BUFFERED_BYTES"
    )
    max_buffered_bytes_per_key: int = setting(
        64 * MiB, key="max_buffered_bytes_per_key", env="RELAYD_MAX_BUFFERED_BYTES_PER_KEY"
    )


@dataclass(frozen=True, slots=True)
class Policy:
    """[policy]: paths outside the route table (fnmatch patterns; deny wins)."""

    allow: tuple[str, ...] = setting((), key="allow")
    deny: tuple[str, ...] = setting(DEFAULT_DENY, key="deny")


@dataclass(frozen=True, slots=True)
class Meta:
    """[meta]: what relayd says about itself."""

    name: str = setting("relayd", key="name")
    environment: str = setting("production", key="environment", env="RELAYD_ENVIRONMENT")
    default_model: str = setting("gpt-5", key="default_model", env="RELAYD_DEFAULT_MODEL")
    tools_manifest: str | None = setting(
        None, key="tools_manifest", env="RELAYD_TOOLS_MANIFEST", path=True
    )
    ai_plugin: Mapping[str, Any] | None = setting(None, key="ai_plugin")


@dataclass(frozen=True, slots=True)
class Logging:
    """[logging]: one line per request."""

    format: str = setting("console", key="format", env="RELAYD_LOG_FORMAT")
    level: str = setting("info", key="level", env="RELAYD_LOG_LEVEL")


@dataclass(frozen=True, slots=True)
class Realtime:
    """[realtime]: every route under /v1/realtime (handlers/realtime.py applies it)."""

    enabled: bool = setting(True, key="enabled")
    allowed_models: tuple[str, ...] = setting((), key="allowed_models")  # empty: any model
    default_model: str = setting("gpt-realtime", key="default_model")
    # OpenAI caps one client event at 15 MiB (base64 audio in JSON); leave room.
    max_message_bytes: int = setting(16 * MiB, key="max_message_bytes")
    idle_timeout_s: float = setting(600.0, key="idle_timeout")
    # OpenAI ends a session at 60 minutes with its own close; this is the backstop.
    max_session_s: float = setting(3900.0, key="max_session")


@dataclass(frozen=True, slots=True)
class Actions:
    """[actions]: the ChatGPT GPT Actions surface."""

    # operationIds offered in /openapi.actions.json (at most 30); None: relayd's default.
    operations: tuple[str, ...] | None = setting(None, key="operations")
    auth: str = setting("bearer", key="auth")  # the one security scheme: "bearer" or "header"
    # ChatGPT waits 45 s for an action and reads under 100,000 characters
    # (docs/chatgpt.md#time-budget, docs/chatgpt.md#answer-size).
    answer_budget_s: float = setting(25.0, key="answer_budget")
    poll_interval_s: float = setting(1.0, key="poll_interval")
    max_answer_chars: int = setting(90_000, key="max_answer_chars")
    privacy_text: str | None = setting(None, key="privacy_text")
    privacy_url: str | None = setting(None, key="privacy_url")
    # Fetching user file links (download_link, image_url): allowlist, caps, timeout.
    fetch_hosts: tuple[str, ...] = setting(DEFAULT_FETCH_HOSTS, key="fetch_hosts")
    fetch_https_only: bool = setting(True, key="fetch_https_only")
    fetch_allow_private: bool = setting(False, key="fetch_allow_private")  # tests only
    fetch_ca_file: str | None = setting(None, key="fetch_ca_file", path=True)
    fetch_timeout_s: float = setting(10.0, key="fetch_timeout")
    max_file_bytes: int = setting(25 * MiB, key="max_file_bytes")  # base64 and fetched files
    # Files handed back as openaiFileResponse: inline when small, else signed URLs.
    inline_max_bytes: int = setting(32 * 1024, key="inline_max_bytes")  # 43,692 base64 chars
    link_ttl_s: float = setting(300.0, key="link_ttl")
    # HMAC key for those URLs; None: with [store] backend "local", one made once and
    # kept in the state directory (relayd.store.signing); "redis" refuses to start.
    signing_secret: str | None = setting(None, key="signing_secret_file", special=True, repr=False)
    store_dir: str | None = setting(None, key="store_dir", path=True)  # None: <state dir>/files
    store_max_bytes: int = setting(256 * MiB, key="store_max_bytes")
    # /v1/actions/videos/generations: the allowed sets and the reference image's cap.
    video_models: tuple[str, ...] = setting(("sora-2", "sora-2-pro"), key="video_models")
    video_sizes: tuple[str, ...] = setting(
        ("720x1280", "1280x720", "1024x1792", "1792x1024"), key="video_sizes"
    )
    video_seconds: tuple[int, ...] = setting((4, 8, 12), key="video_seconds")
    video_max_bytes: int = setting(25 * MiB, key="video_max_bytes")


@dataclass(frozen=True, slots=True)
class Store:
    """``[store]``: where state shared by workers and restarts lives (relayd/store/)."""

    backend: str = setting("local", key="backend")  # "local": SQLite and files under dir
    # None: systemd's StateDirectory ($STATE_DIRECTORY), else $XDG_STATE_HOME/relayd,
    # else ~/.local/state/relayd (relayd.store.state_dir).
    dir: str | None = setting(None, key="dir", env="RELAYD_STATE_DIR", path=True)
    # How long a write waits for another worker's transaction before giving up.
    busy_timeout_s: float = setting(2.0, key="busy_timeout")
    # backend = "redis": the server every instance shares (redis:// or rediss://;
    # Redis >= 7 or Valkey). It may carry a password, so it is never printed whole.
    redis_url: str | None = setting(None, key="redis_url", env="RELAYD_REDIS_URL", repr=False)
    # The first part of every key relayd writes, so several relays can share a server.
    redis_prefix: str = setting("relayd", key="redis_prefix", env="RELAYD_REDIS_PREFIX")
    # The deadline of every call to the shared store: past it the call fails
    # (and [spend] on_backend_error decides what the request gets).
    timeout_s: float = setting(0.5, key="timeout", env="RELAYD_STORE_TIMEOUT")
    # The server's password (AUTH), from [store] redis_password_file,
    # RELAYD_REDIS_PASSWORD_FILE or the systemd credential redis_password (secrets.py);
    # it wins over a password written in redis_url.
    redis_password: str | None = setting(None, key="redis_password_file", special=True, repr=False)
    # rediss://: the CA that signed the server's certificate, when it is a private one
    # (None: the system's trusted CAs).
    redis_ca_file: str | None = setting(
        None, key="redis_ca_file", env="RELAYD_REDIS_CA_FILE", path=True
    )


# Client ID metadata documents relayd fetches (docs/security.md#oauth): ChatGPT's
# stable document and its per-connector ones. A "*" stands for one path segment of
# letters, digits, "_" and "-", nothing more.
DEFAULT_CLIENT_DOCUMENTS: Final = (
    "https://chatgpt.com/oauth/client.json",
    "https://chatgpt.com/oauth/*/client.json",
)


@dataclass(frozen=True, slots=True)
class OAuth:
    """[oauth]: relayd as the OAuth 2.1 authorization server of its own relay keys."""

    # Dynamic client registration (POST /oauth/register, RFC 7591).
    registration: bool = setting(True, key="registration", env="RELAYD_OAUTH_REGISTRATION")
    # Which client ID metadata document URLs are trusted; empty: none.
    client_documents: tuple[str, ...] = setting(DEFAULT_CLIENT_DOCUMENTS, key="client_documents")
    client_document_timeout_s: float = setting(3.0, key="client_document_timeout")
    client_document_max_bytes: int = setting(64 * 1024, key="client_document_max_bytes")
    code_ttl_s: float = setting(60.0, key="code_ttl")
    access_token_ttl_s: float = setting(3600.0, key="access_token_ttl")
    refresh_token_ttl_s: float = setting(30 * 86400.0, key="refresh_token_ttl")
    # Wrong relay keys on the login page, per client address, within login_window.
    login_attempts: int = setting(10, key="login_attempts")
    login_window_s: float = setting(300.0, key="login_window")


@dataclass(frozen=True, slots=True)
class Mcp:
    """[mcp]: relayd as a remote MCP server, for ChatGPT apps and IDE agents."""

    # operationIds offered as tools; None: the same choice as [actions] operations.
    tools: tuple[str, ...] | None = setting(None, key="tools")
    # Origins a browser-borne request may come from besides RELAYD_PUBLIC_URL and
    # ChatGPT's (a request without Origin is always allowed).
    origins: tuple[str, ...] = setting((), key="origins")
    # ChatGPT abandons a tool call at about 60 s and may call again: answer within
    # this, or hand back what checks the work later.
    answer_budget_s: float = setting(25.0, key="answer_budget")
    # An identical call (same key, tool and arguments) within this window joins the
    # first one instead of starting a second paid upstream job.
    repeat_window_s: float = setting(120.0, key="repeat_window")
    # "json": every answer is application/json; "sse": tools/call answers as
    # text/event-stream (keepalive comments while the tool runs) when the client accepts it.
    call_answers: str = setting("json", key="call_answers")
    sse_keepalive_s: float = setting(15.0, key="sse_keepalive")
    max_body_bytes: int = setting(2 * MiB, key="max_body_bytes")
    # Images larger than this come back as a link only, not as image content too.
    max_image_bytes: int = setting(1 * MiB, key="max_image_bytes")
    # Hosts of ChatGPT apps' file links (openai/fileParams download_url), allowed on
    # top of [actions] fetch_hosts for MCP calls only; OpenAI's own domain.
    fetch_hosts: tuple[str, ...] = setting(("*.oaiusercontent.com",), key="fetch_hosts")


@dataclass(frozen=True, slots=True)
class Spend:
    """``[spend]``: per-key limits and budgets, reserve then settle (docs/spend.md).

    ``default`` (``[spend.default]``) applies to every key without a table of its own
    in ``keys`` (``[spend.keys.<key name>]``); both are read by
    :mod:`relayd.config.spend_limits` and re-read on SIGHUP.
    """

    # "store": the ledger lives where [store] backend says (local: SQLite under
    # [store] dir; redis: the shared server); "off": nothing metered, nothing
    # refused. "sqlite" is the old name of "store" with [store] backend = "local".
    backend: str = setting("store", key="backend", env="RELAYD_SPEND_BACKEND")
    # When the ledger cannot be reached: "closed" refuses (503), "open" lets requests
    # pass and spools their usage until it can.
    on_backend_error: str = setting("closed", key="on_backend_error")
    # Calendar days and months of the budgets are this zone's (IANA name).
    timezone: str = setting("UTC", key="timezone")
    # How long a reservation and its parallel slot outlive a process that died
    # holding them; live ones are extended while their request runs.
    reservation_ttl_s: float = setting(900.0, key="reservation_ttl")
    # Output tokens reserved for a request that names no cap (max_output_tokens,
    # max_completion_tokens, max_tokens) when its price row names no estimate.
    default_output_tokens: int = setting(4096, key="default_output_tokens")
    # A key with a dollar budget may call a model without a price (counted as $0).
    allow_unpriced: bool = setting(False, key="allow_unpriced")
    # The operator's price file, read over the shipped table (relayd/spend/prices.py).
    prices_file: str | None = setting(None, key="prices_file", path=True)
    default: KeyLimits = setting(factory=KeyLimits, key="default", special=True)
    keys: Mapping[str, KeyLimits] = setting(factory=dict, key="keys", special=True)

    def limits_for(self, key_name: str) -> KeyLimits:
        found = self.keys.get(key_name)
        return found if found is not None else self.default


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything relayd needs to run: one section per TOML table."""

    server: Server = field(default_factory=Server)
    upstream: Upstream = field(default_factory=Upstream)
    auth: Auth = field(default_factory=Auth)
    limits: Limits = field(default_factory=Limits)
    policy: Policy = field(default_factory=Policy)
    meta: Meta = field(default_factory=Meta)
    logging: Logging = field(default_factory=Logging)
    realtime: Realtime = field(default_factory=Realtime)
    actions: Actions = field(default_factory=Actions)
    store: Store = field(default_factory=Store)
    oauth: OAuth = field(default_factory=OAuth)
    mcp: Mcp = field(default_factory=Mcp)
    spend: Spend = field(default_factory=Spend)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # Where each setting came from, by "table.key" ("default", "file", "env NAME",
    # "credential NAME", "flag --NAME"), for check-config (issue 11).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


# The TOML tables, by name, and the section class each one fills.
SECTIONS: Final[Mapping[str, type[Any]]] = {
    item.name: item.type if not isinstance(item.type, str) else globals()[item.type]
    for item in fields(Settings)
    if item.name not in ("warnings", "sources")
}
