"""Start-up checks: what would stop ``relayd serve``, said in one line.

``relayd serve`` runs :func:`check` before it starts and turns a failed bind into a
:class:`StartupError` with :func:`bind_error`; ``relayd check-config`` runs the same
checks (and, with ``--try-bind``, :func:`try_bind`), so that it predicts what serve
will meet. A failure is one line naming the path or port and what to change,
never a traceback (issue 11).

Only what the operator can act on is checked: the directories relayd writes (the
download store, the state directory, the directory of a Unix socket), the listen
address, and with ``[store] backend = "redis"`` the shared store itself. Run as
another user (``check-config`` as root, the service as its own user) the answers
can differ; they are this process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from relayd.config import Listen, Settings, masked_url
from relayd.store import state_path
from relayd.store.blobs import blob_directory
from relayd.store.deadlines import call_deadline
from relayd.store.redis import connect
from relayd.store.signing import MISSING_FOR_REDIS

__all__ = ["StartupError", "bind_error", "check", "check_shared_store", "try_bind"]


class StartupError(Exception):
    """relayd cannot start; the message says why, in one line."""


def check(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Raise StartupError for a directory relayd needs and cannot use."""
    env = os.environ if environ is None else environ
    local = settings.store.backend == "local"
    state = "the state directory ([store] dir, RELAYD_STATE_DIR)"
    if settings.server.public_url:  # OAuth serves, and keeps its grants there
        _creatable(state_path(settings), f"{state} for OAuth grants")
    if local and not settings.actions.signing_secret:
        _creatable(state_path(settings), f"{state} for the link-signing secret")
    if settings.actions.store_dir is not None and local:
        _creatable(Path(settings.actions.store_dir), "the download store ([actions] store_dir)")
    elif local:
        _creatable(blob_directory(settings), "the download store (in the state directory)")
    if not local:
        check_shared_store(settings)
    metrics = env.get("PROMETHEUS_MULTIPROC_DIR")
    if settings.server.workers > 1 and metrics:
        _writable(Path(metrics), "PROMETHEUS_MULTIPROC_DIR")
    if settings.server.listen.path is not None and not _socket_activated(env):
        _unix_socket(settings.server.listen)


def check_shared_store(settings: Settings) -> None:
    """``[store] backend = "redis"``: the signing secret is given, and the server
    answers (a PING, authenticated, over TLS for ``rediss://``) within the store's
    deadline. Otherwise relayd does not start: a relay without its shared state
    would hand out links and tokens the other instances cannot honour, and
    systemd's ``Restart=on-failure`` tries again until the server is back."""
    if not settings.actions.signing_secret:
        raise StartupError(MISSING_FOR_REDIS)
    failure = asyncio.run(_ping(settings))
    if failure is not None:
        where = masked_url(settings.store.redis_url)
        raise StartupError(f"the shared store {where} does not answer: {failure}")


async def _ping(settings: Settings) -> str | None:
    """What went wrong reaching the shared store, in a few words, or None."""
    from redis.exceptions import RedisError  # redis-py: only with Redis

    client = connect(settings)
    try:
        async with asyncio.timeout(call_deadline(settings)):
            await client.ping()
    except TimeoutError:
        return f"no answer within {call_deadline(settings):g} s"
    except (RedisError, OSError) as exc:
        text = str(exc) or type(exc).__name__
        for secret in (settings.store.redis_password, _url_password(settings)):
            if secret:
                text = text.replace(secret, "***")
        return text
    finally:
        await client.aclose()
    return None


def _url_password(settings: Settings) -> str | None:
    return urlsplit(settings.store.redis_url or "").password


def try_bind(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Bind the listen address for a moment, as serve will (``check-config --try-bind``)."""
    env = os.environ if environ is None else environ
    listen = settings.server.listen
    if _socket_activated(env) or listen.path is not None:
        return  # systemd holds the port; a Unix socket was checked by check()
    assert listen.host is not None and listen.port is not None
    try:
        infos = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise bind_error(exc, listen) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # What asyncio sets too; SO_REUSEPORT never, so a relayd with workers on the
        # port is found, not joined.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise bind_error(exc, listen) from None


def bind_error(exc: OSError, listen: Listen) -> StartupError:
    """The StartupError for a failed bind or listen on ``listen``."""
    where = f"cannot listen on {listen}"
    if listen.path is not None:
        directory = Path(listen.path).parent
        if exc.errno == errno.ENOENT:
            return StartupError(f"{where}: the directory {directory} does not exist")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StartupError(f"{where}: no permission to create a socket in {directory}")
        if exc.errno == errno.EADDRINUSE:
            return StartupError(f"{where}: {_unix_holder(listen.path)}")
        return StartupError(f"{where}: {exc.strerror or exc}")
    if isinstance(exc, socket.gaierror):
        return StartupError(f"{where}: cannot resolve {listen.host!r}")
    if exc.errno == errno.EADDRINUSE:
        assert listen.port is not None
        return StartupError(f"{where}: {_port_holder(listen.port)}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StartupError(
            f"{where}: permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{where}: {listen.host} is not an address of this machine")
    return StartupError(f"{where}: {exc.strerror or exc}")


# --------------------------------------------------------------------------- directories


def _creatable(path: Path, what: str) -> None:
    """``path`` is a writable directory, or one relayd can create (mkdir -p)."""
    if path.exists():
        _writable(path, what)
        return
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StartupError(f"cannot create {what} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise StartupError(
            f"cannot create {what} {path}: {ancestor} is not writable by uid {os.getuid()}"
        )


def _writable(path: Path, what: str) -> None:
    if not path.exists():
        raise StartupError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise StartupError(f"{what} {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"{what} {path} is not writable by uid {os.getuid()}")


def _unix_socket(listen: Listen) -> None:
    assert listen.path is not None
    path = Path(listen.path)
    where = f"cannot listen on {listen}"
    directory = path.parent
    if not directory.is_dir():
        raise StartupError(f"{where}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(f"{where}: {directory} is not writable by uid {os.getuid()}")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{where}: {path} exists and is not a socket")
    # asyncio removes an existing socket file before binding: a server still
    # answering there would lose its address silently.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale file from a process that is gone
    raise StartupError(f"{where}: {_unix_holder(str(path))}")


def _socket_activated(env: Mapping[str, str]) -> bool:
    return bool(env.get("LISTEN_FDS")) and env.get("LISTEN_PID") == str(os.getpid())


# --------------------------------------------------------------------------- who holds it


def _port_holder(port: int) -> str:
    """Who listens on TCP ``port`` on this machine, as the end of a sentence."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local_address is HEXADDR:HEXPORT; state 0A is LISTEN.
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    return _described(_owner(inodes), f"port {port}")


def _unix_holder(path: str) -> str:
    inodes = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path:
                inodes.add(fields[6])
    return _described(_owner(inodes), path)


def _described(pid: int | None, what: str) -> str:
    if pid is None:
        return f"{what} is already in use by another program"
    top = pid
    while _is_relayd(top) and (parent := _parent(top)) is not None and _is_relayd(parent):
        top = parent  # a worker: name its supervisor, the process to stop
    if _is_relayd(top):
        return f"{what} is already served by another relayd (pid {top})"
    return f"{what} is already in use by {_command(top)} (pid {top})"


def _owner(inodes: set[str]) -> int | None:
    """A process holding one of the socket ``inodes`` (only ours are visible)."""
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        return int(entry.name)
    return None


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_relayd(pid: int) -> bool:
    argv = _argv(pid)
    if any(Path(arg).name == "relayd" for arg in argv[:2]):
        return True  # the console script, or an interpreter running it
    return any(argv[i : i + 2] == ["-m", "relayd"] for i in range(len(argv)))


def _parent(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                parent = int(line.split()[1])
                return parent or None
    return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "another program"
    except OSError:
        return "another program"
