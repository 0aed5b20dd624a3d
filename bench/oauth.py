"""``python -m bench oauth``: what a bearer-token (OAuth access token) check costs.

One relayd with its OAuth server on (a loopback public url) in front of the fake
upstream. The bench gets an access token the way a client does (register, the
login form with the relay key, the code exchange with PKCE), then measures, round
by round, 2,000 sequential small JSON requests on one connection presented with
the relay key and with the access token: latency p50/p99 and relayd's CPU per
request. The figure of record, token − key, comes from a third run per round that
presents the two in turn, request by request, so that the machine's other work
falls on both alike. Then the parts of the check
alone, in this process, on the same grant file: the relay-key digest every
presented secret pays first, the grant lookup by the token's digest, and the
fingerprint of the key it acts as.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

from bench.procs import Server, cpu_seconds, free_port, start_server, tree_pids
from bench.scenarios import Plan, in_turn, latency
from bench.stack import REPO, Target, _relayd_env, fake_argv
from bench.workers import LoadPool, raise_fd_limit
from relayd.config import hash_key, parse_keys_env
from relayd.oauth.tokens import digest, key_print
from relayd.store.grants import FILENAME, SqliteGrantStore

__all__ = ["main"]

RELAY_KEY = "bench-oauth-" + "0" * 20
REDIRECT = "https://app.example/callback"
_HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


async def access_token(base: str, relay_key: str = RELAY_KEY) -> str:
    """An access token for ``relay_key``, by the authorization code flow with PKCE."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    # unsafe: the login cookie comes from an IP address (127.0.0.1).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        registered = await session.post(
            f"{base}/oauth/register", json={"redirect_uris": [REDIRECT], "client_name": "bench"}
        )
        client_id = (await registered.json())["client_id"]
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
            "state": "bench",
        }
        page = await session.get(f"{base}/oauth/authorize", params=params)
        form = {name: unescape(value) for name, value in _HIDDEN.findall(await page.text())}
        form.update(relay_key=relay_key, action="allow")
        posted = await session.post(f"{base}/oauth/authorize", data=form, allow_redirects=False)
        if "Location" not in posted.headers:
            raise RuntimeError(f"login refused: {posted.status} {(await posted.text())[:300]}")
        query = parse_qs(urlsplit(posted.headers["Location"]).query)
        exchanged = await session.post(
            f"{base}/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": query["code"][0],
                "code_verifier": verifier,
                "redirect_uri": REDIRECT,
                "client_id": client_id,
            },
        )
        return str((await exchanged.json())["access_token"])


def _start(tmp: Path) -> tuple[list[Server], Server, str]:
    servers: list[Server] = []
    fake_port, port = free_port(), free_port()
    fake = start_server(
        "fake",
        fake_argv(fake_port),
        port=fake_port,
        log=tmp / "fake.log",
        cwd=REPO,
    )
    servers.append(fake)
    env = _relayd_env(fake_port, port, RELAY_KEY, "info")
    env.update(RELAYD_STATE_DIR=str(tmp), RELAYD_PUBLIC_URL=f"http://127.0.0.1:{port}")
    relayd = start_server(
        "relayd",
        [sys.executable, "-m", "relayd", "serve"],
        port=port,
        log=tmp / "relayd.log",
        env=env,
        cwd=REPO,
    )
    servers.append(relayd)
    for server in servers:
        server.wait_ready()
    return servers, relayd, f"http://127.0.0.1:{port}"


def _per_call_us(call: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count * 1e6


def check_parts(grants: Path, token: str, count: int) -> dict[str, float]:
    """µs per call of each part of the token check, on the running relay's grant file."""
    (key,) = parse_keys_env(f"bench:{RELAY_KEY}")
    token_digest = digest(token)
    parts = {
        "relay-key digest (every presented secret)": _per_call_us(lambda: hash_key(token), count),
        "token digest": _per_call_us(lambda: digest(token), count),
        "key fingerprint": _per_call_us(lambda: key_print(key), count),
    }

    async def lookups() -> float:
        store = SqliteGrantStore(grants)
        try:
            started = time.perf_counter()
            for _ in range(count):
                await store.access(token_digest)
            return (time.perf_counter() - started) / count * 1e6
        finally:
            await store.close()

    # After its first call the store answers from what it remembers (store/grants.py).
    parts["grant lookup (SQLite; remembered after the first call)"] = asyncio.run(lookups())
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench oauth", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, small sizes")
    args = parser.parse_args(argv)
    raise_fd_limit()
    plan = Plan(rounds=1, latency_n=300) if args.quick else Plan(rounds=args.rounds)
    figures: dict[str, list[dict[str, Any]]] = {"relay key": [], "access token": []}
    added: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="relayd-bench-oauth-") as name:
        tmp = Path(name)
        servers, relayd, base = _start(tmp)
        pool = LoadPool(1)
        try:
            token = asyncio.run(access_token(base))
            auth = {
                "relay key": {"Authorization": f"Bearer {RELAY_KEY}"},
                "access token": {"Authorization": f"Bearer {token}"},
            }
            for round_ in range(plan.rounds):
                order = list(auth) if round_ % 2 == 0 else list(auth)[::-1]
                this = {}
                for label in order:
                    print(f"round {round_ + 1}: {label}", file=sys.stderr, flush=True)
                    target = Target(label, base, auth[label], relayd)
                    pids = tree_pids(relayd.pid)
                    cpu = cpu_seconds(pids)
                    this[label] = latency(pool, target, plan)
                    requests = plan.latency_n + 100
                    this[label]["cpu_us"] = (cpu_seconds(pids) - cpu) / requests * 1e6
                    figures[label].append(this[label])
                print(f"round {round_ + 1}: in turn", file=sys.stderr, flush=True)
                with_key, with_token = (Target(label, base, auth[label], relayd) for label in auth)
                added.append(in_turn(pool, with_key, with_token, plan))
            parts = check_parts(tmp / FILENAME, token, 2000 if args.quick else 20000)
        finally:
            pool.close()
            for server in reversed(servers):
                server.stop()
    print(_table(figures, added, parts, plan))
    return 0


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _table(
    figures: dict[str, list[dict[str, Any]]],
    added: list[tuple[float, float]],
    parts: dict[str, float],
    plan: Plan,
) -> str:
    labels = list(figures)
    lines = [
        f"medians of {plan.rounds} round(s), {plan.latency_n} sequential requests each",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for title, key, digits in (
        ("1 conn: latency p50 ms", "lat_p50_ms", 3),
        ("1 conn: latency p99 ms", "lat_p99_ms", 3),
        ("relayd CPU per request (µs)", "cpu_us", 0),
    ):
        cells = [f"{_median([f[key] for f in figures[label]]):,.{digits}f}" for label in labels]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    p50 = _median([a for a, _ in added])
    p99 = _median([b for _, b in added])
    lines += [
        "",
        "added by the token check (token − key, asked in turn on one connection):",
        f"p50 {p50:+.3f} ms, p99 {p99:+.3f} ms (goal: ≤ 0.05 ms)",
        "",
        "the check's parts alone (µs per call, this process):",
        *(f"- {part}: {us:.1f}" for part, us in parts.items()),
    ]
    errors = {label: [f["errors"] for f in figures[label] if f["errors"]] for label in labels}
    lines.append(f"errors: {errors if any(errors.values()) else 'none'}")
    return "\n".join(lines)
