"""Placement: which nodes, in which order, serve a model; or why no set of nodes can.

Pure: plain data in (reports, a model card, a request, `now`), a Placement or a Refusal out.

Choices, in order (DESIGN.md §5):

- Candidates are node subsets of size min_nodes..max_nodes, smallest size first; the first size
  with any fitting candidate wins, and within it the smallest slowest hop, then node ids. Fewer
  nodes means fewer hops and less to fail.
- Rank 0 is the member the others reach best: most verified inbound paths from the other
  members, then the lowest worst inbound RTT, then node id. Every other rank must reach one
  address of it (the store).
- Ring order (pipeline stages, and the tensor all-reduce ring) starts at rank 0 and minimises the
  slowest hop; every rank must reach the next, the last the first, and each pair must work in at
  least one direction (the backend's full mesh: one side dials). One-way records are enough.
- Caps: orders are enumerated exhaustively up to MAX_EXHAUSTIVE members ((n-1)! orders with rank
  0 fixed: 5040 for 8 nodes); a bigger set gets one greedy nearest-neighbour order. At most
  MAX_SUBSETS subsets per size are tried, nodes with more memory first.
- A path A -> B at address X works if A recorded a recent outbound success to B at X, or B a
  recent inbound success from A on its local address X (RECENT_S, the addressing window).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from shoal.placement.addressing import (
    RECENT_S,
    PathOption,
    host_of,
    is_failing,
    options_to,
    rank_key,
)
from shoal.schema.address import interface_holding
from shoal.schema.reasons import CandidateReason, PathRef, Reason, Refusal, reason
from shoal.schema.report import MLX_BACKENDS, HeldModel, InterfaceInfo, NodeReport

GIB = 1024**3
MAX_EXHAUSTIVE = 8
MAX_SUBSETS = 256
MAX_REASONS = 24
_NO_RTT = 1e9  # an unmeasured hop sorts after every measured one


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    weight_bytes: int
    dtype_bytes: int = 4

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class PlacementRequest:
    model: ModelSpec
    sharding: Literal["pipeline", "tensor"] = "pipeline"
    backend: Literal["gloo", "nccl", "ring", "jaccl"] = "gloo"
    min_nodes: int = 1
    max_nodes: int | None = None
    node_filter: frozenset[str] | None = None
    context_tokens: int = 4096
    headroom_bytes: int = 512 * 1024**2


@dataclass(frozen=True)
class Placement:
    nodes: tuple[str, ...]  # rank order
    layer_ranges: tuple[tuple[int, int], ...]  # [start, end) per rank; tensor: all (0, L)
    rank0: str
    store_address: str  # rank 0's host, reachable by every other rank
    rank_addresses: tuple[str, ...]  # rank 0: the store; rank i: as rank i-1 dials it
    slowest_hop_ms: float | None  # None for one node or when a ring hop has no measured RTT
    rdma_devices: tuple[tuple[str | None, ...], ...] = ()  # jaccl: [i][j] rank i's device to j


class _Links:
    """Working paths between nodes, from both ends' records."""

    def __init__(self, reports: Sequence[NodeReport], now: float) -> None:
        self.now = now
        self.options: dict[tuple[str, str], dict[str, PathOption]] = {}
        self._working: dict[tuple[str, str], list[PathOption]] = {}
        self.seen: dict[tuple[str, str], dict[str, float]] = {}  # host -> loss, for reasons
        for r in reports:
            for peer in {p.peer_node_id for p in r.links}:
                for o in options_to(peer, r.links):
                    self._add((r.node_id, peer), o)
            # r's own probes from a local address to a peer that worked and go unanswered now:
            # a cut cable, both ways. The peer's probes into that address count as failing too
            # until the peer's report says so itself (a poll later), so a move never puts the
            # way back over the cut end.
            cut = {(p.peer_node_id, host_of(p.local_addr)) for p in r.links
                   if p.local_addr and is_failing(p)}  # fmt: skip
            for p in r.links:
                if p.direction == "inbound":  # the peer's probes reached r at local_addr
                    key, host = (p.peer_node_id, r.node_id), host_of(p.local_addr or "")
                    if host:
                        failing = (p.peer_node_id, host) in cut
                        self._add(key, PathOption(host, p.interface_kind, p.local_interface,
                                                  p.rtt_ms_ewma, p.last_success,
                                                  failing=failing))  # fmt: skip
                else:
                    key, host = (r.node_id, p.peer_node_id), host_of(p.peer_addr)
                if host:
                    self.seen.setdefault(key, {})[host] = p.loss

    def _add(self, key: tuple[str, str], o: PathOption) -> None:
        held = self.options.setdefault(key, {}).get(o.peer_addr)
        if held is not None:  # one address, both ends' records: newest success, outbound RTT
            last = max((t for t in (held.last_success, o.last_success) if t is not None),
                       default=None)  # fmt: skip
            o = replace(held, last_success=last, rtt_ms=held.rtt_ms or o.rtt_ms,
                        failing=held.failing or o.failing)  # fmt: skip
        self.options[key][o.peer_addr] = o

    def working(self, a: str, b: str) -> list[PathOption]:
        """Recent paths a -> b, best first (memoised: rings ask the same hops many times)."""
        if (a, b) not in self._working:
            opts = self.options.get((a, b), {}).values()
            self._working[a, b] = sorted((o for o in opts if self._recent(o)), key=self.key)
        return self._working[a, b]

    def best(self, a: str, b: str) -> PathOption | None:
        return next(iter(self.working(a, b)), None)

    def _recent(self, o: PathOption) -> bool:
        fresh = o.last_success is not None and self.now - o.last_success <= RECENT_S
        return fresh and not o.failing

    def key(self, o: PathOption) -> tuple[tuple[int, ...], str]:
        return (rank_key(o, self.now), o.peer_addr)

    def rtt(self, a: str, b: str) -> float:
        best = self.best(a, b)
        return best.rtt_ms if best and best.rtt_ms is not None else _NO_RTT

    def missing(self, a: str, b: str) -> Reason:
        seen = sorted(self.seen.get((a, b), {}).items())
        return reason("no_path", nodes=(a, b), path=PathRef(a, b),
                      measured={"losses": tuple(loss for _, loss in seen)},
                      hosts=tuple(h for h, _ in seen))  # fmt: skip


def plan(
    request: PlacementRequest, reports: Sequence[NodeReport], now: float
) -> Placement | Refusal:
    by_id = {r.node_id: r for r in reports}
    reasons: dict[CandidateReason, None] = {}

    def refuse(nodes: Sequence[str], why: Reason) -> None:
        if len(reasons) < MAX_REASONS:
            reasons[CandidateReason(tuple(nodes), why)] = None

    eligible = sorted(by_id)
    if request.node_filter is not None:
        for n in sorted(request.node_filter - by_id.keys()):
            refuse((n,), reason("node_not_alive", nodes=(n,)))
        eligible = [n for n in eligible if n in request.node_filter]
    if request.backend == "nccl":  # NCCL runs on CUDA devices only: a CPU-only rank cannot join
        for n in [n for n in eligible if not _has_cuda(by_id[n])]:
            refuse((n,), reason("no_cuda", nodes=(n,)))
        eligible = [n for n in eligible if _has_cuda(by_id[n])]
    # the node's copy may not use the backend (its card, or no engine for it there)
    backend_refusals = {n: why for n in eligible if (why := _backend_refusal(by_id[n], request))}
    for n, why in backend_refusals.items():
        refuse((n,), why)
    eligible = [n for n in eligible if n not in backend_refusals]
    # more memory first, so the subsets tried under the cap are the likeliest to fit
    eligible.sort(key=lambda n: (-by_id[n].resources.ram_available, n))
    low = max(1, request.min_nodes)
    high = min(len(eligible), request.max_nodes or len(eligible))
    if len(eligible) < low:
        cuda = request.backend == "nccl"
        refuse(eligible, reason("too_few_nodes", nodes=eligible, needed=low,
                                alive=len(eligible), cuda=cuda))  # fmt: skip
    links = _Links(reports, now)
    for size in range(low, high + 1):
        fits: list[tuple[float, tuple[str, ...], Placement]] = []
        for subset in itertools.islice(itertools.combinations(eligible, size), MAX_SUBSETS):
            result = _try(request, sorted(subset), by_id, links)
            if isinstance(result, Placement):
                fits.append((result.slowest_hop_ms or 0.0, result.nodes, result))
            else:
                for why in result:
                    refuse(sorted(subset), why)
        if fits:
            return min(fits, key=lambda f: (f[0], f[1]))[2]
    return Refusal(tuple(reasons))


def _try(
    req: PlacementRequest, nodes: list[str], by_id: dict[str, NodeReport], links: _Links
) -> Placement | list[Reason]:
    """One node set: a placement, or every reason it cannot host the model."""
    m, n = req.model, len(nodes)
    if req.backend in MLX_BACKENDS and n > 1:
        layouts = [r for x in nodes if (r := _mlx_layout_refusal(by_id[x], req))]
        if layouts:
            return layouts
    if req.sharding == "tensor":
        bad = [(k, v) for k, v in (("heads", m.num_heads), ("kv heads", m.num_kv_heads),
               ("hidden size", m.hidden_size)) if v % n]  # fmt: skip
        if bad:
            return [reason("tensor_indivisible", nodes=nodes, ways=n, indivisible=tuple(bad))]
        shares = {node: (m.num_layers, n) for node in nodes}  # (layers, ways the layers split)
    else:
        if m.num_layers < n:
            return [reason("too_few_layers", nodes=nodes, ways=n, layers=m.num_layers)]
        split = _split(m.num_layers, [_usable(by_id[x], req) for x in nodes])
        shares = {node: (k, 1) for node, k in zip(nodes, split, strict=True)}
    problems = [p for node in nodes if (p := _memory(req, by_id[node], *shares[node]))]

    rank0 = min(nodes, key=lambda r: _rank0_key(r, nodes, links))
    others = [x for x in nodes if x != rank0]
    store = _store_address(rank0, others, links)
    if store is None:
        problems += [links.missing(x, rank0) for x in others if not links.working(x, rank0)]
        if not any(not links.working(x, rank0) for x in others):
            problems.append(reason("no_common_address", nodes=(rank0, *others)))
    for a, b in itertools.combinations(nodes, 2):
        if not links.working(a, b) and not links.working(b, a):
            problems.append(reason("no_path_either_way", nodes=(a, b), path=PathRef(a, b)))
    order, missing = _ring(rank0, others, links)
    if order is None:
        problems += missing
    if problems or order is None or store is None:
        return sorted(set(problems), key=problems.index)

    hops = list(zip(order, order[1:] + order[:1], strict=True)) if n > 1 else []
    rtts = [links.rtt(a, b) for a, b in hops]
    slowest = max(rtts) if rtts and max(rtts) < _NO_RTT else None
    starts = list(itertools.accumulate([shares[x][0] for x in order], initial=0))
    ranges = tuple(
        (0, m.num_layers) if req.sharding == "tensor" else (starts[i], starts[i + 1])
        for i in range(n)
    )
    dialled = [store] + [links.working(a, b)[0].peer_addr for a, b in hops[:-1]]
    devices: tuple[tuple[str | None, ...], ...] = ()
    if req.backend == "jaccl" and n > 1:
        matrix = rdma_matrix(order, by_id, links)
        if isinstance(matrix, list):
            return matrix
        devices = matrix
    return Placement(tuple(order), ranges, rank0, store, tuple(dialled), slowest, devices)


def held_model(r: NodeReport, model_id: str) -> HeldModel | None:
    return next((m for m in r.models if m.model_id == model_id), None)


def _backend_refusal(r: NodeReport, req: PlacementRequest) -> Reason | None:
    """A node whose copy of the model may not use the backend: its card does not list it, or
    the node cannot run it (no MLX engine for ring/jaccl)."""
    held = held_model(r, req.model.model_id)
    if held is None or req.backend in held.backends:
        return None
    return reason("no_backend", nodes=(r.node_id,), model=held.model_id, backend=req.backend,
                  allowed=held.backends)  # fmt: skip


def _mlx_layout_refusal(r: NodeReport, req: PlacementRequest) -> Reason | None:
    """mlx-lm splits a model only where its class can (`shard`: tensor, `pipeline`)."""
    held = held_model(r, req.model.model_id)
    if held is None or req.sharding in held.mlx_layouts:
        return None
    others = [x for x in held.mlx_layouts if x != req.sharding]
    return reason("mlx_layout", nodes=(r.node_id,), arch=held.arch or "this model",
                  sharding=req.sharding, other=others[0] if others else "")  # fmt: skip


def rdma_matrix(
    order: Sequence[str], by_id: dict[str, NodeReport], links: _Links
) -> tuple[tuple[str | None, ...], ...] | list[Reason]:
    """JACCL's device matrix: [i][j] is rank i's RDMA device (rdma_<interface>) on its link to
    rank j, the interface of i that shares a subnet with the address i reaches j at; or a
    reason per link without one (JACCL meshes every pair)."""
    rows: list[tuple[str | None, ...]] = []
    problems: list[Reason] = []
    for a in order:
        row: list[str | None] = []
        for b in order:
            if a == b:
                row.append(None)
                continue
            best = links.best(a, b) or links.best(b, a)
            host = best.peer_addr if best else ""
            info = _interface_toward(by_id[a], host)
            if info is None or not info.rdma:
                iface = info.name if info else "no interface"
                problems.append(
                    reason("no_rdma", nodes=(a, b), path=PathRef(a, b, host), interface=iface)
                )
                row.append(None)
            else:
                row.append(f"rdma_{info.name}")
        rows.append(tuple(row))
    return problems or tuple(rows)


def _interface_toward(r: NodeReport, host: str) -> InterfaceInfo | None:
    """The interface of r on the subnet of a peer's address (a direct cable's own subnet)."""
    pairs = ((i.name, c) for i in r.interfaces for c in i.addresses)
    name = interface_holding(host, pairs) if host else None
    return next((i for i in r.interfaces if i.name == name), None)


def _has_cuda(r: NodeReport) -> bool:
    return any(g.backend == "cuda" for g in r.resources.gpus)


def _usable(r: NodeReport, req: PlacementRequest) -> int:
    return max(0, r.resources.ram_available - req.headroom_bytes)


def _split(layers: int, weights: list[int]) -> list[int]:
    """At least one layer each, the rest proportional to weight (largest remainder)."""
    rest, total = layers - len(weights), sum(weights)
    exact = [rest * w / total if total else rest / len(weights) for w in weights]
    counts = [1 + math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] % 1), i))
    for i in by_remainder[: layers - sum(counts)]:
        counts[i] += 1
    return counts


def _memory(req: PlacementRequest, r: NodeReport, layers: int, ways: int) -> Reason | None:
    m = req.model
    weights = m.weight_bytes * layers / m.num_layers / ways
    kv = m.kv_bytes_per_token() * req.context_tokens * layers / m.num_layers / ways
    need = weights + kv + req.headroom_bytes
    have = r.resources.ram_available
    if have >= need:
        return None
    g = [x / GIB for x in (have, need, weights, kv, req.headroom_bytes)]
    names = ("have_gib", "need_gib", "weights_gib", "kv_gib", "headroom_gib")
    return reason("memory", nodes=(r.node_id,), measured=dict(zip(names, g, strict=True)))


def _rank0_key(node: str, nodes: list[str], links: _Links) -> tuple[int, float, str]:
    inbound = [links.rtt(x, node) for x in nodes if x != node and links.working(x, node)]
    return (-len(inbound), max(inbound, default=0.0), node)


def _store_address(rank0: str, others: list[str], links: _Links) -> str | None:
    """Rank 0's address that every other rank reaches, best worst-case rank first."""
    if not others:
        return "127.0.0.1"  # nobody dials a lone rank 0: it binds locally
    per_node = [{o.peer_addr: o for o in links.working(x, rank0)} for x in others]
    common = set.intersection(*(set(p) for p in per_node))
    if not common:
        return None
    return min(common, key=lambda h: (max(rank_key(p[h], links.now) for p in per_node), h))


def _ring(rank0: str, others: list[str], links: _Links) -> tuple[list[str] | None, list[Reason]]:
    """The ring order from rank 0 with the smallest slowest hop, or the hops that are missing."""
    if len(others) < MAX_EXHAUSTIVE:
        orders = (list(p) for p in itertools.permutations(others))
    else:  # greedy: always the fastest next hop
        order, left = [], set(others)
        while left:
            prev = order[-1] if order else rank0
            order.append(min(left, key=lambda x: (links.rtt(prev, x), x)))
            left.remove(order[-1])
        orders = iter([order])
    best: tuple[float, list[str]] | None = None
    missing: dict[Reason, None] = {}
    for tail in orders:
        ring = [rank0, *tail]
        hops = list(zip(ring, ring[1:] + ring[:1], strict=True)) if len(ring) > 1 else []
        gaps = [links.missing(a, b) for a, b in hops if not links.working(a, b)]
        missing.update(dict.fromkeys(gaps))
        if not gaps:
            worst = max((links.rtt(a, b) for a, b in hops), default=0.0)
            if best is None or (worst, ring) < best:
                best = (worst, ring)
    return (best[1], []) if best else (None, list(missing))
