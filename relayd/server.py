"""Running one relayd process: listeners, signals, systemd notifications, drain.

Lifecycle: sites start → ``READY=1`` (never before the port accepts) → serve →
SIGTERM/SIGINT → ``STOPPING=1`` → stop accepting, let in-flight requests, streams and
bridges finish for up to ``drain_timeout`` → cancel what remains (a cut stream is
an honest break, never a clean end) → exit. SIGHUP re-reads relay keys, scopes,
the path policy and relayd's own TLS pair (relayd/tls.py); requests and connections
in flight keep what they started with.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable

from aiohttp import web

from relayd import __version__
from relayd.app import create_app
from relayd.config import ConfigError, Settings, keyless_warning, load_settings
from relayd.handlers.realtime import end_revoked_sessions
from relayd.loopback import is_loopback_address, socket_label
from relayd.preflight import bind_error
from relayd.spend.control import SpendControl
from relayd.spend.prices import PriceBook, PriceTableError
from relayd.state import KEYRING, METRICS, POLICY, SPEND, TABLE
from relayd.systemd import Notifier, listen_sockets, watchdog_interval
from relayd.tasks import spawn
from relayd.tls import ServedCertificate, TLSSockSite, TLSTCPSite

__all__ = ["loop_factory", "refuse_keyless_sockets", "run", "serve", "warn_if_keyless"]

log = logging.getLogger("relayd")

# Set by the worker supervisor (relayd/workers.py) for its children.
READY_FD_ENV = "RELAYD_READY_FD"
INHERITED_FDS_ENV = "RELAYD_INHERITED_FDS"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (a faster loop, same semantics), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(settings: Settings, config: str | None) -> None:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(settings, config))


def _inherited_sockets() -> list[socket.socket]:
    """Listening sockets from systemd, or from the worker supervisor."""
    fds = os.environ.pop(INHERITED_FDS_ENV, "")
    if fds:
        return [socket.socket(fileno=int(fd)) for fd in fds.split(",")]
    return listen_sockets()


def refuse_keyless_sockets(settings: Settings, sockets: list[socket.socket]) -> None:
    """Keyless mode on sockets relayd did not bind: judged by their real address.

    The ``listen`` setting says nothing about a socket systemd (or the worker
    supervisor) passed in, so config validation could not have refused a public
    one (issue 11, item 3). Raises ConfigError (exit 2) before any is served.
    """
    if settings.auth.keys or settings.auth.disabled:
        return
    public = [
        socket_label(sock.family, sock.getsockname())
        for sock in sockets
        if not is_loopback_address(sock.family, sock.getsockname())
    ]
    if public:
        raise ConfigError(
            f"no relay keys are configured and the inherited socket {', '.join(public)} is "
            "not a loopback address: set RELAYD_KEYS or RELAYD_KEYS_FILE, bind the socket "
            "unit (ListenStream=) to 127.0.0.1, or set [auth] disabled = true if another "
            "layer authenticates every request"
        )


async def _start_sites(
    runner: web.AppRunner,
    settings: Settings,
    inherited: list[socket.socket],
    tls: ServedCertificate | None,
) -> None:
    backlog = settings.server.backlog
    sites: list[web.BaseSite]
    if tls is not None:  # docs/security.md#own-tls
        if inherited:
            sites = [TLSSockSite(runner, sock, tls, backlog=backlog) for sock in inherited]
        else:  # config refuses TLS on a Unix socket path
            sites = [
                TLSTCPSite(
                    runner,
                    settings.server.listen.host,
                    settings.server.listen.port,
                    tls,
                    backlog=backlog,
                    reuse_port=settings.server.workers > 1,
                )
            ]
    elif inherited:
        sites = [web.SockSite(runner, sock, backlog=backlog) for sock in inherited]
    elif settings.server.listen.path is not None:
        sites = [web.UnixSite(runner, settings.server.listen.path, backlog=backlog)]
    else:
        sites = [
            web.TCPSite(
                runner,
                settings.server.listen.host,
                settings.server.listen.port,
                backlog=backlog,
                reuse_port=settings.server.workers > 1,
            )
        ]
    for site in sites:
        try:
            await site.start()
        except OSError as exc:  # port in use, no such directory...: one line (issue 11)
            raise bind_error(exc, settings.server.listen) from None


def bound_addresses(runner: web.AppRunner, scheme: str = "http") -> str:
    parts = []
    for address in runner.addresses:
        if isinstance(address, tuple):
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            parts.append(f"{scheme}://{host}:{address[1]}")
        else:
            parts.append(f"unix:{address}")
    return ", ".join(parts)


async def serve(settings: Settings, config: str | None) -> None:
    inherited = _inherited_sockets()
    refuse_keyless_sockets(settings, inherited)
    # A worker's supervisor has already warned about keyless mode, once for all.
    warn_keyless = READY_FD_ENV not in os.environ
    notifier = Notifier.from_environ()
    watchdog = watchdog_interval()
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a hang-up cancels the handler, as in tests
        # (docs/design.md#a-hang-up-cancels-upstream-at-once)
        access_log=None,
        shutdown_timeout=settings.server.drain_timeout_s,
        keepalive_timeout=settings.limits.keepalive_timeout_s,
    )
    await runner.setup()
    tls = ServedCertificate(settings.server, app[METRICS]) if settings.server.tls_cert else None
    pinger: asyncio.Task[None] | None = None
    # Handlers first: a SIGHUP or SIGTERM right after READY must never hit the
    # default action (which kills the process).
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, app, config, notifier, tls)
    try:
        await _start_sites(runner, settings, inherited, tls)
        addresses = bound_addresses(runner, "https" if tls else "http")
        log.info("relayd %s listening on %s", __version__, addresses)
        if warn_keyless:
            warn_if_keyless(settings, addresses)
        # What start-up built lives as long as the process: keep it out of every
        # future collection (fewer and shorter GC pauses on the request path).
        gc.freeze()
        _report_ready(notifier, f"serving on {addresses}")
        pinger = spawn(notifier.watchdog(watchdog), name="relayd.watchdog") if watchdog else None

        await stop.wait()  # later SIGTERMs are no-ops: the drain is already under way
        notifier.stopping(f"draining for up to {settings.server.drain_timeout_s:.0f}s")
        log.info(
            "stopping: draining in-flight requests for up to %.0fs",
            settings.server.drain_timeout_s,
        )
    finally:
        # Stops accepting, waits up to shutdown_timeout for handlers, cancels the rest.
        await runner.cleanup()
        if pinger is not None:
            pinger.cancel()
    log.info("stopped")


def warn_if_keyless(settings: Settings, addresses: str) -> None:
    """The start-up warning of keyless mode, naming the addresses really served."""
    if (warning := keyless_warning(settings, addresses)) is not None:
        log.warning("%s", warning)


def _report_ready(notifier: Notifier, status: str) -> None:
    ready_fd = os.environ.pop(READY_FD_ENV, None)
    if ready_fd is not None:  # a worker: the supervisor tells systemd once all are up
        os.write(int(ready_fd), b"1")
        os.close(int(ready_fd))
    notifier.ready(status)


def reload_spend(control: SpendControl, fresh: Settings) -> None:
    """SIGHUP, spend control: new limits and prices for the next admission. A price
    file that cannot be read keeps the current prices (and says so); the backend
    itself changes only with a restart."""
    prices = control.prices
    try:
        prices = PriceBook.load(fresh)
    except PriceTableError as exc:
        log.error("reload: keeping the current prices: %s", exc)
    control.reload(fresh, prices)


def reload(
    app: web.Application, config: str | None, notifier: Notifier, tls: ServedCertificate | None
) -> None:
    """SIGHUP: re-read relay keys, scopes, the path policy and the TLS pair; report
    what changed."""
    notifier.reloading("reloading keys and policy")
    try:
        fresh = load_settings(config, route_groups=app[TABLE].groups)
    except ConfigError as exc:
        log.error("reload failed, keeping the current keys, policy and TLS pair: %s", exc)
        notifier.status(f"reload failed: {exc}")
        return
    keyring, policy = app[KEYRING], app[POLICY]
    if keyring.keys and not fresh.auth.keys:
        # Issue 11: a keys file whose every line is commented out would otherwise
        # turn a keyed relay into an open one without a word.
        log.error(
            "reload refused: the new configuration has no relay keys, which would open "
            "every route to anyone who reaches relayd; keeping the %d current relay keys "
            "and policy. Check the keys file (is every line commented out?)",
            len(keyring.keys),
        )
        notifier.status("reload refused: no relay keys in the new configuration")
        return
    for warning in fresh.warnings:
        log.warning("%s", warning)
    before = {k.name: k for k in keyring.keys}
    after = {k.name: k for k in fresh.auth.keys}
    changed = sorted(n for n in before.keys() & after.keys() if before[n] != after[n])
    keyring.replace(fresh.auth.keys)
    if tls is not None:
        tls.reload(fresh.server)
    # What the removed keys opened ends now: realtime sessions here, signed links
    # when next presented (actions/handout_store.py).
    spawn(end_revoked_sessions(app), name="relayd.revoke_sessions")
    policy_changed = (policy.allow, policy.deny) != (
        tuple(p.lower() for p in fresh.policy.allow),
        tuple(p.lower() for p in fresh.policy.deny),
    )
    policy.replace(fresh.policy.allow, fresh.policy.deny)
    reload_spend(app[SPEND], fresh)
    log.info(
        "reloaded: %d relay keys (added: %s; removed: %s; changed: %s); path policy %s",
        len(after),
        ", ".join(sorted(after.keys() - before.keys())) or "none",
        ", ".join(sorted(before.keys() - after.keys())) or "none",
        ", ".join(changed) or "none",
        "changed" if policy_changed else "unchanged",
    )
    notifier.send(ready="1", status="serving (reloaded)")
