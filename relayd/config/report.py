"""What ``check-config`` prints: the effective settings by TOML table, secrets redacted."""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relayd.config.casts import Listen
from relayd.config.fields import declared
from relayd.config.settings import SECTIONS, Settings
from relayd.config.spend_limits import KeyLimits

__all__ = ["masked_url", "redacted"]

# Settings whose value is a secret: only whether it is set is shown.
_SECRETS = {
    ("upstream", "api_key"): ("<set>", "<missing>"),
    ("actions", "signing_secret"): ("<set>", "<made once, kept in the state directory>"),
    ("store", "redis_password"): ("<set>", None),
}


def masked_url(url: str | None) -> str | None:
    """``url`` with the password it may carry replaced by ``***`` (what check-config
    and start-up errors show of ``[store] redis_url``)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _limits(limits: KeyLimits) -> dict[str, Any]:
    """The limits set (dollars as USD), for check-config."""
    shown: dict[str, Any] = {}
    for item in dataclasses.fields(limits):
        value = getattr(limits, item.name)
        if value is None:
            continue
        if item.name.startswith("usd_"):
            value = value / 1_000_000
        shown[item.name] = list(value) if isinstance(value, tuple) else value
    return shown


def redacted(settings: Settings) -> dict[str, Any]:
    """``{table: {key: value}}`` plus ``warnings`` and ``sources``, as plain JSON values."""
    out: dict[str, Any] = {}
    for table, section in SECTIONS.items():
        shown: dict[str, Any] = {}
        values = getattr(settings, table)
        for record in declared(section):
            value = getattr(values, record.name)
            if (table, record.name) in _SECRETS:
                when_set, when_unset = _SECRETS[table, record.name]
                value = when_set if value else when_unset
                if table == "actions" and not settings.actions.signing_secret:
                    if settings.store.backend == "redis":
                        value = "<missing: backend redis needs one from a credential>"
            elif (table, record.name) == ("store", "redis_url"):
                value = masked_url(value)
            elif record.name == "keys" and table == "auth":
                value = [
                    {"name": k.name, "scopes": "all" if k.scopes is None else sorted(k.scopes)}
                    for k in value
                ]
            elif isinstance(value, KeyLimits):
                value = _limits(value)
            elif table == "spend" and record.name == "keys":
                value = {name: _limits(limits) for name, limits in value.items()}
            elif isinstance(value, Listen):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            shown[record.key] = value
        out[table] = shown
    out["warnings"] = list(settings.warnings)
    out["sources"] = dict(settings.sources)
    return out
