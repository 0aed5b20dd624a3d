"""Shared state: the one place that knows where state lives.

OAuth grants, spend counters and the usage ledger must survive restarts and be the
same for every worker. ``spend/`` and ``oauth/`` talk to the stores defined here and
never open a file or a connection themselves, so moving state elsewhere (another
backend) changes this package only.

The local backend keeps one SQLite database per concept under the state directory
(:func:`state_dir`), each in WAL mode so every worker of one machine reads and writes
it at once (:mod:`relayd.store.sqlite`), plus the files behind download links and the
link-signing secret. The redis backend (``[store] backend = "redis"``) keeps the same
state on one server every instance shares (:mod:`relayd.store.redis`); each kind of
state has one interface with a backend of each kind (docs/store.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from relayd.config import Settings

__all__ = ["state_dir", "state_path"]


def state_dir(settings: Settings) -> Path:
    """The directory relayd keeps its state in (:func:`state_path`), created (mode
    0700) if missing."""
    path = state_path(settings)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def state_path(settings: Settings) -> Path:
    """Where the state directory is, without creating it (start-up checks).

    ``[store] dir`` / ``RELAYD_STATE_DIR`` when set; else systemd's
    ``StateDirectory=`` (``$STATE_DIRECTORY``, its first entry); else
    ``$XDG_STATE_HOME/relayd``, else ``~/.local/state/relayd``.
    """
    if settings.store.dir:
        return Path(settings.store.dir)
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "relayd"
