"""The ``relayd`` command: ``serve``, ``check-config``, ``openapi``, ``usage``, ``prices``.

Exit codes: 0 success, 2 a configuration problem (the message says which), 1 any
other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relayd import __version__
from relayd.app import load_tools
from relayd.config import (
    ConfigError,
    Settings,
    keyless_warning,
    load_settings,
    parse_workers,
    redacted,
)
from relayd.openapi import actions_routes, build_openapi
from relayd.preflight import StartupError
from relayd.routes import TABLE

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
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument(
        "--workers",
        metavar="N|auto",
        type=_workers,
        default=None,
        help="worker processes on the port ('auto': one per CPU); wins over "
        "RELAYD_WORKERS and [server] workers",
    )
    commands.add_parser("serve", parents=[common, workers], help="run the relay")
    check = commands.add_parser(
        "check-config",
        parents=[common, workers],
        help="validate the config and print it, secrets redacted",
    )
    check.add_argument(
        "--try-bind",
        action="store_true",
        help="also bind the listen address for a moment, as serve would",
    )
    openapi = commands.add_parser("openapi", parents=[common], help="print the OpenAPI document")
    openapi.add_argument("--actions", action="store_true", help="the GPT Actions subset")
    openapi.add_argument(
        "--check",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="lint an Actions document (FILE, JSON or YAML; default: relayd's own) against "
        "the GPT builder's rules; exit 1 with each violation",
    )
    _spend_report_commands(commands, common)
    return parser


def _workers(text: str) -> int:
    try:
        return parse_workers(text, "--workers")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = getattr(args, "config", None)
    overrides = {"server.workers": getattr(args, "workers", None)}
    try:
        if args.command in ("usage", "prices"):
            return _spend_report(args, load_settings(config, require_upstream_key=False))
        if args.command == "openapi":
            settings = load_settings(config, require_upstream_key=False)
            if args.check is not None:
                return _check_actions_document(args.check, settings)
            print(json.dumps(build_openapi(TABLE, settings, actions=args.actions), indent=2))
            return 0
        if args.command == "check-config":
            return _check_config(config, overrides, try_bind=args.try_bind)
        settings = load_settings(config, overrides=overrides, route_groups=TABLE.groups)
        _route_checks(settings)
        return serve(settings, config, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 2


def _check_config(config: str | None, overrides: dict[str, Any], *, try_bind: bool) -> int:
    """``relayd check-config``: what serve would refuse is an error (exit 2); what it
    would accept but probably should not, a warning. A missing upstream key is only
    a warning here, so a file can be checked before the key is installed."""
    from relayd import preflight

    settings = load_settings(
        config, require_upstream_key=False, overrides=overrides, route_groups=TABLE.groups
    )
    _route_checks(settings)
    keyless = keyless_warning(settings, str(settings.server.listen))
    for warning in (*settings.warnings, *([keyless] if keyless else [])):
        print(f"relayd: warning: {warning}", file=sys.stderr)
    preflight.check(settings)
    if try_bind:
        preflight.try_bind(settings)
    print(json.dumps(redacted(settings), indent=2, default=str))
    return 0


def _route_checks(settings: Settings) -> None:
    """What ``serve`` checks against the route table and the files it reads before
    it builds the app, so ``check-config`` refuses the same: the tools manifest,
    and every ``[actions] operations`` entry naming an Actions route."""
    load_tools(settings.meta.tools_manifest)
    actions_routes(TABLE, settings)


def _check_actions_document(path: str, settings: Settings) -> int:
    """``relayd openapi --actions --check [FILE]``: 0 if the GPT builder takes it."""
    from relayd.actions.lint import lint

    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            print(f"relayd: cannot read {path}: {exc.strerror}", file=sys.stderr)
            return 1
        document = _parse_document(text)
        if document is None:
            print(f"relayd: {path} is neither JSON nor YAML", file=sys.stderr)
            return 1
        where = path
    else:
        document = build_openapi(TABLE, settings, actions=True)
        where = "relayd's Actions document"
    violations = lint(document)
    for violation in violations:
        print(violation)
    if violations:
        print(
            f"relayd: {where}: {len(violations)} problem(s) the GPT builder would refuse",
            file=sys.stderr,
        )
        return 1
    print(f"relayd: {where} passes every GPT builder rule relayd knows", file=sys.stderr)
    return 0


def _parse_document(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        import yaml  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def serve(settings: Settings, config: str | None, argv: Sequence[str]) -> int:
    from relayd import preflight, server, workers
    from relayd.logs import setup_logging

    setup_logging(settings.logging.format, settings.logging.level)
    if workers.is_worker():
        server.run(settings, config)
        return 0
    for warning in settings.warnings:
        log.warning("%s", warning)
    preflight.check(settings)
    if settings.auth.disabled:
        log.warning("auth is disabled in config: every route is open to anyone who can reach it")
    if settings.server.workers > 1:
        return workers.supervise(settings, list(argv))
    server.run(settings, config)
    return 0


# relayd usage / relayd prices check (issue 15): read the ledger and the price table.


def _spend_report_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    from relayd.spend.report import FORMATS, GROUPINGS

    usage = commands.add_parser(
        "usage",
        parents=[common],
        help="who spent what on which model: requests, tokens and dollars from the ledger",
    )
    usage.add_argument(
        "--since", metavar="D", help="from this date (YYYY-MM-DD) or ISO date and time"
    )
    usage.add_argument(
        "--until", metavar="D", help="to this date (included) or ISO date and time (excluded)"
    )
    usage.add_argument(
        "--by",
        action="append",
        choices=GROUPINGS,
        help="group by key (default), model or day; repeat for two groupings",
    )
    usage.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        dest="fmt",
        help="table (default), json (a list of rows) or csv",
    )
    usage.add_argument(
        "--html", metavar="FILE", help="write one self-contained page with charts to FILE"
    )
    prices = commands.add_parser("prices", parents=[common], help="the price table")
    actions = prices.add_subparsers(dest="prices_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        parents=[common],
        help="models seen without a price and rows not checked lately; exit 1 if any",
    )
    check.add_argument(
        "--older-than",
        metavar="N",
        type=int,
        default=90,
        help="flag price rows checked more than N days ago (default 90)",
    )


def _spend_report(args: argparse.Namespace, settings: Settings) -> int:
    import time
    from datetime import date

    from relayd.spend import report

    if args.command == "usage":
        return report.usage(
            settings,
            since=args.since,
            until=args.until,
            by=args.by or ["key"],
            fmt=args.fmt,
            html=args.html,
            now=time.time(),
        )
    return report.prices_check(settings, older_than_days=args.older_than, today=date.today())
