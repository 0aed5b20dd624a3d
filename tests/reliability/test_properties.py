"""Property-based checks: relayd against its own OpenAPI document, and the path rules.

- schemathesis generates requests for every operation ``/openapi.json`` documents
  (whatever it documents today) and sends them to relayd on loopback, with the
  fake OpenAI behind it. No answer may be a 5xx relayd made itself (a 5xx the
  fake produced and relayd passed through is the fake's), and every answer must
  fit the document: status, media type, schema (relayd's own errors and answers).
- hypothesis checks the two path gates: ``check_raw_path`` (every route) and the
  ``/v1/proxy`` normaliser and policy, plus the operator's ``PathPolicy``; and that
  no target the gate and the policy pass resolves, at an upstream that decodes and
  removes dot segments like a normal server, to a path the policy denies.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from yarl import URL

from relayd.actions.proxy_policy import check_proxy_call, normalise_path
from relayd.app import create_app
from relayd.config import DEFAULT_DENY
from relayd.errors import BadRequestError, PermissionDeniedError
from relayd.paths import PathPolicy, Verdict, check_raw_path, upstream_path
from relayd.routes import TABLE
from tests.conftest import CANARY, RELAY_KEY, make_settings
from tests.fakes.openai import FakeOpenAI

AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
EXAMPLES_PER_OPERATION = 10


class _Relay:
    """relayd and the fake OpenAI on loopback, in a thread with its own event loop
    (schemathesis calls with a blocking HTTP client)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self.upstream_5xx = 0  # answers >= 500 the fake itself produced
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _Relay:
        self._thread.start()
        self._run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def _run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    async def _serve(self, app: web.Application, **kwargs: Any) -> str:
        runner = web.AppRunner(app, access_log=None, **kwargs)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _start(self) -> None:
        fake = FakeOpenAI(record=False)

        @web.middleware
        async def note_5xx(request: web.Request, handler: Callable[..., Any]) -> Any:
            try:
                response = await handler(request)
            except web.HTTPException:
                raise
            except Exception:
                self.upstream_5xx += 1
                raise
            if response.status >= 500:
                self.upstream_5xx += 1
            return response

        fake.app.middlewares.append(note_5xx)
        upstream = await self._serve(fake.app)
        settings = make_settings(
            upstream={"url": upstream, "first_byte_timeout_s": 5, "idle_timeout_s": 5},
            actions={"answer_budget_s": 1, "poll_interval_s": 0.2},
            # As deployed: the OAuth routes need the public origin to answer at all.
            server={"public_url": "http://127.0.0.1:8999"},
        )
        self.url = await self._serve(create_app(settings), handler_cancellation=True)

    async def _stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()


@pytest.fixture(scope="module")
def live_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Relay]:
    # Module-scoped, so the per-test private state directory is not set yet: the
    # relay's state goes to a directory of its own, never the user's.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("STATE_DIRECTORY", raising=False)
        patch.delenv("RELAYD_STATE_DIR", raising=False)
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("live-state")))
        with _Relay() as relay:
            yield relay


def test_relayd_keeps_to_its_own_openapi_document(live_relay: _Relay) -> None:
    schema = schemathesis.openapi.from_url(f"{live_relay.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) > 50  # the whole document, not a fragment
    problems: list[str] = []
    with requests.Session() as http:
        for operation in operations:

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy())
            def exchange(case: Any) -> None:
                before = live_relay.upstream_5xx
                response = case.call(
                    base_url=live_relay.url, session=http, headers=AUTH, timeout=15
                )
                CANARY.check(f"schemathesis {case.method} {case.path}", response.content)
                CANARY.check(f"schemathesis {case.method} {case.path}", str(response.headers))
                if live_relay.upstream_5xx != before:
                    return  # the fake failed on a generated body; relayd passed that on
                if response.status_code >= 500:
                    problems.append(
                        f"{case.method} {case.formatted_path}: relayd answered "
                        f"{response.status_code}: {response.text[:200]}"
                    )
                    return
                try:
                    case.validate_response(
                        response,
                        checks=[
                            status_code_conformance,
                            content_type_conformance,
                            response_schema_conformance,
                        ],
                    )
                except Exception as exc:  # schemathesis raises a FailureGroup
                    problems.append(f"{case.method} {case.formatted_path}: {exc!r}"[:400])

            exchange()
    assert not problems, "\n".join(problems[:20])


# --------------------------------------------------------------------------- path gates

_SEGMENT_CHARS = st.sampled_from(
    [
        "a",
        "Z",
        "0",
        "-",
        "_",
        ".",
        "%",
        "2",
        "e",
        "E",
        "f",
        "F",
        "5",
        "c",
        "C",
        "\\",
        "/",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%00",
        "%25",
        "..",
        "\x00",
        " ",
        ":",
        "?",
    ]
)
_PATHS = st.lists(_SEGMENT_CHARS, min_size=0, max_size=12).map(
    lambda parts: "/v1/" + "".join(parts)
)


def _segments_after_decoding(raw: str) -> list[str]:
    return [unquote(segment) for segment in raw.split("?", 1)[0].split("/")[1:]]


@given(_PATHS)
@example("/v1/files/..%2Forganization/users")
@example("/v1/files/%2E%2E/content")
@settings(max_examples=400, deadline=None, database=None)
def test_an_accepted_raw_path_means_the_same_once_decoded(raw: str) -> None:
    # What relayd checked is what upstream resolves: no segment of the accepted
    # path decodes to a separator, a dot segment, NUL or a backslash, and there
    # are no empty segments for a resolver to collapse.
    if check_raw_path(raw) is not None:
        return
    segments = _segments_after_decoding(raw)
    for index, segment in enumerate(segments):
        assert "/" not in segment and "\\" not in segment and "\x00" not in segment, raw
        assert segment not in (".", ".."), raw
        assert segment or index == len(segments) - 1, raw  # only a trailing slash
    path = raw.split("?", 1)[0]
    assert posixpath.normpath(path) == path.rstrip("/") or path == "/v1/", raw


# Targets as an attacker writes them: segments of the denied families' names with
# one letter percent-encoded (either case of hex), dots bare and encoded, separators
# bare and encoded, fragments and parameters, glued in any order.
_WORDS = ("v1", "organization", "admin", "files", "evals", "x")
_PIECES = st.sampled_from(
    [
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%5c",
        "%25",
        "%3b",
        "%3f",
        "%23",
        "%20",
        "%7e",
        "~",
        "#",
        "?",
        ";",
        "\\",
        ":",
        "@",
        "/",
        "//",
        "%e2%80%a8",
        "%ff",
        "%6",
        "a",
        "o",
    ]
)


@st.composite
def _disguised_word(draw: st.DrawFn) -> str:
    word = draw(st.sampled_from(_WORDS))
    index = draw(st.integers(0, len(word) - 1))
    escape = f"%{ord(word[index]):02{draw(st.sampled_from(['x', 'X']))}}"
    return word[:index] + escape + word[index + 1 :]


_SEGMENTS = st.lists(
    st.one_of(
        st.sampled_from(_WORDS),
        _disguised_word(),
        _PIECES,
        st.lists(_PIECES, min_size=2, max_size=4).map("".join),
    ),
    max_size=6,
)
_TARGETS = st.tuples(st.sampled_from(["/v1/", "/"]), _SEGMENTS, st.sampled_from(["", "/"])).map(
    lambda parts: parts[0] + "/".join(parts[1]) + parts[2]
)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, as written."""
    source, out = path, ""
    while source:
        if source.startswith(("../", "./")):
            source = source[source.index("/") + 1 :]
        elif source.startswith("/./") or source == "/.":
            source = "/" + source[3:]
        elif source.startswith("/../") or source == "/..":
            source = "/" + source[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif source in (".", ".."):
            source = ""
        else:
            end = source.find("/", 1)
            end = len(source) if end == -1 else end
            out, source = out + source[:end], source[end:]
    return out


def _resolutions_upstream(target: str) -> set[str]:
    """The paths a normal server may resolve ``target`` to: the fragment dropped,
    percent-decoded once and dot segments removed, in either order, and also with
    backslashes read as slashes, empty segments collapsed and ``;params`` dropped."""
    path = urlsplit(target).path
    found = set()
    for decode_first in (True, False):
        for lenient in (False, True):
            candidate = path.replace("\\", "/") if lenient else path
            if decode_first:
                candidate = unquote(candidate)
            if lenient:
                candidate = re.sub("/{2,}", "/", candidate)
            if lenient:  # servers that drop ;params before resolving (/..;/)
                candidate = re.sub(";[^/]*", "", candidate)
            candidate = _remove_dot_segments(candidate)
            found.add(candidate if decode_first else unquote(candidate))
    return found


@given(_TARGETS)
@example("/v1/%6frganization/admin_api_keys")
@example("/v1/%61dmin/keys")
@example("/v1/organization/x/..#")
@example("/v1/evals#/../organization")
@settings(max_examples=1000, deadline=None, database=None)
def test_no_target_the_policy_passes_resolves_upstream_to_a_denied_path(target: str) -> None:
    # The whole catch-all decision: the path gate, then the operator's patterns on
    # the decoded path, with an allow pattern that also covers the denied families.
    policy = PathPolicy(["/v1/*"], DEFAULT_DENY)
    try:
        judged = upstream_path(target)
    except BadRequestError:
        return
    if policy.decide(judged)[0] is not Verdict.ALLOW:
        return
    for resolved in _resolutions_upstream(target):
        assert resolved == judged, (target, resolved)
        assert policy.decide(resolved)[0] is Verdict.ALLOW, (target, resolved)


_PROXY_PATHS = st.one_of(
    _PATHS,
    st.text(min_size=0, max_size=40),
    st.sampled_from([r.path.replace("{", "").replace("}", "") for r in TABLE]),
)


@given(_PROXY_PATHS)
@settings(max_examples=400, deadline=None, database=None)
def test_proxy_normalisation_is_idempotent_and_leaves_nothing_to_decode(raw: str) -> None:
    try:
        path = normalise_path(raw)
    except (BadRequestError, PermissionDeniedError):
        return
    assert normalise_path(path) == path
    assert path.startswith("/v1") and "//" not in path
    assert unquote(path) == path  # nothing left that upstream would decode further
    segments = path.split("/")[1:]
    assert not any(s in (".", "..") for s in segments)
    assert not any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in path)


_METHODS = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"])


@given(_METHODS, _PROXY_PATHS, st.one_of(st.none(), st.just({"stream": True}), st.just({})))
@settings(max_examples=600, deadline=None, database=None)
def test_an_accepted_proxy_call_is_an_allowlisted_json_endpoint(
    method: str, raw: str, body: dict[str, Any] | None
) -> None:
    try:
        call = check_proxy_call(TABLE, method, raw, None, body)
    except (BadRequestError, PermissionDeniedError):
        return
    path = URL(call.path_qs, encoded=True).path  # what upstream will see, decoded
    lowered = path.lower()
    route = TABLE.match(method, path)
    assert route is not None and route.method == method
    assert route.body.value in ("none", "json", "any")
    for blocked in (
        "/v1/admin",
        "/v1/organization",
        "/v1/realtime",
        "/v1/uploads",
        "/v1/audio",
        "/v1/moderations",
        "/v1/webhooks",
        "/v1/proxy",
    ):
        assert not lowered.startswith(blocked), (method, raw)
    assert not lowered.endswith(("/content", "/results")) and ":" not in path
    assert not (isinstance(body, dict) and body.get("stream") is True)


_PATTERNS = st.lists(
    st.sampled_from(
        [
            "/v1/organization*",
            "/v1/admin*",
            "/v1/evals*",
            "/v1/*",
            "/v1/fine_tuning/*",
            "*/content",
            "/v1/Evals/*",
        ]
    ),
    max_size=4,
)


@given(_PATTERNS, _PATTERNS, _PATHS)
@settings(max_examples=400, deadline=None, database=None)
def test_path_policy_deny_wins_and_case_does_not_matter(
    allow: list[str], deny: list[str], path: str
) -> None:
    policy = PathPolicy(allow, deny)
    verdict, _ = policy.decide(path)
    assert policy.decide(path.upper())[0] is verdict
    assert policy.decide(path.lower())[0] is verdict
    if PathPolicy([], deny).decide(path)[0] is Verdict.DENY:
        assert verdict is Verdict.DENY
