"""The key that signs download links: the same for every worker, restart and instance.

A link made by one process is served by whichever process the next request
reaches, so the key can never be made per process. From the operator
(``[actions] signing_secret_file``, ``RELAYD_SIGNING_SECRET_FILE`` or the systemd
credential ``actions_signing_secret``) it is used as it is. Without one:

- backend ``local``: a random key is made once and kept in the state directory
  (``signing_secret``, mode 0600), shared by every worker of the machine and by
  every later start;
- backend ``redis``: relayd refuses to start, since instances on other machines
  cannot read this one's state directory; each must be given the same key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Final

from relayd.config import ConfigError, Settings
from relayd.store import state_dir

__all__ = ["FILENAME", "MISSING_FOR_REDIS", "signing_key"]

FILENAME: Final = "signing_secret"
MISSING_FOR_REDIS: Final = (
    "[store] backend = 'redis' needs the link-signing secret from the operator: every "
    "instance must sign with the same one. Make one (openssl rand -hex 32), give the "
    "same file to every instance as the systemd credential actions_signing_secret "
    "(LoadCredential=), or set [actions] signing_secret_file / RELAYD_SIGNING_SECRET_FILE"
)


def signing_key(settings: Settings) -> bytes:
    """The link-signing key (see the module's docstring); ConfigError with
    :data:`MISSING_FOR_REDIS` when backend redis has none."""
    if settings.actions.signing_secret:
        return settings.actions.signing_secret.encode()
    if settings.store.backend == "redis":
        raise ConfigError(MISSING_FOR_REDIS)
    return _kept(state_dir(settings) / FILENAME)


def _kept(path: Path) -> bytes:
    """The key in ``path``, made first if there is none. Several workers starting at
    once all read the same one: each writes a candidate to a file of its own and
    links it into place, which only the first can do."""
    with contextlib.suppress(FileNotFoundError):
        return _read(path)
    candidate = path.with_name(f".{FILENAME}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as out:
        out.write(secrets.token_hex(32) + "\n")
    try:
        os.link(candidate, path)
    except FileExistsError:
        pass  # another worker was first: use its key
    finally:
        candidate.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> bytes:
    value = path.read_text(encoding="ascii").strip()
    if len(value) < 32:
        raise ConfigError(
            f"the link-signing secret kept in {path} is damaged (shorter than 32 "
            "characters); remove the file and relayd makes a new one (links made "
            "before then stop working)"
        )
    return value.encode()
