"""exo's wire API on shoal's node: the adapter's translations table by table (documents exo
produces parse; shoal's documents carry every key exo's clients read), /state/{path}, CORS on
and off, the bench route against the live node, and two loopback nodes driven through
/place_instance, /instance/await, /state/instances/{id}, /bench/chat/completions and DELETE.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from documents import undeclared
from fastapi.testclient import TestClient

from shoal.api.app import create_app
from shoal.api.cluster import walk
from shoal.api.exo import Timing, generation_stats
from shoal.api.models import catalog_row
from shoal.cluster.view import ClusterView, state_document
from shoal.config import RunSettings, StartupError, add_run_flags, parse_origins, settings_from
from shoal.models.bundled import BUNDLED_MODEL_ID
from shoal.models.cards import default_card
from shoal.placement.plan import instance_document, parse_instance_document, runner_of
from shoal.schema.documents import StateDocument
from shoal.schema.exo import (
    InstanceBody,
    downloads_of,
    exo_instance,
    meta_name,
    model_card,
    posted_choices,
    posted_instance_id,
    runner_tagged,
)
from shoal.schema.exo_state import exo_topology, node_maps, parse_multiaddr
from shoal.schema.report import (
    DownloadState,
    GpuInfo,
    HeldModel,
    InstanceSpec,
    InterfaceInfo,
    InterfaceKind,
    NodeReport,
    PathStats,
    Resources,
    RunnerState,
    StoreState,
)

from test_instances import MODEL, Pair
from waiting import wait_for

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
T0 = 1000.0
NS = "ns"

# ---- fixtures of the pure tests: two nodes on a cable, one model held, one downloading -----

HELD = HeldModel(
    model_id="org/llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3,
    head_dim=64, weight_bytes=270 << 20, context_length=8192, arch="llama",
    backends=("gloo", "nccl"),
)  # fmt: skip
PULLING = DownloadState(
    model_id="org/big", bytes_total=1000, bytes_done=250, files_total=4, files_done=1,
    started_at=T0 - 10,
)  # fmt: skip
BROKEN = DownloadState(model_id="org/gone", status="failed", error="HTTP 404")


def node(node_id: str, **kw: Any) -> NodeReport:
    kw.setdefault("name", node_id)
    return NodeReport(node_id=node_id, boot_id="boot-" + node_id, boot_started=100.0, seq=1,
                      namespace_hash=NS, api_port=52415, sent_at=T0, **kw)  # fmt: skip


A = node(
    "a",
    version="1.2",
    resources=Resources(
        ram_total=64 << 30,
        ram_available=40 << 30,
        cpu_count=8,
        cpu_percent=25.0,
        device="Mac16,9 · Apple M4 Max",
    ),  # fmt: skip
    interfaces=(
        InterfaceInfo(name="en2", kind=InterfaceKind.THUNDERBOLT, addresses=("10.0.0.1/30",)),
    ),  # fmt: skip
    links=(
        PathStats(
            peer_node_id="b",
            peer_addr="10.0.0.2",
            local_addr="10.0.0.1",
            last_success=T0 - 0.5,
            rtt_ms_ewma=0.4,
            interface_kind=InterfaceKind.THUNDERBOLT,
        ),
    ),  # fmt: skip
    models=(HELD,),
    store=StoreState(disk_total=2 << 40, disk_free=1 << 40, downloads=(PULLING, BROKEN)),
)
B = node(
    "b",
    resources=Resources(
        ram_total=32 << 30, ram_available=8 << 30, gpus=(GpuInfo(name="NVIDIA L4", backend="cuda"),)
    ),  # fmt: skip
    interfaces=(
        InterfaceInfo(name="wlan0", kind=InterfaceKind.WIFI, addresses=("192.168.1.7/24",)),
    ),  # fmt: skip
    links=(
        PathStats(
            peer_node_id="a",
            peer_addr="10.0.0.1",
            local_addr="10.0.0.2",
            last_success=T0 - 0.5,
            rtt_ms_ewma=0.5,
        ),
    ),  # fmt: skip
)
SPEC = InstanceSpec(
    instance_id="i-1", model_id="org/llama", sharding="pipeline", backend="jaccl",
    engine="mlx", meta="MlxJacclInstance", nodes=("a", "b"), layer_ranges=((0, 20), (20, 30)),
    store_address="10.0.0.1", store_port=41234, rank_addresses=("10.0.0.1", "10.0.0.2"),
    rank_interfaces=("en2", None), rdma_devices=((None, "rdma_en2"), ("rdma_en3", None)),
)  # fmt: skip


def shoal_state() -> dict[str, Any]:
    """/state as the route builds it for these two nodes, seen from a."""
    view = ClusterView("a", NS, self_boot_id="boot-a")
    assert view.accept(B, T0)
    doc = state_document(view, A, T0)
    doc["topology"] = exo_topology(doc["topology"])
    doc |= node_maps([A, B])
    runners = {
        runner_of(SPEC, 0): RunnerState(runner_id=runner_of(SPEC, 0), instance_id="i-1",
                                        status="ready", port=9000),
        runner_of(SPEC, 1): RunnerState(runner_id=runner_of(SPEC, 1), instance_id="i-1",
                                        rank=1, status="loading", layers=(4, 10)),
    }  # fmt: skip
    cards = {"org/llama": model_card("org/llama", HELD)}
    doc["instances"] = {"i-1": exo_instance(instance_document(SPEC, runners), SPEC, cards)}
    doc["runners"] = {rid: {**s.model_dump(), **runner_tagged(s)} for rid, s in runners.items()}
    served = StateDocument.model_validate(doc).model_dump(mode="json", by_alias=True)
    return json.loads(json.dumps(served))


# ---- the adapter: shoal's documents have every key exo's clients read ------------------------

R0, R1 = "i-1-g0-r0", "i-1-g0-r1"
# (path, what is there): the reads of exo's bench harness and dashboard
EXO_READS = {
    "topology_nodes_are_ids": ("topology/nodes", ["a", "b"]),
    "edge_sink_address": (
        "topology/connections/a/b/0/sinkMultiaddr/address", "/ip4/10.0.0.2/tcp/52415"),
    "edge_sink_ip": ("topology/connections/b/a/0/sinkMultiaddr/ip_address", "10.0.0.1"),
    "edge_keeps_the_rtt": ("topology/connections/a/b/0/rttMs", 0.4),
    "identity_model": ("nodeIdentities/a/modelId", "Mac16,9"),
    "identity_chip": ("nodeIdentities/a/chipId", "Apple M4 Max"),
    "identity_chip_of_a_gpu_box": ("nodeIdentities/b/chipId", "NVIDIA L4"),
    "friendly_name": ("nodeIdentities/b/friendlyName", "b"),
    "ram_total": ("nodeMemory/a/ramTotal/inBytes", 64 << 30),
    "ram_available": ("nodeMemory/b/ramAvailable/inBytes", 8 << 30),
    "disk_available": ("nodeDisk/a/available/inBytes", 1 << 40),
    "system_cpu_share": ("nodeSystem/a/pcpuUsage", 0.25),
    "network_interface_type": ("nodeNetwork/b/interfaces/0/interfaceType", "wifi"),
    "network_ip": ("nodeNetwork/a/interfaces/0/ipAddress", "10.0.0.1"),
    "download_completed_card": (
        "downloads/a/0/DownloadCompleted/shardMetadata/PipelineShardMetadata/modelCard/modelId",
        "org/llama"),
    "download_completed_size": ("downloads/a/0/DownloadCompleted/total/inBytes", 270 << 20),
    "download_ongoing": ("downloads/a/1/DownloadOngoing/downloadProgress/downloadedBytes/inBytes",
                         250),
    "download_failed": ("downloads/a/2/DownloadFailed/errorMessage", "HTTP 404"),
    "instance_id": ("instances/i-1/MlxJacclInstance/instanceId", "i-1"),
    "assignment_model": ("instances/i-1/MlxJacclInstance/shardAssignments/modelId", "org/llama"),
    "assignment_runner": (
        "instances/i-1/MlxJacclInstance/shardAssignments/nodeToRunner/b", R1),
    "assignment_card_layers": (
        f"instances/i-1/MlxJacclInstance/shardAssignments/runnerToShard/{R1}/"
        "PipelineShardMetadata/modelCard/nLayers", 30),
    "assignment_shard_start": (
        f"instances/i-1/MlxJacclInstance/shardAssignments/runnerToShard/{R1}/"
        "PipelineShardMetadata/startLayer", 20),
    "jaccl_devices": ("instances/i-1/MlxJacclInstance/jacclDevices/0/1", "rdma_en2"),
    "jaccl_coordinator": ("instances/i-1/MlxJacclInstance/jacclCoordinators/b", "10.0.0.1:41234"),
    "ephemeral_port": ("instances/i-1/MlxJacclInstance/ephemeralPort", 41234),
    "shoal_keys_stay": ("instances/i-1/MlxJacclInstance/nodeToRunner/a", R0),
    "runner_ready_tag": (f"runners/{R0}/RunnerReady", {"prefillServerPort": None}),
    "runner_loading_tag": (f"runners/{R1}/RunnerLoading", {"layersLoaded": 4, "totalLayers": 10}),
    "runner_keeps_shoal_status": (f"runners/{R1}/status", "loading"),
}  # fmt: skip


@pytest.mark.parametrize(("path", "value"), EXO_READS.values(), ids=EXO_READS)
def test_shoal_state_has_every_key_exos_clients_read(path: str, value: Any) -> None:
    assert walk(shoal_state(), path) == value


def test_shoal_state_declares_everything_it_writes() -> None:
    state = shoal_state()
    assert undeclared(StateDocument.model_validate(state)) == []
    runners = state["runners"]
    assert [k for k in runners[R0] if k.startswith("Runner")] == ["RunnerReady"]  # one tag only


def test_an_edge_without_a_sink_address_is_no_exo_edge() -> None:
    old = {"nodes": [{"nodeId": "a"}], "connections": [
        {"localNodeId": "a", "sendBackNodeId": "b", "sendBackMultiaddr": None}]}  # fmt: skip
    assert exo_topology(old) == {"nodes": ["a"], "connections": {}}


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("/ip4/10.0.0.2/tcp/52415", ("ip4", "10.0.0.2", 52415)),
        ("/ip6/fe80::1/tcp/80", ("ip6", "fe80::1", 80)),
        ("/ip4/10.0.0.2", ("ip4", "10.0.0.2", 0)),
        ("/dns/mac.local/tcp/1", ("dns", "mac.local", 1)),
        ("10.0.0.2:52415", None),
        ("", None),
        (None, None),
    ],
)
def test_multiaddr(text: str | None, parts: tuple | None) -> None:
    found = parse_multiaddr(text)
    assert (found and (found.address_type, found.ip_address, found.port)) == parts


@pytest.mark.parametrize(
    ("status", "extra", "tagged"),
    [
        ("idle", {}, {"RunnerIdle": {}}),
        ("connecting", {}, {"RunnerConnecting": {}}),
        ("loading", {"layers": (3, 15)}, {"RunnerLoading": {"layersLoaded": 3, "totalLayers": 15}}),
        ("loading", {}, {"RunnerLoading": {"layersLoaded": 0, "totalLayers": 0}}),
        ("warming", {}, {"RunnerWarmingUp": {}}),
        ("ready", {}, {"RunnerReady": {"prefillServerPort": None}}),
        ("running", {}, {"RunnerRunning": {}}),
        ("failed", {"reason": "OOM"}, {"RunnerFailed": {"errorMessage": "OOM", "diagnostics": []}}),
        ("stopped", {}, {"RunnerShutdown": {}}),
        ("paused", {}, {"RunnerPaused": {}}),  # a status exo has no tag for keeps its word
    ],
)
def test_runner_status_in_exos_tagged_form(status: str, extra: dict, tagged: dict) -> None:
    assert runner_tagged(RunnerState(runner_id="r", instance_id="i", status=status, **extra)) == (
        tagged
    )


def test_downloads_of_a_node_without_a_store_are_its_held_models() -> None:
    (only,) = downloads_of(node("c", models=(HELD,)))
    card = only["DownloadCompleted"]["shardMetadata"]["PipelineShardMetadata"]["modelCard"]
    assert (card["modelId"], card["nLayers"], card["supportsTensor"]) == ("org/llama", 30, True)
    assert node_maps([node("c")])["nodeDisk"] == {}  # no store: no disk entry


def test_ongoing_download_progress_has_speed_and_eta() -> None:
    (ongoing, _) = downloads_of(A)[1:]
    progress = ongoing["DownloadOngoing"]["downloadProgress"]
    assert progress["speed"] == 25.0 and progress["etaMs"] == 30_000  # 250 B in 10 s, 750 left
    assert (progress["completedFiles"], progress["totalFiles"]) == (1, 4)


# ---- the adapter: documents exo produces parse -----------------------------------------------

EXO_CARD = {
    "modelId": "mlx-community/Llama-3.2-1B-Instruct-4bit",
    "storageSize": {"inBytes": 1},
    "nLayers": 16,
    "hiddenSize": 2048,
    "supportsTensor": True,
    "tasks": ["TextGeneration"],
}


def exo_shard(rank: int, start: int, end: int, kind: str = "PipelineShardMetadata") -> dict:
    return {kind: {"modelCard": EXO_CARD, "deviceRank": rank, "worldSize": 2,
                   "startLayer": start, "endLayer": end, "nLayers": 16}}  # fmt: skip


def exo_instance_doc(**body: Any) -> dict[str, Any]:
    """An MlxRingInstance as exo's /instance/placement answers it (rank 1 listed first)."""
    base = {
        "instanceId": "6b1f0c3e-4a58-4f0e-9b39-3f6f3f1c2a10",
        "shardAssignments": {
            "modelId": EXO_CARD["modelId"],
            "nodeToRunner": {"n2": "r-2", "n1": "r-1"},
            "runnerToShard": {"r-2": exo_shard(1, 8, 16), "r-1": exo_shard(0, 0, 8)},
        },
        "hostsByNode": {"n1": [{"ip": "0.0.0.0", "port": 5000}]},
        "ephemeralPort": 5000,
    }
    return {"MlxRingInstance": base | body}


def test_an_instance_exo_places_parses() -> None:
    doc = exo_instance_doc()
    model = EXO_CARD["modelId"]
    assert posted_choices(doc) == ("MlxRingInstance", model, "pipeline", ["n1", "n2"])
    assert parse_instance_document(doc) == (model, "pipeline", "MlxRingInstance", ["n1", "n2"])
    assert posted_instance_id(doc) == "6b1f0c3e-4a58-4f0e-9b39-3f6f3f1c2a10"
    body = InstanceBody.model_validate(doc["MlxRingInstance"])  # what shoal's tools read
    assert body.node_to_runner == {"n2": "r-2", "n1": "r-1"} and body.model_id == model
    assert body.shard("r-2").start_layer == 8 and body.shard("r-2").model_card.n_layers == 16


def test_an_exo_instance_naming_its_model_only_in_the_cards_parses() -> None:
    doc = exo_instance_doc()
    del doc["MlxRingInstance"]["shardAssignments"]["modelId"]
    assert posted_choices(doc)[1] == EXO_CARD["modelId"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"instanceId": "has space"}, "instanceId must be"),
        ({"instanceId": 7}, "instanceId must be"),
        ({"instanceId": "x" * 129}, "instanceId must be"),
    ],
)
def test_a_bad_posted_instance_id_is_refused(body: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        posted_instance_id(exo_instance_doc(**body))


def test_a_bad_exo_shard_is_named_by_its_wire_path() -> None:
    doc = exo_instance_doc()
    doc["MlxRingInstance"]["shardAssignments"]["runnerToShard"]["r-1"] = {
        "PipelineShardMetadata": {"modelCard": EXO_CARD, "deviceRank": "0"}}  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"instance\.MlxRingInstance\.shardAssignments\."
        r"runnerToShard\.r-1\.PipelineShardMetadata\.deviceRank",
    ):
        posted_choices(doc)  # fmt: skip


def test_exos_state_parses() -> None:
    """A /state as exo's node serves it (shapes of exo main)."""
    exo_state = {
        "instances": {"i": exo_instance_doc()},
        "runners": {"r-1": {"RunnerReady": {"prefillServerPort": None}},
                    "r-2": {"RunnerFailed": {"errorMessage": "boom", "diagnostics": []}}},
        "downloads": {"n1": [{"DownloadCompleted": {"nodeId": "n1", "total": {"inBytes": 5},
                                                    "shardMetadata": exo_shard(0, 0, 16)}}]},
        "topology": {"nodes": ["n1", "n2"], "connections": {"n1": {"n2": [
            {"sinkMultiaddr": {"address": "/ip4/10.0.0.2/tcp/52415", "address_type": "ip4",
                               "ip_address": "10.0.0.2", "port": 52415}},
            {"sourceRdmaIface": "rdma_en2", "sinkRdmaIface": "rdma_en3"}]}}},
        "nodeIdentities": {"n1": {"modelId": "Mac16,9", "chipId": "Apple M4 Max",
                                  "friendlyName": "studio", "osVersion": "26.2"}},
        "nodeMemory": {"n1": {"ramTotal": {"inBytes": 8}, "ramAvailable": {"inBytes": 4},
                              "swapTotal": {"inBytes": 0}, "swapAvailable": {"inBytes": 0}}},
        "nodeDisk": {"n1": {"total": {"inBytes": 9}, "available": {"inBytes": 3}}},
        "nodeSystem": {"n1": {"gpuUsage": 0.5, "temp": 40.0, "sysPower": 12.0}},
        "lastEventAppliedIdx": 41,
    }  # fmt: skip
    state = StateDocument.model_validate(exo_state)
    assert state.runners["r-1"].runner_ready == {"prefillServerPort": None}
    assert state.runners["r-2"].runner_failed["errorMessage"] == "boom"
    assert state.instance_bodies()["i"].node_to_runner["n1"] == "r-1"
    edges = state.topology.connections["n1"]["n2"]
    assert edges[0].sink_multiaddr.port == 52415 and edges[1].sink_rdma_iface == "rdma_en3"
    assert state.node_memory["n1"].ram_available.in_bytes == 4
    assert state.node_disk["n1"].available.in_bytes == 3


@pytest.mark.parametrize(
    ("given", "meta"),
    [("MlxRing", "MlxRingInstance"), ("mlxjaccl", "MlxJacclInstance"),
     ("MlxRingInstance", "MlxRingInstance"), ("gloo", "gloo"), (None, None)],
)  # fmt: skip
def test_exos_instance_meta_values_name_shoals_metas(given: str | None, meta: str | None) -> None:
    assert meta_name(given) == meta


def test_catalog_row_has_exos_model_list_fields() -> None:
    row = catalog_row(default_card("org/llama"), HELD, 3 << 20)
    assert (row["name"], row["hugging_face_id"], row["storage_size_megabytes"]) == (
        "llama", "org/llama", 3)  # fmt: skip
    assert row["context_length"] == 8192 and row["supports_tensor"] and row["family"] == "llama"
    assert row["tasks"] == ["TextGeneration"] and row["is_custom"] is False


# ---- /state/{path} ---------------------------------------------------------------------------

WALKS = {
    "key": ({"a": {"b": 1}}, "a/b", 1),
    "index": ({"a": [10, 20]}, "a/1", 20),
    "slashes_collapse": ({"a": {"b": 1}}, "/a//b/", 1),
    "empty_is_all": ({"a": 1}, "", {"a": 1}),
    "null_value": ({"a": None}, "a", None),
}


@pytest.mark.parametrize(("doc", "path", "value"), WALKS.values(), ids=WALKS)
def test_walk(doc: Any, path: str, value: Any) -> None:
    assert walk(doc, path) == value


@pytest.mark.parametrize(
    ("doc", "path"),
    [({"a": 1}, "b"), ({"a": [1]}, "a/1"), ({"a": [1]}, "a/x"), ({"a": 1}, "a/b")],
)
def test_walk_past_the_document_is_a_lookup_error(doc: Any, path: str) -> None:
    with pytest.raises(LookupError):
        walk(doc, path)


# ---- CORS --------------------------------------------------------------------------------------


def cors_client(origins: str) -> TestClient:
    settings = RunSettings(cors_origins=origins)
    host = SimpleNamespace(settings=settings, ready=True, not_ready_reason="")
    return TestClient(create_app(host))


PREFLIGHT = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"}


def test_cors_is_off_by_default() -> None:
    client = cors_client("")
    assert "access-control-allow-origin" not in client.get("/health", headers=PREFLIGHT).headers
    assert client.options("/v1/chat/completions", headers=PREFLIGHT).status_code == 405


def test_cors_origins_answer_their_browsers_only() -> None:
    client = cors_client("http://localhost:5173, https://tools.example")
    ok = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    health = client.get("/health", headers={"Origin": "https://tools.example"})
    assert health.headers["access-control-allow-origin"] == "https://tools.example"
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_any_origin() -> None:
    response = cors_client("*").get("/health", headers={"Origin": "https://a.example"})
    assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    ("text", "origins"),
    [("", ()), ("*", ("*",)), ("http://a:1, https://b", ("http://a:1", "https://b"))],
)
def test_parse_origins(text: str, origins: tuple) -> None:
    assert parse_origins(text) == origins


@pytest.mark.parametrize(
    "bad", ["localhost:5173", "http://a/", "ftp://a", "http://", "https://a/x"]
)
def test_a_bad_origin_is_a_startup_error(bad: str) -> None:
    with pytest.raises(StartupError, match="is not an origin"):
        RunSettings(cors_origins=bad)


def test_cors_origins_from_the_flag_and_the_environment() -> None:
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    given = settings_from(parser.parse_args(["--cors-origins", "http://a"]), env={})
    assert given.cors_origin_list == ("http://a",)
    env = {"SHOAL_CORS_ORIGINS": "https://b,https://c"}
    from_env = settings_from(parser.parse_args([]), env=env)
    assert from_env.cors_origin_list == ("https://b", "https://c")


# ---- bench: generation stats -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timing", "tokens", "stats"),
    [
        (Timing(0.0, 0.5, 2.5), (100, 21), (200.0, 10.0)),
        (Timing(0.0, 0.5, 0.5), (100, 1), (200.0, 0.0)),  # one token: no decode rate
        (Timing(0.0), (100, 0), (0.0, 0.0)),  # nothing generated (cancelled at once)
    ],
)
def test_generation_stats(timing: Timing, tokens: tuple, stats: tuple) -> None:
    got = generation_stats(timing, *tokens, 1 << 20)
    assert (got["prompt_tps"], got["generation_tps"]) == stats
    assert (got["prompt_tokens"], got["generation_tokens"]) == tokens
    assert got["peak_memory_usage"] == {"inBytes": 1 << 20}


# ---- against the live node ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(server: Any) -> openai.OpenAI:
    """The OpenAI client on exo's bench prefix: it posts to /bench/chat/completions."""
    return openai.OpenAI(base_url=f"{server.url}/bench", api_key="none", timeout=60)


def test_bench_ignores_eos_and_measures(bench: openai.OpenAI, server: Any) -> None:
    answer = bench.chat.completions.create(
        model=BUNDLED_MODEL_ID, messages=FRANCE, max_tokens=24, temperature=0
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.usage is not None and answer.usage.completion_tokens == 24  # EOS ignored
    assert answer.id.startswith("chatcmpl-") and answer.model == BUNDLED_MODEL_ID
    stats = answer.model_extra["generation_stats"]
    assert stats["generation_tokens"] == 24 and stats["prompt_tokens"] == answer.usage.prompt_tokens
    assert stats["prompt_tps"] > 0 and stats["generation_tps"] > 0
    assert stats["peak_memory_usage"]["inBytes"] > 50 << 20  # the runner holds the model


def test_bench_stream_sends_generation_stats_before_done(server: Any) -> None:
    body = {"model": BUNDLED_MODEL_ID, "messages": FRANCE, "max_tokens": 12, "stream": True,
            "temperature": 0}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/bench/chat/completions", json=body,
                      timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    comment = lines[-2]
    assert comment.startswith(": generation_stats ")
    stats = json.loads(comment.removeprefix(": generation_stats "))
    assert stats["generation_tokens"] == 12 and stats["generation_tps"] > 0
    chunks = [json.loads(line[6:]) for line in lines[:-2]]
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    assert not any(c.get("usage") for c in chunks)  # not asked for: no usage-only chunk
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text


def test_bench_stream_with_the_openai_client_keeps_usage_when_asked(bench: openai.OpenAI) -> None:
    stream = bench.chat.completions.create(
        model=BUNDLED_MODEL_ID, messages=FRANCE, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [c.usage for c in stream if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == 8


def test_a_bench_generation_can_be_cancelled(server: Any) -> None:
    body = {"model": BUNDLED_MODEL_ID, "messages": FRANCE, "max_tokens": 400, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", f"{server.url}/bench/chat/completions", json=body,
                      timeout=60) as response:  # fmt: skip
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        command_id = json.loads(first[6:])["id"]
        cancelled = httpx.post(f"{server.url}/v1/cancel/{command_id}", timeout=10)
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json() == {"message": "Command cancelled.", "command_id": command_id}
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and rest[-2].startswith(": generation_stats ")
    assert len(rest) < 300 and time.monotonic() - started < 30  # ended early, not at 400
    again = httpx.post(f"{server.url}/v1/cancel/{command_id}", timeout=10)
    assert again.status_code == 404 and again.json()["error"]["code"] == "command_not_found"
    # the node keeps serving
    after = httpx.post(f"{server.url}/bench/chat/completions", timeout=60, json={
        "model": BUNDLED_MODEL_ID, "messages": FRANCE, "max_tokens": 4})  # fmt: skip
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": BUNDLED_MODEL_ID}, 400, None, "messages"),
        ({"model": BUNDLED_MODEL_ID, "messages": FRANCE, "max_tokens": "8"}, 400, None,
         "max_tokens"),
        ({"model": "nobody/serves-this", "messages": FRANCE}, 404, "model_not_found", None),
        ({"model": "nobody/serves-this", "messages": FRANCE, "stream": True}, 404,
         "model_not_found", None),
    ],
)  # fmt: skip
def test_bad_bench_requests_are_4xx(
    server: Any, body: dict, status: int, code: str | None, param: str | None
) -> None:
    response = httpx.post(f"{server.url}/bench/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["code"] == code and error["param"] == param


def test_state_paths_on_the_live_node(server: Any) -> None:
    me = httpx.get(f"{server.url}/node_id").json()
    get = lambda path: httpx.get(f"{server.url}/state/{path}", timeout=10)  # noqa: E731
    assert get("topology/nodes").json() == [me]
    assert get(f"nodeIdentities/{me}/friendlyName").json()
    assert get(f"nodeMemory/{me}/ramTotal/inBytes").json() > 0
    assert get(f"nodeDisk/{me}/total/inBytes").json() > 0
    (download,) = [d for d in get(f"downloads/{me}").json() if "DownloadCompleted" in d]
    shard = download["DownloadCompleted"]["shardMetadata"]["PipelineShardMetadata"]
    assert shard["modelCard"]["modelId"] == BUNDLED_MODEL_ID
    runners = get("runners").json()
    (rid,) = [r for r, s in runners.items() if s["model_id"] == BUNDLED_MODEL_ID]
    assert {"RunnerReady", "RunnerRunning"} & set(get(f"runners/{rid}").json())
    for missing in ("nope", "topology/nodes/7", "topology/nodes/x", f"nodeIdentities/{me}/x"):
        response = get(missing)
        assert response.status_code == 404, missing
        assert response.json()["error"]["code"] == "state_path_not_found"
    whole = httpx.get(f"{server.url}/state").json()
    assert get("nodeSystem").json() == whole["nodeSystem"]  # the same document, walked


def test_models_rows_carry_exos_catalog_fields(server: Any) -> None:
    rows = httpx.get(f"{server.url}/models").json()["data"]
    (row,) = [r for r in rows if r["id"] == BUNDLED_MODEL_ID]
    assert row["hugging_face_id"] == BUNDLED_MODEL_ID and row["name"]
    assert row["storage_size_megabytes"] > 50 and row["held"] is True and row["card"]
    downloaded = httpx.get(f"{server.url}/models?status=downloaded").json()["data"]
    assert [r["id"] for r in downloaded] == [r["id"] for r in rows if r["held"]]
    bad = httpx.get(f"{server.url}/models?status=everything")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


def test_events_are_the_nodes_history(server: Any) -> None:
    events = httpx.get(f"{server.url}/events", timeout=10).json()
    assert isinstance(events, list)
    assert all({"at", "kind", "message"} <= set(e) for e in events)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)


def test_await_needs_a_model_and_times_out_with_exos_message(server: Any) -> None:
    assert httpx.get(f"{server.url}/instance/await", timeout=10).status_code == 400
    url = f"{server.url}/instance/await?model_id=nobody/here&timeout_seconds=0.5"
    with httpx.stream("GET", url, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == ": keep-alive"
    assert json.loads(lines[-1][6:]) == {
        "type": "timeout", "message": "No ready instance of nobody/here within 0.5 s."}  # fmt: skip


# ---- two nodes on loopback -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = Pair(tmp_path_factory.mktemp("exo-pair"), port=52745)
    try:
        p.start_both(timeout=90)
        yield p
    finally:
        p.stop()


def await_ready(pair: Pair, name: str, instance_id: str, timeout: float) -> dict[str, Any]:
    url = pair.url(name, f"/instance/await?instance_id={instance_id}&timeout_seconds={timeout}")
    with httpx.stream("GET", url, timeout=timeout + 30) as response:
        assert response.status_code == 200
        data = [line for line in response.iter_lines() if line.startswith("data: ")]
    (message,) = data
    return json.loads(message[6:])


@pytest.mark.timeout(400)
def test_two_nodes_through_exos_api(pair: Pair) -> None:
    ask = {"model_id": MODEL, "sharding": "Pipeline", "instance_meta": "", "min_nodes": 2}
    placed = httpx.post(pair.url("b", "/place_instance"), json=ask, timeout=30)
    assert placed.status_code == 200, placed.text
    answer = placed.json()
    assert answer["message"] == "Command received." and answer["command_id"]
    assert answer["model_card"]["modelId"] == MODEL and answer["model_card"]["nLayers"] == 30
    iid = answer["instance_id"]

    ready = await_ready(pair, "a", iid, timeout=200)
    assert ready["type"] == "ready", (ready, pair.log())
    ((meta, body),) = ready["instance"].items()
    assert body["instanceId"] == iid and len(body["shardAssignments"]["nodeToRunner"]) == 2

    for name in ("a", "b"):
        seen = await_ready(pair, name, iid, timeout=30)  # each node's view, ready by now
        assert seen["type"] == "ready" and list(seen["instance"]) == [meta], seen
        doc = pair.json(name, f"/state/instances/{iid}")
        assert doc is not None and list(doc) == [meta]
        assignments = doc[meta]["shardAssignments"]
        assert assignments["modelId"] == MODEL
        shards = [next(iter(s.values())) for s in assignments["runnerToShard"].values()]
        assert sorted(s["deviceRank"] for s in shards) == [0, 1]
        assert {s["modelCard"]["modelId"] for s in shards} == {MODEL}
        assert sorted((s["startLayer"], s["endLayer"]) for s in shards)[-1][1] == 30
        for rid in assignments["nodeToRunner"].values():
            runner = pair.json(name, f"/state/runners/{rid}")
            assert runner is not None and {"RunnerReady", "RunnerRunning"} & set(runner), runner

    bench = httpx.post(pair.url("b", "/bench/chat/completions"), timeout=120, json={
        "model": MODEL, "messages": FRANCE, "max_tokens": 16, "temperature": 0})  # fmt: skip
    assert bench.status_code == 200, bench.text
    stats = bench.json()["generation_stats"]
    assert stats["generation_tokens"] == 16 and stats["generation_tps"] > 0
    assert "Paris" in bench.json()["choices"][0]["message"]["content"]

    deleted = httpx.delete(pair.url("a", f"/instance/{iid}"), timeout=30)
    assert deleted.status_code == 200, deleted.text
    wait_for("the instance to leave both nodes' state", lambda: all(
        pair.get(n, f"/state/instances/{iid}").status_code == 404 for n in ("a", "b")),
        timeout=20)  # fmt: skip


def test_an_exo_shaped_post_keeps_its_instance_id(pair: Pair) -> None:
    placement = pair.json("a", f"/instance/placement?model_id={MODEL}&min_nodes=2")
    assert placement is not None
    ((meta, body),) = placement.items()
    exo_body = {  # only exo's keys: the runners under shardAssignments
        "instanceId": "exo-posted-1",
        "shardAssignments": body["shardAssignments"],
        "hostsByNode": body["hostsByNode"],
        "ephemeralPort": body["ephemeralPort"],
    }
    posted = httpx.post(pair.url("b", "/instance"), json={"instance": {meta: exo_body}},
                        timeout=30)  # fmt: skip
    assert posted.status_code == 200, posted.text
    assert posted.json()["instance_id"] == "exo-posted-1"
    try:
        wait_for("the posted instance in a's plan", lambda: pair.json(
            "a", "/state/instances/exo-posted-1") is not None, timeout=20)  # fmt: skip
        doc = pair.json("a", "/state/instances/exo-posted-1")
        assert doc is not None and doc[meta]["instanceId"] == "exo-posted-1"
        again = httpx.post(pair.url("a", "/instance"), json={"instance": {meta: exo_body}},
                           timeout=30)  # fmt: skip
        assert again.status_code == 409 and again.json()["error"]["code"] == "instance_exists"
    finally:
        httpx.delete(pair.url("a", "/instance/exo-posted-1"), timeout=30)
    wait_for("the posted instance gone", lambda: pair.get(
        "b", "/state/instances/exo-posted-1").status_code == 404, timeout=20)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model_id": MODEL, "min_nodes": 3}, 400, None),
        ({"model_id": MODEL, "instance_meta": "MlxIbv"}, 400, "instance_meta"),
        ({"model_id": MODEL, "min_nodes": "2"}, 400, "min_nodes"),
        ({"min_nodes": 1}, 400, "model_id"),
    ],
)
def test_bad_place_instance_is_4xx(pair: Pair, body: dict, status: int, param: str | None) -> None:
    for name in ("a", "b"):
        response = httpx.post(pair.url(name, "/place_instance"), json=body, timeout=30)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["param"] == param


def test_previews_name_metas_a_ring_or_jaccl_filter_finds(pair: Pair) -> None:
    previews = pair.json("a", f"/instance/previews?model_id={MODEL}")["previews"]
    ring = [p for p in previews if "ring" in p["instance_meta"].lower()]
    jaccl = [p for p in previews if "jaccl" in p["instance_meta"].lower()]
    assert ring and jaccl and {p["instance_meta"] for p in ring} == {"MlxRingInstance"}
    placed = [p for p in previews if p["instance"]]
    assert all(next(iter(p["instance"].values()))["shardAssignments"]["nodeToRunner"]
               for p in placed)  # fmt: skip
    exo_meta = pair.get("a", f"/instance/placement?model_id={MODEL}&instance_meta=MlxRing")
    ours = pair.get("a", f"/instance/placement?model_id={MODEL}&instance_meta=MlxRingInstance")
    assert exo_meta.status_code == ours.status_code, (exo_meta.text, ours.text)
    if ours.status_code == 200:
        assert list(exo_meta.json()) == list(ours.json()) == ["MlxRingInstance"]
