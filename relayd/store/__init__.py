"""Shared state: the one place that knows where state lives.

OAuth grants, spend counters and the usage ledger must survive restarts and be the
same for every worker. ``spend/`` and ``oauth/`` talk to the stores defined here and
never open a file or a connection themselves, so moving state elsewhere (another
backend) changes this package only.

The local backend keeps one SQLite database per concept under the state directory
(:func:`state_dir`), each in WAL mode so every worker of one machine reads and writes
it at once (:mod:`relayd.store.sqlite`).
"""

from __future__ import annotations

import os
from pathlib import Path

from relayd.config import Settings

__all__ = ["state_dir"]


def state_dir(settings: Settings) -> Path:
    """The directory relayd keeps its state in, created (mode 0700) if missing.

    ``[store] dir`` / ``RELAYD_STATE_DIR`` when set; else systemd's
    ``StateDirectory=`` (``$STATE_DIRECTORY``, its first entry); else
    ``$XDG_STATE_HOME/relayd``, else ``~/.local/state/relayd``.
    """
    if settings.store.dir:
        path = Path(settings.store.dir)
    elif os.environ.get("STATE_DIRECTORY"):
        path = Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "relayd"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
