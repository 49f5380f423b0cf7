"""ops.client's typed calls against httpx.MockTransport: the documents they return, the one
error path (ApiError with the status, ApiUnreachable naming httpx's cause), per-call timeouts."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from shoal.ops.client import (
    ApiClient,
    ApiError,
    ApiUnreachable,
    cannot_reach,
    failure_text,
)
from shoal.schema.exo import InstanceBody

# What GET /instance/placement answers: the server's own wire form, unknown keys included.
PLACED = {
    "GlooInstance": InstanceBody.model_validate(
        {
            "instanceId": "i-1",
            "modelId": "org/m",
            "sharding": "Pipeline",
            "nodeToRunner": {"n1": "r1"},
            "runnerToShard": {"r1": {"PipelineShardMetadata": {"deviceRank": 0, "extra": 1}}},
            "storeAddress": "127.0.0.1:29500",
            "somethingNew": {"kept": True},
        }
    ).wire()
}


def client(handler: Any) -> ApiClient:
    return ApiClient("127.0.0.1:1", http=httpx.Client(transport=httpx.MockTransport(handler)))


def test_a_placed_document_goes_back_to_post_instance_unchanged() -> None:
    posted: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/instance/placement":
            assert request.url.params["model_id"] == "org/m"
            return httpx.Response(200, json=PLACED)
        posted.append(json.loads(request.content))
        return httpx.Response(200, json={"instance_id": "i-1"})

    api = client(answer)
    document = api.placement(model_id="org/m")
    assert document["GlooInstance"].model_id == "org/m"
    assert api.create_instance(document, allow_blocked=True) == "i-1"
    assert posted == [{"instance": PLACED, "allow_blocked": True}]


@pytest.mark.parametrize(
    ("call", "status"),
    [
        (lambda api: api.placement(model_id="org/m"), 400),
        (lambda api: api.create_instance({}), 409),
        (lambda api: api.node_id(), 404),
        (lambda api: api.instance("i-1"), 404),
        (lambda api: api.start_pull("org/m", [], "main"), 409),
        (lambda api: api.reach("127.0.0.1", 9), 401),
    ],
)
def test_an_answer_other_than_the_expected_one_is_an_api_error_with_its_status(
    call: Any, status: int
) -> None:
    api = client(lambda _: httpx.Response(status, json={"error": {"message": "no"}}))
    with pytest.raises(ApiError) as refused:
        call(api)
    assert refused.value.status == status
    assert str(refused.value).startswith(f"HTTP {status}: ")
    if status == 401:
        assert "--api-key" in str(refused.value)


def test_a_pull_started_is_a_202_and_its_progress_is_typed() -> None:
    store = {"store": {"downloads": [{"model_id": "org/m", "status": "done", "files_total": 3}]}}
    api = client(lambda r: httpx.Response(202 if r.method == "POST" else 200, json=store))
    api.start_pull("org/m", ["*.gguf"], "main")
    (download,) = api.store().downloads
    assert (download.model_id, download.status, download.files_total) == ("org/m", "done", 3)


def test_the_node_id_is_the_bare_string() -> None:
    assert client(lambda _: httpx.Response(200, json="abc123")).node_id() == "abc123"


def test_a_hashing_manifests_call_carries_its_own_timeout_and_others_the_clients() -> None:
    seen: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append({"timeout": request.extensions["timeout"], **request.url.params})
        return httpx.Response(200, json={"model": "org/m", "nodes": [], "card": {}})

    api = client(answer)
    api.manifests("org/m", ["a", "b"], hash=True, timeout=httpx.Timeout(900.0, connect=5.0))
    api.manifests("org/m")
    assert seen[0]["timeout"]["read"] == 900.0 and seen[0]["timeout"]["connect"] == 5.0
    assert (seen[0]["hash"], seen[0]["nodes"]) == ("true", "a,b")
    assert seen[1]["timeout"] == api.http.timeout.as_dict() and seen[1]["hash"] == "false"


def test_nobody_listening_is_api_unreachable_worded_with_httpxs_cause() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(ApiUnreachable) as unreachable:
        client(refuse).state()
    exc = unreachable.value
    assert exc.base == "http://127.0.0.1:1"
    assert cannot_reach(exc.base, exc) == (
        "cannot reach http://127.0.0.1:1: [Errno 111] Connection refused. "
        "start a node with `shoal run` (or `make run`)"
    )
    assert failure_text(exc) == "ConnectError: [Errno 111] Connection refused"
    assert failure_text(httpx.ReadTimeout("timed out")) == "ReadTimeout: timed out"
