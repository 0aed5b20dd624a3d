"""Both OpenAPI documents, derived from the route table, and the GPT builder lint
(docs/chatgpt.md#the-actions-document)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from relayd.actions.lint import lint
from relayd.app import create_app
from relayd.cli import main
from relayd.config import ConfigError, Settings, load_settings, updated
from relayd.openapi import DEFAULT_ACTIONS, build_openapi
from relayd.routes import TABLE
from relayd.routing import Exposure
from tests.conftest import RelayFactory

PUBLIC = "https://relay.example.com"


def actions_document(**actions: Any) -> dict[str, Any]:
    settings = updated(Settings(), server={"public_url": PUBLIC}, actions=actions)
    return build_openapi(TABLE, settings, actions=True)


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, item in document["paths"].items()
        for method, op in item.items()
    }


def test_the_actions_document_passes_the_lint_and_the_validator() -> None:
    document = actions_document()
    assert lint(document) == []
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": PUBLIC}]
    assert list(document["components"]["securitySchemes"]) == ["RelayKey"]
    assert document["components"]["securitySchemes"]["RelayKey"]["scheme"] == "bearer"


def test_the_default_actions_are_a_team_gpts_toolbox() -> None:
    ids = [op["operationId"] for op in operations(actions_document()).values()]
    assert sorted(ids) == sorted(DEFAULT_ACTIONS)
    assert len(ids) <= 30


def test_the_full_document_lists_every_route_once_and_validates() -> None:
    settings = updated(Settings(), server={"public_url": PUBLIC})
    document = build_openapi(TABLE, settings, actions=False)
    validate(document)
    ops = operations(document)
    assert set(ops) == {(r.method, r.path) for r in TABLE.documented()}
    ids = [op["operationId"] for op in ops.values()]
    assert len(ids) == len(set(ids))
    # Internal routes (the catch-all, /metrics) are served but deliberately undocumented.
    assert all(r.exposure is Exposure.INTERNAL for r in TABLE if r not in TABLE.documented())


def test_wrapper_bodies_and_answers_have_schemas() -> None:
    document = build_openapi(TABLE, Settings(), actions=False)
    ops = operations(document)
    for route in TABLE:
        if route.request_schema is None:
            continue
        body = ops[(route.method, route.path)]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"].startswith("#/components/schemas/"), route.path
    answer = ops[("POST", "/v1/actions/responses")]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ActionAnswer"
    }
    refs = document["components"]["schemas"]["ImageEditRequest"]["properties"]
    assert refs["openaiFileIdRefs"] == {
        "type": "array",
        "maxItems": 10,
        "items": {"type": "string"},
        "description": refs["openaiFileIdRefs"]["description"],
    }


def test_every_actions_candidate_decides_consequential() -> None:
    for route in TABLE:
        if route.exposure is Exposure.ACTIONS:
            assert route.consequential is not None, route.operation_id
            assert len(route.summary) <= 300
            assert route.description is None or len(route.description) <= 300


def test_the_actions_subset_is_configurable(tmp_path: Path) -> None:
    document = actions_document(operations=("ping", "proxyRequest"), auth="header")
    assert {op["operationId"] for op in operations(document).values()} == {"ping", "proxyRequest"}
    assert document["components"]["securitySchemes"] == {
        "RelayKey": {
            "type": "apiKey",
            "in": "header",
            "name": "X-Relay-Key",
            "description": "A relay key.",
        }
    }
    assert lint(document) == []
    with pytest.raises(ConfigError, match="not offered to Actions"):
        create_app(updated(Settings(), actions={"operations": ("listFiles",)}))
    with pytest.raises(ConfigError, match="not an operationId"):
        actions_document(operations=("noSuchThing",))
    config = tmp_path / "relayd.toml"
    names = ", ".join(f'"op{i}"' for i in range(31))
    config.write_text(f"[actions]\noperations = [{names}]\n")
    with pytest.raises(ConfigError, match="at most 30"):
        load_settings(config, {}, require_upstream_key=False)


FORGED = {
    "Host": "rebind.attacker.example",
    "X-Forwarded-Host": "fwd.attacker.example",
    "X-Forwarded-Proto": "http",
    "Forwarded": 'for=192.0.2.1;host="fwdd.attacker.example";proto=http',
}


@pytest.mark.parametrize("trusted", [(), ("127.0.0.1",)])
@pytest.mark.parametrize("path", ["/openapi.actions.json", "/openapi.json"])
async def test_served_documents_never_reflect_the_host_header(
    relay_factory: RelayFactory, path: str, trusted: tuple[str, ...]
) -> None:
    # Issue 11, item 7: only RELAYD_PUBLIC_URL names the server; never Host, and
    # (issue 13) not what a trusted front proxy forwards either: it names the client only.
    relay = await relay_factory(server={"public_url": PUBLIC, "trusted_proxies": trusted})
    text = await (await relay.get(path, headers=FORGED)).text()
    assert "attacker" not in text
    assert json.loads(text)["servers"] == [{"url": PUBLIC}]


@pytest.mark.parametrize("path", ["/openapi.actions.json", "/openapi.json"])
async def test_without_a_public_url_the_documents_say_so_instead_of_guessing(
    relay: TestClient, path: str
) -> None:
    text = await (await relay.get(path, headers=FORGED)).text()
    assert "attacker" not in text and str(relay.port) not in text
    document = json.loads(text)
    (server,) = document["servers"]
    assert server["url"] == "/"
    assert "RELAYD_PUBLIC_URL" in server["description"]
    assert "RELAYD_PUBLIC_URL" in document["info"]["description"]
    validate(document)  # a relative server is valid OpenAPI (3.1 §4.8.5)
    if path == "/openapi.actions.json":  # the GPT builder would refuse it, and says why
        assert "Could not find a valid URL in `servers`" in [str(v) for v in lint(document)]


@pytest.mark.parametrize("public_url", [None, PUBLIC])
async def test_ai_plugin_names_the_public_url_or_a_relative_one(
    relay_factory: RelayFactory, public_url: str | None
) -> None:
    relay = await relay_factory(server={"public_url": public_url})
    text = await (await relay.get("/.well-known/ai-plugin.json", headers=FORGED)).text()
    assert "attacker" not in text
    expected = f"{public_url or ''}/openapi.actions.json"
    assert json.loads(text)["api"]["url"] == expected


async def test_served_documents_match_the_builder(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(server={"public_url": PUBLIC})
    served = await (await relay.get("/openapi.actions.json")).json()
    assert served == actions_document()


def _broken() -> dict[str, Any]:
    document = copy.deepcopy(actions_document())
    document["openapi"] = "3.0.1"
    del document["info"]["title"]
    document["servers"] = [{"url": "http://relay.example.com"}, {"url": "https://other.example"}]
    document["components"]["securitySchemes"]["Other"] = {"type": "http", "scheme": "basic"}
    document["components"]["schemas"]["Loop"] = {
        "type": "object",
        "properties": {"self": {"$ref": "#/components/schemas/Loop"}},
    }
    document["components"]["schemas"]["Bare"] = {"type": "object"}
    ops = operations(document)
    ask = ops[("POST", "/v1/actions/responses")]
    ask["description"] = "x" * 321
    ask["summary"] = "y" * 301
    del ask["x-openai-isConsequential"]
    poll = ops[("GET", "/v1/actions/responses/{response_id}")]
    poll["parameters"] = [{"$ref": "#/components/parameters/x"}]
    del ops[("POST", "/v1/proxy")]["operationId"]
    ops[("GET", "/v1/actions/relay_info")]["operationId"] = "createActionResponse"
    ops[("POST", "/v1/actions/images/edits")]["operationId"] = "edit image!"
    document["components"]["schemas"]["ImageEditRequest"]["properties"]["openaiFileIdRefs"] = {
        "type": "array",
        "items": {"type": "object", "properties": {}},
    }
    content = ops[("GET", "/v1/actions/files/{file_id}/content")]
    content["parameters"][0]["description"] = "z" * 701
    for i in range(30):
        document["paths"][f"/extra/{i}"] = {
            "get": {
                "operationId": f"extra{i}",
                "x-openai-isConsequential": False,
                "responses": {"200": {"description": "ok"}},
            }
        }
    document["paths"]["no-slash"] = {}
    return document


EXPECTED = [
    "('openapi',): Input should be '3.1.1' or '3.1.0'",
    "('info', 'title'): field required",
    "Multiple servers found, using https://other.example",
    "Found multiple hostnames, dropping http://relay.example.com",
    "Components section contains a circular dependency",
    "Found multiple security schemes, only 1 is supported",
    "createActionResponse.description has length 321 exceeding limit of 300",
    "createActionResponse.summary has length 301 exceeding limit of 300",
    "createActionResponse does not set x-openai-isConsequential",
    "parameter {'$ref': '#/components/parameters/x'} has missing or non-string name; skipping",
    "getActionResponse: skipping function due to errors",
    "In path /v1/proxy, method post is missing operationId; skipping",
    "operationId createActionResponse is used more than once",
    "operationId 'edit image!' must be 1 to 64 ASCII letters",
    "openaiFileIdRefs must be declared as an array of strings",
    "getFileContentAction.file_id.description has length 701 exceeding limit of 700",
    "OpenAPI spec can have a maximum of 30 operations",
    "Path no-slash does not start with a slash; skipping",
    "object schema missing properties in #/components/schemas/Bare",
]


def test_the_lint_names_each_broken_rule_in_the_builders_words() -> None:
    messages = [str(v) for v in lint(_broken())]
    for expected in EXPECTED:
        assert any(expected in m for m in messages), (expected, messages)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.__setitem__("servers", []), "Could not find a valid URL in `servers`"),
        (
            lambda d: d["components"].pop("schemas"),
            "In components section, schemas subsection is not an object",
        ),
        (lambda d: d.__setitem__("security", {"RelayKey": []}), "Input should be a valid list"),
    ],
    ids=["no-server", "no-schemas", "security-not-a-list"],
)
def test_the_lint_catches_structural_mistakes(mutate: Any, expected: str) -> None:
    document = copy.deepcopy(actions_document())
    mutate(document)
    assert expected in [str(v) for v in lint(document)]


def test_cli_check_passes_relayds_document_and_fails_a_broken_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("RELAYD_CONFIG", "RELAYD_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RELAYD_PUBLIC_URL", PUBLIC)
    assert main(["openapi", "--actions", "--check"]) == 0
    broken = tmp_path / "actions.json"
    broken.write_text(json.dumps(_broken()))
    assert main(["openapi", "--actions", "--check", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "OpenAPI spec can have a maximum of 30 operations" in out
    assert "('openapi',): Input should be '3.1.1' or '3.1.0'" in out
    monkeypatch.delenv("RELAYD_PUBLIC_URL")
    assert main(["openapi", "--actions", "--check"]) == 1  # no https server to name
    assert "Could not find a valid URL in `servers`" in capsys.readouterr().out


def test_cli_prints_the_actions_document(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RELAYD_CONFIG", raising=False)
    monkeypatch.setenv("RELAYD_PUBLIC_URL", PUBLIC)
    assert main(["openapi", "--actions"]) == 0
    assert json.loads(capsys.readouterr().out) == actions_document()
