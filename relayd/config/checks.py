"""Checks on loaded settings: what would be unsafe or cannot work is a ConfigError.

:func:`validate` runs inside ``load_settings``, so ``serve`` and ``check-config``
refuse the same things; what needs the route table (scope names, Actions
operations) gets the table's facts as arguments, since this package imports
nothing else of relayd.
"""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlsplit

from relayd.config.casts import ConfigError
from relayd.config.certs import expiry_warning, read_pair
from relayd.config.secrets import CREDENTIAL_UPSTREAM_KEY, too_open
from relayd.config.settings import Settings

__all__ = ["keyless_warning", "validate", "warnings_for"]


def keyless_warning(settings: Settings, addresses: str) -> str | None:
    """The warning of keyless mode, naming the addresses served; ``serve`` says it once
    its sockets are bound (the real addresses), ``check-config`` with the configured
    one."""
    if settings.auth.keys or settings.auth.disabled:
        return None
    return (
        "NO RELAY KEYS ARE CONFIGURED: relayd accepts requests without a key, only "
        f"for this machine (loopback Host and Origin), on {addresses}. Set RELAYD_KEYS "
        "or RELAYD_KEYS_FILE before exposing it."
    )


def warnings_for(settings: Settings) -> list[str]:
    """What works but is probably not what the operator wants (issue 11). Keyless
    mode is said apart (:func:`keyless_warning`), with the addresses really served."""
    found = []
    if not settings.upstream.api_key:
        found.append(
            "no upstream key: `relayd serve` refuses to start without one; set "
            "OPENAI_API_KEY, OPENAI_API_KEY_FILE, or a systemd credential named "
            f"{CREDENTIAL_UPSTREAM_KEY!r}"
        )
    if settings.server.public_url is None:
        found.append(
            "no public URL (RELAYD_PUBLIC_URL, [server] public_url): ChatGPT calls only a "
            "public https origin and relayd never guesses its own, so the Actions document "
            "names no server (ChatGPT cannot import it) and no download link can be handed "
            "out; set it to the https origin of relayd or its front proxy "
            "(systemd/README.md, Make it public)"
        )
    server = settings.server
    if server.tls_cert is not None and server.tls_key is not None:
        facts = read_pair(server.tls_cert, server.tls_key)  # validate() read it already
        key_open = too_open(Path(server.tls_key), "TLS key")
        found += [w for w in (expiry_warning(facts), key_open) if w]
    return found


def validate(
    settings: Settings,
    *,
    require_upstream_key: bool = True,
    route_groups: Collection[str] | None = None,
) -> None:
    """Raise ConfigError for settings that would be unsafe or cannot work."""
    if require_upstream_key and not settings.upstream.api_key:
        raise ConfigError(
            "no upstream key: set OPENAI_API_KEY, OPENAI_API_KEY_FILE, or a systemd "
            f"credential named {CREDENTIAL_UPSTREAM_KEY!r}"
        )
    if settings.upstream.api_key and any(c.isspace() for c in settings.upstream.api_key):
        raise ConfigError("the upstream key contains whitespace; check the key file")
    parts = urlsplit(settings.upstream.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"upstream url {settings.upstream.url!r} must be an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ConfigError("upstream url must not carry a query or fragment")
    if parts.username is not None or parts.password is not None:
        # check-config and /health show the upstream url; credentials there would leak.
        raise ConfigError("upstream url must not carry credentials; use OPENAI_API_KEY")
    if settings.server.public_url is not None:
        _check_public_url(settings)
    if settings.logging.format not in ("console", "json"):
        raise ConfigError("log format must be 'console' or 'json'")
    if settings.logging.level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log level must be one of debug, info, warning, error")
    if settings.server.backlog < 1:
        raise ConfigError("[server] backlog must be at least 1")
    if settings.server.workers < 1:
        raise ConfigError("workers must be at least 1")
    if settings.server.workers > 1 and settings.server.listen.is_unix:
        raise ConfigError("several workers need a TCP listen address (SO_REUSEPORT)")
    if settings.upstream.max_connections < 1:
        raise ConfigError("upstream max_connections must be at least 1")
    for name in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s"):
        if getattr(settings.upstream, name) <= 0:
            raise ConfigError(f"{name.removesuffix('_s')} must be a positive number of seconds")
    for name in (
        "max_body_bytes",
        "max_json_bytes",
        "max_header_bytes",
        "max_buffered_bytes",
        "max_buffered_bytes_per_key",
    ):
        if getattr(settings.limits, name) < 1:
            raise ConfigError(f"[limits] {name} must be a positive number of bytes")
    _check_tls(settings)
    _check_buffered(settings)
    _check_realtime(settings)
    _check_actions(settings)
    header = settings.auth.header
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", header) or header.lower() in (
        "authorization",
        "host",
        "cookie",
    ):
        raise ConfigError(f"auth header {settings.auth.header!r} is not a usable header name")
    names = [k.name for k in settings.auth.keys]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"relay key names must be unique; repeated: {', '.join(dupes)}")
    if route_groups is not None:
        for key in settings.auth.keys:
            unknown = sorted((key.scopes or frozenset()) - set(route_groups))
            if unknown:
                raise ConfigError(
                    f"relay key {key.name!r}: unknown scope {', '.join(map(repr, unknown))}; "
                    f"the route groups are: {', '.join(sorted(route_groups))}"
                )
    keyless = not settings.auth.keys and not settings.auth.disabled
    if keyless and not settings.server.listen.is_loopback:
        raise ConfigError(
            f"no relay keys are configured and relayd would listen on {settings.server.listen}, "
            "which is not a loopback address: set RELAYD_KEYS or RELAYD_KEYS_FILE, or set "
            "[auth] disabled = true if another layer authenticates every request"
        )
    if (
        require_upstream_key
        and not settings.auth.keys
        and not settings.auth.disabled
        and settings.server.public_url
        and urlsplit(settings.server.public_url).scheme == "https"
    ):
        # Issue 11, item 3: a relay published at a public origin cannot be keyless.
        # (An http origin is only ever a loopback one, for local testing.)
        # (Commands that never serve, such as printing the OpenAPI documents, may
        # name the public url of a relay whose keys live elsewhere.)
        raise ConfigError(
            f"public url {settings.server.public_url} is set but no relay keys are configured: "
            "a public relay needs keys (RELAYD_KEYS or RELAYD_KEYS_FILE), or "
            "[auth] disabled = true if another layer authenticates every request"
        )
    _check_proxy_loop(settings)
    _check_store(settings)
    _check_oauth(settings)
    _check_mcp(settings)
    _check_spend(settings)


def _check_public_url(settings: Settings) -> None:
    """An https origin: ChatGPT calls nothing else. An http origin on a loopback host
    is allowed while relayd itself listens on loopback only, for trying it out on one
    machine (docs/security.md#public-url)."""
    url = settings.server.public_url
    public = urlsplit(url or "")
    if not public.hostname or public.scheme not in ("https", "http"):
        raise ConfigError(
            f"public url {url!r} must be an https origin such as https://relay.example.com"
        )
    if public.scheme == "https":
        return
    if not (_is_loopback_host(public.hostname) and settings.server.listen.is_loopback):
        raise ConfigError(
            f"public url {url!r} must be an https origin: ChatGPT calls only https (an http "
            "origin is allowed only on a loopback host while relayd listens on loopback, "
            "for local testing)"
        )


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_tls(settings: Settings) -> None:
    """Both files or neither; then the pair itself (docs/security.md#own-tls)."""
    server = settings.server
    if (server.tls_cert is None) != (server.tls_key is None):
        given, missing = (
            ("tls_cert (RELAYD_TLS_CERT_FILE)", "tls_key (RELAYD_TLS_KEY_FILE)")
            if server.tls_cert is not None
            else ("tls_key (RELAYD_TLS_KEY_FILE)", "tls_cert (RELAYD_TLS_CERT_FILE)")
        )
        raise ConfigError(
            f"[server] {given} is set but {missing} is not: relayd's own TLS needs both "
            "the certificate and its key"
        )
    if server.tls_cert is not None and server.listen.is_unix:
        raise ConfigError(
            "[server] tls_cert is set but relayd listens on a Unix socket; a front on this "
            "machine connects there, and TLS belongs to that front"
        )
    if server.tls_handshake_timeout_s <= 0:
        raise ConfigError("[server] tls_handshake_timeout must be a positive number of seconds")
    if server.tls_cert is not None and server.tls_key is not None:
        read_pair(server.tls_cert, server.tls_key)


def _check_buffered(settings: Settings) -> None:
    """Every body and message a setting allows must fit the budgets whole, or it
    could never be read at all."""
    budget = min(settings.limits.max_buffered_bytes, settings.limits.max_buffered_bytes_per_key)
    for name, size in (
        ("max_json_bytes", settings.limits.max_json_bytes),
        ("[realtime] max_message_bytes", settings.realtime.max_message_bytes),
    ):
        if size > budget:
            raise ConfigError(
                f"[limits] max_buffered_bytes and max_buffered_bytes_per_key must be at "
                f"least {name} ({size}); such a body could never be held whole"
            )
    per_key = settings.upstream.max_connections_per_key
    if per_key is not None and not 1 <= per_key <= settings.upstream.max_connections:
        raise ConfigError(
            "[upstream] max_connections_per_key must be from 1 to max_connections "
            f"({settings.upstream.max_connections})"
        )


def _check_realtime(settings: Settings) -> None:
    if settings.realtime.max_message_bytes < 1:
        raise ConfigError("[realtime] max_message_bytes must be a positive number of bytes")
    for name in ("idle_timeout_s", "max_session_s"):
        if getattr(settings.realtime, name) <= 0:
            key = name.removesuffix("_s")
            raise ConfigError(f"[realtime] {key} must be a positive number of seconds")
    allowed = settings.realtime.allowed_models
    if allowed and settings.realtime.default_model not in allowed:
        raise ConfigError(
            f"[realtime] default_model {settings.realtime.default_model!r} is not in "
            "allowed_models; requests without a model would all be refused"
        )


def _check_actions(settings: Settings) -> None:
    operations = settings.actions.operations
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
    if settings.actions.auth not in ("bearer", "header"):
        raise ConfigError("[actions] auth must be 'bearer' or 'header'")
    if not 0 < settings.actions.answer_budget_s <= 40:
        raise ConfigError(
            "[actions] answer_budget must be between 0 and 40 seconds "
            "(ChatGPT abandons an action after 45)"
        )
    if not 1000 <= settings.actions.max_answer_chars < 100_000:
        raise ConfigError(
            "[actions] max_answer_chars must be from 1000 to 99999 "
            "(ChatGPT refuses answers of 100,000 characters)"
        )
    if settings.actions.privacy_text and settings.actions.privacy_url:
        raise ConfigError("[actions] set privacy_text or privacy_url, not both")
    if settings.actions.privacy_url is not None:
        url = urlsplit(settings.actions.privacy_url)
        if url.scheme != "https" or not url.hostname:
            raise ConfigError("[actions] privacy_url must be an https URL")
    if not settings.actions.fetch_hosts or not all(settings.actions.fetch_hosts):
        raise ConfigError("[actions] fetch_hosts must list at least one host pattern")
    if not 10 * 1024 * 1024 >= settings.actions.inline_max_bytes >= 0:
        raise ConfigError("[actions] inline_max_bytes must be from 0 to 10485760 (10 MB)")
    for name in ("max_file_bytes", "store_max_bytes", "video_max_bytes"):
        if getattr(settings.actions, name) < 1:
            raise ConfigError(f"[actions] {name} must be positive")
    if settings.actions.link_ttl_s > 86400:
        raise ConfigError("[actions] link_ttl must be at most 86400 seconds")
    secret = settings.actions.signing_secret
    if secret is not None and len(secret) < 32:
        raise ConfigError("[actions] the signing secret must be at least 32 characters")
    for name in ("video_models", "video_sizes", "video_seconds"):
        if not getattr(settings.actions, name):
            raise ConfigError(f"[actions] {name} must not be empty")


def _check_proxy_loop(settings: Settings) -> None:
    """Refuse an upstream that is relayd itself: every request would come back to it
    (docs/security.md#proxy-loop)."""
    up = urlsplit(settings.upstream.url)
    up_port = up.port or (443 if up.scheme == "https" else 80)
    up_host = (up.hostname or "").lower()
    ours: list[tuple[str, int]] = []
    listen = settings.server.listen
    if not listen.is_unix and listen.host and listen.port:
        host = listen.host.lower()
        ours.append((host, listen.port))
        if host in ("0.0.0.0", "::", ""):
            ours += [("127.0.0.1", listen.port), ("localhost", listen.port)]
        if host == "::":  # dual-stack on Linux: the IPv6 loopback reaches us too
            ours.append(("::1", listen.port))
        if host in ("127.0.0.1", "::1"):
            ours.append(("localhost", listen.port))
        if host == "localhost":
            ours += [("127.0.0.1", listen.port), ("::1", listen.port)]
    if settings.server.public_url:
        pub = urlsplit(settings.server.public_url)
        ours.append(((pub.hostname or "").lower(), pub.port or 443))
    if (up_host, up_port) in ours:
        raise ConfigError(
            f"upstream {settings.upstream.url} points back at relayd itself "
            f"({up_host}:{up_port}); requests would loop forever"
        )


def _check_store(settings: Settings) -> None:
    store = settings.store
    if store.backend not in ("local", "redis"):
        raise ConfigError(f"[store] backend must be 'local' or 'redis', not {store.backend!r}")
    if store.backend == "redis" and not store.redis_url:
        raise ConfigError("[store] backend = 'redis' needs redis_url (or RELAYD_REDIS_URL)")
    if store.redis_url and not store.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("[store] redis_url must start with redis://, rediss:// or unix://")
    if store.timeout_s <= 0:
        raise ConfigError("[store] timeout must be a positive number of seconds")
    if store.redis_ca_file is not None:
        if not (store.redis_url or "").startswith("rediss://"):
            raise ConfigError(
                "[store] redis_ca_file is set but redis_url is not a rediss:// (TLS) URL"
            )
        if not Path(store.redis_ca_file).is_file():
            raise ConfigError(f"[store] redis_ca_file {store.redis_ca_file!r} is not a file")
    if settings.store.busy_timeout_s <= 0:
        raise ConfigError("[store] busy_timeout must be a positive number of seconds")


def _check_oauth(settings: Settings) -> None:
    oauth = settings.oauth
    for name in (
        "client_document_timeout_s",
        "code_ttl_s",
        "access_token_ttl_s",
        "refresh_token_ttl_s",
        "login_window_s",
    ):
        if getattr(oauth, name) <= 0:
            key = name.removesuffix("_s")
            raise ConfigError(f"[oauth] {key} must be a positive number of seconds")
    if oauth.code_ttl_s > 600:
        # RFC 6749 §4.1.2: "A maximum authorization code lifetime of 10 minutes".
        raise ConfigError("[oauth] code_ttl must be at most 600 seconds (RFC 6749 4.1.2)")
    if oauth.client_document_max_bytes < 1024:
        raise ConfigError("[oauth] client_document_max_bytes must be at least 1024")
    if oauth.login_attempts < 1:
        raise ConfigError("[oauth] login_attempts must be at least 1")
    for pattern in oauth.client_documents:
        url = urlsplit(pattern)
        if url.scheme != "https" or not url.hostname or "*" in url.netloc:
            raise ConfigError(
                f"[oauth] client_documents: {pattern!r} must be an https URL with an exact "
                "host name ('*' only in the path)"
            )
        if url.query or url.fragment:
            raise ConfigError(f"[oauth] client_documents: {pattern!r} has a query or fragment")


def _check_mcp(settings: Settings) -> None:
    """[mcp]: its answers, timers, caps and origins (the tool names need the route
    table: checked when the application is built)."""
    mcp = settings.mcp
    if mcp.call_answers not in ("json", "sse"):
        raise ConfigError('[mcp] call_answers must be "json" or "sse"')
    if mcp.answer_budget_s <= 0 or mcp.sse_keepalive_s <= 0:
        raise ConfigError("[mcp] answer_budget and sse_keepalive must be positive seconds")
    if mcp.repeat_window_s < 0:
        raise ConfigError("[mcp] repeat_window must be zero (off) or positive seconds")
    if mcp.max_body_bytes < 1 or mcp.max_image_bytes < 0:
        raise ConfigError("[mcp] max_body_bytes and max_image_bytes must be byte counts")
    for origin in mcp.origins:
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("https", "http")
            or not parts.hostname
            or parts.path not in ("", "/")
        ):
            raise ConfigError(
                f"[mcp] origins: {origin!r} is not an origin such as https://app.example.com"
            )


def _check_spend(settings: Settings) -> None:
    spend = settings.spend
    if spend.backend not in ("store", "sqlite", "off"):
        raise ConfigError(
            f"[spend] backend must be 'store', 'off' or 'sqlite', not {spend.backend!r}"
        )
    if spend.backend == "sqlite" and settings.store.backend != "local":
        # A ledger per machine under a shared store would multiply every limit by
        # the number of instances: refuse rather than guess which one is meant.
        raise ConfigError(
            "[spend] backend = 'sqlite' keeps the ledger on this machine, but [store] "
            "backend = 'redis' shares state between instances; set [spend] backend = "
            "'store' (the ledger follows [store]) or 'off'"
        )
    if spend.on_backend_error not in ("closed", "open"):
        raise ConfigError(
            f"[spend] on_backend_error must be 'closed' or 'open', not {spend.on_backend_error!r}"
        )
    try:
        zoneinfo.ZoneInfo(spend.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"[spend] timezone {spend.timezone!r} is not a time zone name (such as "
            "'UTC' or 'Europe/Paris')"
        ) from None
    if spend.reservation_ttl_s < 5:
        raise ConfigError("[spend] reservation_ttl must be at least 5 seconds")
    if spend.default_output_tokens < 1:
        raise ConfigError("[spend] default_output_tokens must be at least 1")
