"""What ``check-config`` prints: the effective settings by TOML table, secrets redacted."""

from __future__ import annotations

from typing import Any

from relayd.config.casts import Listen
from relayd.config.fields import declared
from relayd.config.settings import SECTIONS, Settings

__all__ = ["redacted"]

# Settings whose value is a secret: only whether it is set is shown.
_SECRETS = {
    ("upstream", "api_key"): ("<set>", "<missing>"),
    ("actions", "signing_secret"): ("<set>", "<random per process>"),
}


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
            elif record.name == "keys" and table == "auth":
                value = [
                    {"name": k.name, "scopes": "all" if k.scopes is None else sorted(k.scopes)}
                    for k in value
                ]
            elif isinstance(value, Listen):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            shown[record.key] = value
        out[table] = shown
    out["warnings"] = list(settings.warnings)
    out["sources"] = dict(settings.sources)
    return out
