"""Placement: memory fit, layer split, ring order, one-way paths, rank 0 and refusals."""

from __future__ import annotations

import pytest

from shoal.placement.planner import (
    MAX_REASONS,
    ModelSpec,
    Placement,
    PlacementRequest,
    Refusal,
    plan,
)
from shoal.schema.report import GpuInfo, InterfaceKind, NodeReport, PathStats, Resources

NOW = 1000.0
GIB = 1024**3
TB, ETH, VPN = InterfaceKind.THUNDERBOLT, InterfaceKind.ETHERNET, InterfaceKind.VPN
# 12 layers, 6 GiB of weights, KV 12288 bytes a token (48 MiB for 4096 tokens)
MODEL = ModelSpec("tiny", num_layers=12, hidden_size=512, num_heads=8, num_kv_heads=2,
                  head_dim=64, weight_bytes=6 * GIB)  # fmt: skip
ODD = ModelSpec("odd", num_layers=12, hidden_size=576, num_heads=9, num_kv_heads=3,
                head_dim=64, weight_bytes=6 * GIB)  # fmt: skip


def addr(node: str) -> str:
    return f"10.0.0.{ord(node) - ord('a') + 1}"


def cluster(mem: dict[str, float], links: list[tuple]) -> list[NodeReport]:
    """links: (src, dst, mode, rtt_ms, host, kind); mode "both" | "out" | "in" | "dead".

    "out": src's outbound record; "in": only dst's inbound record; "both": outbound both ways;
    "dead": src probed dst and heard nothing. host defaults to dst's 10.0.0.x address.
    """
    recs: dict[str, list[PathStats]] = {n: [] for n in mem}
    for src, dst, mode, rtt, *rest in links:
        host = rest[0] if rest else addr(dst)
        kind = rest[1] if len(rest) > 1 else ETH
        ok = dict(last_success=NOW - 1, rtt_ms_ewma=rtt, loss=0.0, interface_kind=kind)
        if mode in ("out", "both"):
            recs[src].append(PathStats(peer_node_id=dst, peer_addr=f"{host}:52415", **ok))
        if mode == "both":
            back = dict(ok, interface_kind=kind)
            recs[dst].append(PathStats(peer_node_id=src, peer_addr=addr(src), **back))
        if mode == "in":
            recs[dst].append(PathStats(peer_node_id=src, peer_addr=addr(src), local_addr=host,
                                       direction="inbound", last_success=NOW - 1))  # fmt: skip
        if mode == "dead":
            recs[src].append(PathStats(peer_node_id=dst, peer_addr=host, loss=1.0, sent=10))
    return [NodeReport(node_id=n, links=tuple(recs[n]),
                       resources=Resources(ram_available=int(g * GIB)))
            for n, g in mem.items()]  # fmt: skip


def request(model: ModelSpec = MODEL, **kw: object) -> PlacementRequest:
    return PlacementRequest(model=model, **kw)  # type: ignore[arg-type]


def placed(result: Placement | Refusal) -> Placement:
    assert isinstance(result, Placement), result
    return result


def reasons(result: Placement | Refusal) -> list[str]:
    assert isinstance(result, Refusal), result
    return [r.text for r in result.reasons]


MESH = [("a", "b", "both", 1.0), ("b", "c", "both", 1.0), ("a", "c", "both", 1.0)]


@pytest.mark.parametrize(
    ("name", "mem", "links", "req", "nodes", "ranges"),
    [
        ("single node fits", {"a": 16}, [], request(), ("a",), ((0, 12),)),
        ("smallest node count wins", {"a": 16, "b": 16}, MESH[:1], request(), ("a",), ((0, 12),)),
        ("pipeline split 2:1 by memory", {"a": 16, "b": 8}, MESH[:1], request(min_nodes=2),
         ("a", "b"), ((0, 8), (8, 12))),
        ("bigger node later in ring", {"a": 8, "b": 16}, MESH[:1], request(min_nodes=2),
         ("a", "b"), ((0, 4), (4, 12))),
        ("at least one layer per stage", {"a": 64, "b": 0.6}, MESH[:1],
         request(min_nodes=2, headroom_bytes=0), ("a", "b"), ((0, 11), (11, 12))),
        ("tensor: every rank all layers", {"a": 4, "b": 4}, MESH[:1],
         request(sharding="tensor", min_nodes=2), ("a", "b"), ((0, 12), (0, 12))),
        ("node_filter picks the subset", {"a": 16, "b": 16, "c": 16}, MESH,
         request(min_nodes=2, node_filter=frozenset({"b", "c"})), ("b", "c"), ((0, 6), (6, 12))),
    ],
)  # fmt: skip
def test_placements(name, mem, links, req, nodes, ranges) -> None:
    result = placed(plan(req, cluster(mem, links), NOW))
    assert (result.nodes, result.layer_ranges) == (nodes, ranges)
    assert result.rank0 == nodes[0]
    assert sum(end - start for start, end in ranges) in (12, 12 * len(nodes))


def test_single_node_needs_no_address() -> None:
    result = placed(plan(request(), cluster({"a": 16}, []), NOW))
    assert (result.store_address, result.rank_addresses, result.slowest_hop_ms) == (
        "127.0.0.1",
        ("127.0.0.1",),
        None,
    )


@pytest.mark.parametrize(
    ("name", "mem", "links", "req", "expected"),
    [
        ("too little memory names node and numbers", {"a": 4}, [], request(context_tokens=32768),
         "node a has 4.0 GiB available, needs 6.9 GiB (weights 6.0 + KV 0.4 + headroom 0.5)"),
        ("min_nodes not met", {"a": 16}, [], request(min_nodes=2), "needs >= 2 nodes, 1 alive"),
        ("tensor divisibility", {"a": 16, "b": 16}, MESH[:1],
         request(ODD, sharding="tensor", min_nodes=2),
         "tensor parallel over 2 nodes: 9 heads / 3 kv heads not divisible by 2"),
        ("filtered node not alive", {"a": 16}, [], request(node_filter=frozenset({"z"})),
         "node z is not alive"),
        ("one-way refused for the reverse hop", {"a": 16, "b": 16},
         [("a", "b", "in", None), ("b", "a", "dead", None)], request(min_nodes=2),
         "no working path b -> a (measured: 10.0.0.1 loss 100%)"),
        ("unmeasured path", {"a": 16, "b": 16}, [], request(min_nodes=2),
         "no working path b -> a (unmeasured)"),
        ("stale success does not count", {"a": 16, "b": 16},
         [("a", "b", "both", 1.0)], request(min_nodes=2, max_nodes=2), None),
        ("nccl needs a CUDA GPU on every rank", {"a": 16}, [], request(backend="nccl"),
         "node a has no CUDA GPU (the nccl backend needs one per rank)"),
        ("pipeline longer than the model", {"a": 16, "b": 16},
         MESH[:1], request(ModelSpec("x", 1, 8, 1, 1, 8, GIB), min_nodes=2),
         "pipeline over 2 nodes: only 1 layers"),
    ],
)  # fmt: skip
def test_refusals(name, mem, links, req, expected) -> None:
    reports = cluster(mem, links)
    now = NOW + 60 if expected is None else NOW  # every success is a minute old
    found = reasons(plan(req, reports, now))
    if expected is None:
        assert any(r.startswith("no working path a -> b (measured: 10.0.0.2") for r in found)
    else:
        assert expected in found


def test_nccl_places_on_cuda_nodes_only() -> None:
    reports = cluster({"a": 16, "b": 16}, MESH[:1])
    cuda = Resources(ram_available=16 * GIB, gpus=(GpuInfo(name="H100", backend="cuda"),))
    reports[1] = reports[1].model_copy(update={"resources": cuda})
    assert placed(plan(request(backend="nccl"), reports, NOW)).nodes == ("b",)
    refused = reasons(plan(request(backend="nccl", min_nodes=2), reports, NOW))
    assert refused == [
        "node a has no CUDA GPU (the nccl backend needs one per rank)",
        "needs >= 2 nodes, 1 alive with a CUDA GPU",
    ]


def test_one_way_record_is_enough_for_the_hop_that_needs_it() -> None:
    # a -> b only as b's inbound record; every other pair works both ways
    links = [("a", "b", "in", None), ("b", "c", "both", 1.0), ("a", "c", "both", 2.0)]
    result = placed(plan(request(min_nodes=3), cluster({"a": 16, "b": 16, "c": 16}, links), NOW))
    assert result.rank0 == "c"  # reached by both others, with measured RTTs
    assert result.nodes == ("c", "a", "b")  # the reverse ring would need b -> a
    assert result.rank_addresses == ("10.0.0.3", "10.0.0.1", "10.0.0.2")
    assert result.slowest_hop_ms is None  # a -> b has no measured RTT


def test_ring_order_takes_the_fast_cables() -> None:
    cable = [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")]
    links = [(x, y, "both", 0.3) for x, y in cable]
    links += [("a", "c", "both", 50.0, "100.64.0.3", VPN), ("b", "d", "both", 50.0)]
    mem = dict.fromkeys("abcd", 16)
    result = placed(plan(request(min_nodes=4), cluster(mem, links), NOW))
    assert result.nodes == ("a", "b", "c", "d")
    assert result.slowest_hop_ms == 0.3


def test_address_prefers_the_cable_over_the_vpn() -> None:
    links = [("a", "b", "both", 40.0, "100.64.0.2", VPN),
             ("a", "b", "out", 0.4, "192.168.100.2", TB)]  # fmt: skip
    result = placed(plan(request(min_nodes=2), cluster({"a": 16, "b": 16}, links), NOW))
    assert result.rank0 == "b"  # a reaches b in 0.4 ms; b reaches a in 40
    assert result.store_address == result.rank_addresses[0] == "192.168.100.2"
    assert result.slowest_hop_ms == 40.0


@pytest.mark.parametrize(
    ("name", "links", "rank0"),
    [
        ("tie: smallest id", MESH, "a"),
        ("most inbound paths", [("a", "b", "both", 1.0), ("b", "c", "both", 1.0),
                                ("a", "c", "out", 1.0), ("c", "a", "dead", None)], "b"),
        ("then lowest RTT in", [("a", "b", "both", 9.0), ("b", "c", "both", 1.0),
                                ("a", "c", "both", 5.0)], "c"),
    ],
)  # fmt: skip
def test_rank0(name, links, rank0) -> None:
    mem = dict.fromkeys("abc", 16)
    result = placed(plan(request(min_nodes=3), cluster(mem, links), NOW))
    assert result.rank0 == result.nodes[0] == rank0


def test_refusal_is_bounded_and_deduplicated() -> None:
    mem = dict.fromkeys("abcdefgh", 1)
    found = reasons(plan(request(min_nodes=2), cluster(mem, []), NOW))
    assert len(found) <= MAX_REASONS
    result = plan(request(min_nodes=2), cluster(mem, []), NOW)
    assert isinstance(result, Refusal)
    assert len(set(result.reasons)) == len(result.reasons)


def test_a_cut_cable_is_cut_both_ways_before_the_far_end_says_so() -> None:
    # a's probes over the cable go unanswered (a cut); b's report, polled a moment before b
    # noticed, still shows its way back over the cable working, and so does a's record of b's
    # probes arriving: neither may put b -> a back on the cable
    cable_a, cable_b, vpn_a, vpn_b = "10.0.0.1", "10.0.0.2", "100.64.0.1", "100.64.0.2"
    ok = dict(rtt_ms_ewma=40.0, loss=0.0, interface_kind=VPN, last_success=NOW - 0.5,
              last_attempt=NOW - 0.2)  # fmt: skip
    a = [PathStats(peer_node_id="b", peer_addr=f"{vpn_b}:52415", **ok),
         PathStats(peer_node_id="b", peer_addr=f"{cable_b}:52415", local_addr=f"{cable_a}:52415",
                   rtt_ms_ewma=0.2, interface_kind=ETH, last_success=NOW - 3.0,
                   last_attempt=NOW - 0.2),
         PathStats(peer_node_id="b", peer_addr=f"{cable_b}:52415", local_addr=f"{cable_a}:52415",
                   direction="inbound", interface_kind=ETH, last_success=NOW - 1.5)]  # fmt: skip
    b = [PathStats(peer_node_id="a", peer_addr=f"{vpn_a}:52415", **ok),
         PathStats(peer_node_id="a", peer_addr=f"{cable_a}:52415", rtt_ms_ewma=0.2,
                   interface_kind=ETH, last_success=NOW - 2.5, last_attempt=NOW - 2.5)]  # fmt: skip
    res = Resources(ram_available=16 * GIB)
    reports = [NodeReport(node_id="a", links=tuple(a), resources=res),
               NodeReport(node_id="b", links=tuple(b), resources=res)]  # fmt: skip
    result = placed(plan(request(min_nodes=2), reports, NOW))
    assert {result.store_address, *result.rank_addresses} == {vpn_a, vpn_b}, result
