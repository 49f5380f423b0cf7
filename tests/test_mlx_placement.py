"""Placement of MLX instances (MlxRingInstance, MlxJacclInstance), from tables: each node's copy
of the model names the backends it may use (its card and engines) and the layouts mlx-lm can
split it into; JACCL's RDMA device matrix comes from the nodes' interfaces on each link, and a
link without RDMA is refused by name; the memory fit counts the quantized bytes."""

from __future__ import annotations

import pytest
from test_planner import GIB, MESH, NOW, addr, cluster

from shoal.placement.plan import instance_from_placement, model_spec, parse_meta
from shoal.placement.planner import Placement, PlacementRequest, Refusal, plan
from shoal.runner.spec import node_capabilities
from shoal.schema.report import HeldModel, InterfaceInfo, InterfaceKind, NodeReport

HELD = HeldModel(
    model_id="moe", num_layers=12, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
    weight_bytes=6 * GIB, arch="qwen3_moe", backends=("gloo", "ring", "jaccl"),
    mlx_layouts=("pipeline", "tensor"), mlx_weight_bytes=GIB,
)  # fmt: skip


def nodes(mem: dict[str, float], links: list[tuple], held: dict[str, HeldModel] | None = None,
          rdma: set[str] = frozenset()) -> list[NodeReport]:  # fmt: skip
    """cluster() with each node holding the model (HELD unless given) and a /24 interface
    per node, RDMA-capable on the nodes named in rdma."""
    out = []
    for r in cluster(mem, links):
        cidr = f"{addr(r.node_id)}/24"
        iface = InterfaceInfo(name="en2", kind=InterfaceKind.THUNDERBOLT, addresses=(cidr,),
                              rdma=r.node_id in rdma)  # fmt: skip
        model = (held or {}).get(r.node_id, HELD)
        out.append(r.model_copy(update={"models": (model,), "interfaces": (iface,)}))
    return out


def ring(sharding: str = "pipeline", backend: str = "ring", min_nodes: int = 2) -> PlacementRequest:
    spec = model_spec(HELD, backend)
    return PlacementRequest(spec, sharding, backend, min_nodes=min_nodes)  # type: ignore[arg-type]


def texts(result: Placement | Refusal) -> list[str]:
    assert isinstance(result, Refusal), result
    return [r.text for r in result.reasons]


def test_a_ring_instance_places_and_runs_on_the_mlx_engine() -> None:
    reports = nodes({"a": 16, "b": 16}, MESH[:1])
    result = plan(ring(), reports, NOW)
    assert isinstance(result, Placement) and result.nodes == ("a", "b")
    instance = instance_from_placement(
        result, ring(), instance_id="i", meta="MlxRingInstance",
        reports={r.node_id: r for r in reports}, now=NOW,
    )  # fmt: skip
    assert (instance.engine, instance.backend) == ("mlx", "ring")
    assert instance.rank_addresses == ("10.0.0.1", "10.0.0.2")  # where each rank listens
    assert parse_meta("MlxRingInstance") == ("ring", "MlxRingInstance")


@pytest.mark.parametrize(
    ("name", "held", "req", "expected"),
    [
        ("a node without the MLX engine", {"b": HELD.model_copy(update={"backends": ("gloo",)})},
         ring(), "node b may not run moe over ring (its card and engines allow gloo); install "
         "the MLX engine there: pip install 'shoal[mlx]'"),
        ("a card that allows torch only",
         dict.fromkeys("ab", HELD.model_copy(update={"backends": ("gloo", "nccl")})),
         ring(), "may not run moe over ring"),
        ("an architecture mlx-lm cannot pipeline",
         dict.fromkeys("ab", HELD.model_copy(update={"arch": "gemma", "mlx_layouts": ("tensor",)})),
         ring(), "mlx-lm on node a cannot run gemma as pipeline; it can run as tensor"),
        ("an architecture mlx-lm cannot shard",
         dict.fromkeys("ab", HELD.model_copy(update={"mlx_layouts": ("pipeline",)})),
         ring("tensor"), "cannot run qwen3_moe as tensor; it can run as pipeline"),
    ],
)  # fmt: skip
def test_refusals_name_the_node_and_what_it_lacks(name, held, req, expected) -> None:
    result = plan(req, nodes({"a": 16, "b": 16}, MESH[:1], held), NOW)
    assert any(expected in text for text in texts(result)), texts(result)


def test_a_torch_request_is_refused_where_the_card_allows_mlx_only() -> None:
    only_mlx = dict.fromkeys("ab", HELD.model_copy(update={"backends": ("ring",)}))
    req = PlacementRequest(model_spec(HELD), "pipeline", "gloo", min_nodes=2)
    assert any(
        "may not run moe over gloo" in t
        for t in texts(plan(req, nodes({"a": 16, "b": 16}, MESH[:1], only_mlx), NOW))
    )


def test_the_mlx_memory_fit_counts_the_quantized_bytes() -> None:
    # 6 GiB as float32 on torch does not fit 3 GiB nodes; 1 GiB of 4-bit weights on mlx does
    reports = nodes({"a": 3, "b": 3}, MESH[:1])
    torch_req = PlacementRequest(model_spec(HELD, "gloo"), "pipeline", "gloo", min_nodes=2)
    assert any("needs" in t for t in texts(plan(torch_req, reports, NOW)))
    assert isinstance(plan(ring(), reports, NOW), Placement)
    assert model_spec(HELD, "ring").weight_bytes == GIB


def test_jaccl_takes_each_links_rdma_device() -> None:
    reports = nodes({"a": 16, "b": 16, "c": 16}, MESH, rdma={"a", "b", "c"})
    result = plan(ring(backend="jaccl", min_nodes=3), reports, NOW)
    assert isinstance(result, Placement), result
    n = len(result.nodes)
    assert [[result.rdma_devices[i][j] is None for j in range(n)] for i in range(n)] == [
        [i == j for j in range(n)] for i in range(n)
    ]
    assert {d for row in result.rdma_devices for d in row if d} == {"rdma_en2"}


def test_jaccl_refuses_a_link_without_rdma_naming_it() -> None:
    reports = nodes({"a": 16, "b": 16}, MESH[:1], rdma={"a"})
    found = texts(plan(ring(backend="jaccl"), reports, NOW))
    assert any(
        "jaccl needs RDMA on every link: b -> a at 10.0.0.1 goes over en2, which has no RDMA device"
        in t for t in found
    ), found  # fmt: skip
    assert isinstance(plan(ring(backend="ring"), reports, NOW), Placement)  # the ring needs none


@pytest.mark.parametrize(
    ("system", "machine", "cuda", "mps", "mlx", "engines", "backends"),
    [
        ("Darwin", "arm64", False, True, True, ("torch:mps", "mlx:metal"),
         ("gloo", "ring", "jaccl")),
        ("Darwin", "arm64", False, True, False, ("torch:mps",), ("gloo",)),
        ("Linux", "x86_64", True, False, False, ("torch:cuda",), ("gloo", "nccl")),
        ("Linux", "x86_64", False, False, True, ("torch:cpu", "mlx:cpu"), ("gloo", "ring")),
    ],
)  # fmt: skip
def test_node_capabilities(system, machine, cuda, mps, mlx, engines, backends) -> None:
    assert node_capabilities(system, machine, cuda, mps, mlx) == (engines, backends)
