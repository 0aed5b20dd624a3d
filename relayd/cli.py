"""The ``relayd`` command: ``serve``, ``check-config``, ``openapi``.

Exit codes: 0 success, 2 a configuration problem (the message says which), 1 any
other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from relayd import __version__
from relayd.app import create_app, load_tools
from relayd.config import ConfigError, Settings, load_settings, redacted
from relayd.openapi import build_openapi
from relayd.routes import TABLE
from relayd.state import KEYRING

__all__ = ["main"]

log = logging.getLogger("relayd")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $RELAYD_CONFIG, else environment only)",
    )
    parser = argparse.ArgumentParser(
        prog="relayd", description="A streaming relay to the OpenAI API.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="run the relay")
    commands.add_parser(
        "check-config", parents=[common], help="validate the config and print it, secrets redacted"
    )
    openapi = commands.add_parser("openapi", parents=[common], help="print the OpenAPI document")
    openapi.add_argument("--actions", action="store_true", help="the GPT Actions subset")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = getattr(args, "config", None)
    try:
        if args.command == "openapi":
            settings = load_settings(config, require_upstream_key=False)
            print(json.dumps(build_openapi(TABLE, settings, actions=args.actions), indent=2))
            return 0
        settings = load_settings(config)
        load_tools(settings.tools_manifest)
        if args.command == "check-config":
            print(json.dumps(redacted(settings), indent=2, default=str))
            return 0
        return serve(settings, config)
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return 2


def serve(settings: Settings, config: str | None) -> int:
    from relayd.observe import setup_logging

    setup_logging(settings.log_format, settings.log_level)
    if not settings.keys and not settings.auth_disabled:
        log.warning(
            "NO RELAY KEYS ARE CONFIGURED: relayd accepts requests without a key and only "
            "listens on loopback (%s). Set RELAYD_KEYS or RELAYD_KEYS_FILE before exposing it.",
            settings.listen,
        )
    if settings.auth_disabled:
        log.warning("auth is disabled in config: every route is open to anyone who can reach it")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(settings, config))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(settings: Settings, config: str | None) -> None:
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # DESIGN: a hang-up cancels the handler, as in tests
        access_log=None,
        shutdown_timeout=settings.drain_timeout_s,
        keepalive_timeout=settings.keepalive_timeout_s,
    )
    await runner.setup()
    site: web.BaseSite
    listen = settings.listen
    if listen.path is not None:
        site = web.UnixSite(runner, listen.path)
    else:
        site = web.TCPSite(runner, listen.host, listen.port, reuse_port=settings.workers > 1)
    await site.start()
    log.info("relayd %s listening on %s", __version__, _bound_address(runner))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_keys, app, config)
    try:
        await stop.wait()
        log.info("stopping: draining in-flight requests for up to %.0fs", settings.drain_timeout_s)
    finally:
        await runner.cleanup()
    log.info("stopped")


def _bound_address(runner: web.AppRunner) -> str:
    addresses: list[Any] = runner.addresses
    parts = []
    for address in addresses:
        if isinstance(address, tuple):
            host, port = address[0], address[1]
            host = f"[{host}]" if ":" in host else host
            parts.append(f"http://{host}:{port}")
        else:
            parts.append(f"unix:{address}")
    return ", ".join(parts)


def _reload_keys(app: web.Application, config: str | None) -> None:
    """SIGHUP: re-read relay keys; requests in flight keep the key they came with."""
    try:
        fresh = load_settings(config)
    except ConfigError as exc:
        log.error("reload failed, keeping the current keys: %s", exc)
        return
    keyring = app[KEYRING]
    before = {k.name for k in keyring.keys}
    after = {k.name for k in fresh.keys}
    keyring.replace(fresh.keys)
    log.info(
        "reloaded relay keys: %d in use (added: %s; removed: %s)",
        len(after),
        ", ".join(sorted(after - before)) or "none",
        ", ".join(sorted(before - after)) or "none",
    )
