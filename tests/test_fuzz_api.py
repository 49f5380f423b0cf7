"""schemathesis against the OpenAPI document a real node serves (bundled SmolLM2): every
operation gets a few generated requests, valid and invalid, under one wall-clock budget; no
answer may be a 5xx, none may hang, and the node still serves a chat afterwards."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import httpx
import pytest

from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL
from shoal.schema.anthropic import CountTokensRequest, MessagesRequest
from shoal.schema.ollama import ChatRequest, GenerateRequest, ShowRequest

from conftest import SERVER_SETTINGS, LiveServer, live_node

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
hypothesis = pytest.importorskip("hypothesis")

pytestmark = pytest.mark.timeout(300)

MAX_EXAMPLES = 6  # per operation and generation mode: ~60 operations -> a few hundred cases
BUDGET_S = 110.0  # all cases together; the rest of an operation's cases are skipped after it
CASE_TIMEOUT_S = 30.0  # one answer; longer counts as a hang
# Operations left out, and why: each would change or leave the node under test, or never end.
EXCLUDED = {
    ("POST", "/models/pull"): "downloads a model into the store (the Hub: off loopback, unbounded)",
    ("POST", "/instance"): "places an instance: starts and stops the node's runners",
    ("POST", "/place_instance"): "places an instance: starts and stops the node's runners",
    ("DELETE", "/instance/{instance_id}"): "deletes an instance, the served model's included",
    ("GET", "/instance/await"): "an event stream held open for up to timeout_seconds",
}
CLIENT_SIDE = (  # requests refuses to send what negative generation made: not the node's answer
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidJSONError,
    UnicodeError,
)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[LiveServer]:
    # Small caps keep every generated generation short (a request naming no max_tokens gets
    # at most the cap), so a few hundred cases fit the budget on two cores.
    settings = dataclasses.replace(
        SERVER_SETTINGS, max_tokens_cap=8, max_prompt_chars=2000, offline=True
    )
    with live_node(settings) as live:
        yield live


def _operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    found = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) not in EXCLUDED:
            found.append(operation)
    return found


# Routes that parse their body themselves (to answer in their API's own error shape) declare
# none in the served document; their bodies are generated from the same pydantic models.
SELF_PARSED = {
    "/v1/messages": MessagesRequest,
    "/v1/messages/count_tokens": CountTokensRequest,
    "/api/chat": ChatRequest,
    "/api/generate": GenerateRequest,
    "/api/show": ShowRequest,
}


def _self_parsed_operations() -> list:
    found = []
    for path, model in SELF_PARSED.items():  # one document each: model names may repeat
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components = {**schema.pop("$defs", {}), model.__name__: schema}
        body = {"$ref": f"#/components/schemas/{model.__name__}"}
        document = {
            "openapi": "3.1.0",
            "info": {"title": path, "version": "1"},
            "paths": {
                path: {
                    "post": {
                        "requestBody": {
                            "required": True,
                            "content": {"application/json": {"schema": body}},
                        },
                        "responses": {"200": {"description": "answered"}},
                    }
                }
            },
            "components": {"schemas": components},
        }
        found += [r.ok() for r in schemathesis.openapi.from_dict(document).get_all_operations()]
    return found


def _fuzz(
    operation, base_url: str, deadline: float, cases: dict, statuses: dict, failures: list
) -> None:
    """Up to MAX_EXAMPLES valid and MAX_EXAMPLES invalid requests to one operation."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    label = f"{operation.method.upper()} {operation.path}"
    label += " (body)" if label in cases else ""
    cases[label] = 0
    valid = operation.as_strategy(GenerationMode.POSITIVE)
    invalid = operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(
        max_examples=MAX_EXAMPLES * 2,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=valid | invalid)
    def one(case) -> None:
        if time.monotonic() > deadline:
            return
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("model"), str) and cases[label] % 2:
            body["model"] = MODEL  # every other one reaches the model, not just a 404
        try:
            response = case.call(base_url=base_url, timeout=CASE_TIMEOUT_S)
        except CLIENT_SIDE:
            return
        except requests.exceptions.RequestException as exc:  # reset, refused, timed out
            failures.append(f"{label}: no answer ({exc!r})\n  {case.as_curl_command()}")
            return
        cases[label] += 1
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append(
                f"{label}: {response.status_code} {response.text[:300]}\n  {case.as_curl_command()}"
            )

    one()


def test_no_generated_request_gets_a_5xx_or_hangs(fuzzed: LiveServer) -> None:
    operations = _operations(fuzzed.url)
    assert len(operations) > 40  # the document is served and read whole
    deadline = time.monotonic() + BUDGET_S
    cases: dict[str, int] = {}
    statuses: dict[int, int] = {}
    failures: list[str] = []
    for operation in [*operations, *_self_parsed_operations()]:
        _fuzz(operation, fuzzed.url, deadline, cases, statuses, failures)
    total = sum(cases.values())
    print(
        f"schemathesis: {total} cases, {len(cases)} operations, statuses {sorted(statuses.items())}"
    )
    assert not failures, f"{len(failures)} of {total} cases failed:\n" + "\n".join(failures[:20])
    assert statuses.get(200, 0) >= 20  # not only refusals: many reached their route's work
    assert total >= 150, f"only {total} cases ran in {BUDGET_S:.0f} s: {cases}"
    starved = [label for label, n in cases.items() if n == 0]
    assert len(starved) <= len(operations) // 4, f"operations without a case: {starved}"
    assert httpx.get(f"{fuzzed.url}/health", timeout=10).status_code == 200
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    chat = httpx.post(f"{fuzzed.base_url}/chat/completions", json=body, timeout=60)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
