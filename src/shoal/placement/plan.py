"""The cluster plan: which instances exist and where their ranks run. Pure functions only.

Only the leader writes the plan; it travels inside the leader's report and every node adopts
the newest one it has seen, ordered by (term, version). A node that becomes leader starts from
that newest plan with a higher term, so a leader change never tears down healthy instances.

The instance documents here are shaped like exo's so operators' scripts keep working:
`{<meta name>: {instanceId, modelId, nodeToRunner, runnerToShard, hostsByNode, ...}}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shoal.placement.planner import CandidateReason, ModelSpec, Placement, PlacementRequest
from shoal.schema.address import interface_holding
from shoal.schema.exo import (
    SHARD_META,
    HostPort,
    InstanceBody,
    RunnerStatus,
    ShardMetadata,
    posted_choices,
)
from shoal.schema.reasons import reason
from shoal.schema.report import (
    BACKEND_ENGINE,
    AutoPlace,
    ClusterPlan,
    HeldModel,
    InstanceSpec,
    NodeReport,
    RunnerState,
)

# Instance meta names: shoal's own and exo's. Gloo and NCCL instances run on the torch
# engine; MlxRing (mx.distributed ring, TCP) and MlxJaccl (RDMA over Thunderbolt 5) on mlx.
META_BACKEND = {
    "gloo": "gloo",
    "nccl": "nccl",
    "ring": "ring",
    "jaccl": "jaccl",
    "glooinstance": "gloo",
    "ncclinstance": "nccl",
    "mlxringinstance": "ring",
    "mlxjacclinstance": "jaccl",
}
META_NAME = {
    "gloo": "GlooInstance",
    "nccl": "NcclInstance",
    "ring": "MlxRingInstance",
    "jaccl": "MlxJacclInstance",
}
STORE_PORTS = (41000, 48999)  # TCPStore ports, picked per instance id


def parse_meta(text: str | None) -> tuple[str, str]:
    """An instance_meta value -> (backend, meta name shown in /state)."""
    backend = META_BACKEND.get((text or "gloo").strip().lower())
    if backend is None:
        names = ", ".join([*BACKEND_ENGINE, *META_NAME.values()])
        raise ValueError(f"unknown instance_meta {text!r}; use one of {names}")
    named = text is not None and text.strip().lower().endswith("instance")
    return backend, (text.strip() if named and text else META_NAME[backend])


def parse_sharding(text: str | None) -> str:
    sharding = (text or "pipeline").strip().lower()
    if sharding not in SHARD_META:
        raise ValueError(f"unknown sharding {text!r}; use Pipeline or Tensor")
    return sharding


# ---- plans ------------------------------------------------------------------------------------


def plan_key(plan: ClusterPlan | None) -> tuple[int, int]:
    return (plan.term, plan.version) if plan else (-1, -1)


def newest_plan(held: ClusterPlan | None, reports: Iterable[NodeReport]) -> ClusterPlan:
    """The newest plan among the one this node adopted and those its peers publish."""
    plans = [p for p in (held, *(r.plan for r in reports)) if p is not None]
    return max(plans, key=plan_key, default=ClusterPlan())


def lead(adopted: ClusterPlan, self_id: str) -> ClusterPlan:
    """This node is leader: keep the adopted plan, under a term of its own."""
    if adopted.leader == self_id:
        return adopted
    return adopted.model_copy(update={"term": adopted.term + 1, "version": 0, "leader": self_id})


def with_instance(plan: ClusterPlan, instance: InstanceSpec) -> ClusterPlan:
    kept = tuple(i for i in plan.instances if i.instance_id != instance.instance_id)
    return plan.model_copy(update={"version": plan.version + 1, "instances": (*kept, instance)})


def without_instance(plan: ClusterPlan, instance_id: str) -> ClusterPlan:
    kept = tuple(i for i in plan.instances if i.instance_id != instance_id)
    return plan.model_copy(update={"version": plan.version + 1, "instances": kept})


def find_instance(plan: ClusterPlan, instance_id: str) -> InstanceSpec | None:
    return next((i for i in plan.instances if i.instance_id == instance_id), None)


SOLO_META = "SoloInstance"


def solo_instance(node_id: str, held: HeldModel, engine: str = "torch") -> InstanceSpec:
    """A model this node serves alone: a 1-rank instance like any other, run by the same runner.
    The node owns it (no leader decides where a node's own --model runs), so its id is derived
    from the node and the model and stays the same across restarts."""
    digest = hashlib.sha256(f"{node_id}/{held.model_id}".encode()).hexdigest()[:12]
    return InstanceSpec(
        instance_id=f"solo-{digest}",
        model_id=held.model_id,
        meta=SOLO_META,
        engine=engine,
        nodes=(node_id,),
        layer_ranges=((0, held.num_layers),),
        store_address="127.0.0.1",
        rank_interfaces=(None,),
        reason="served by this node alone",
    )


def runner_id(instance_id: str, rank: int, generation: int = 0) -> str:
    """A new generation of an instance gets new runners (the old ones are stopped)."""
    return f"{instance_id}-g{generation}-r{rank}"


def runner_of(instance: InstanceSpec, rank: int) -> str:
    return runner_id(instance.instance_id, rank, instance.generation)


def desired_runners(
    plan: ClusterPlan, node_id: str, solo: Iterable[InstanceSpec] = ()
) -> dict[str, tuple[InstanceSpec, int]]:
    """runner id -> (instance, rank) for every rank the plan and this node's solo instances
    put on this node."""
    return {
        runner_of(i, rank): (i, rank)
        for i in (*plan.instances, *solo)
        for rank, node in enumerate(i.nodes)
        if node == node_id
    }


def pending_auto_places(reports: Sequence[NodeReport], plan: ClusterPlan) -> list[AutoPlace]:
    """`--min-nodes` requests whose model has no instance yet (one per model)."""
    placed = {i.model_id for i in plan.instances}
    out: dict[str, AutoPlace] = {}
    for r in sorted(reports, key=lambda r: r.node_id):
        for want in r.auto_place:
            if want.model_id not in placed and want.model_id not in out:
                out[want.model_id] = want
    return list(out.values())


# ---- placement inputs and outputs -------------------------------------------------------------


def model_spec(held: HeldModel, backend: str = "gloo") -> ModelSpec:
    """Placement's view of a held model: the report fields it shares with ModelSpec. On the
    MLX engine its weights take what its files hold (quantized stay quantized)."""
    spec = ModelSpec(**{f.name: getattr(held, f.name) for f in dataclasses.fields(ModelSpec)})
    if BACKEND_ENGINE.get(backend) == "mlx" and held.mlx_weight_bytes:
        return dataclasses.replace(spec, weight_bytes=held.mlx_weight_bytes)
    return spec


def holders(reports: Iterable[NodeReport], model_id: str) -> dict[str, HeldModel]:
    """Nodes that hold the model on disk, with what each says about it."""
    return {r.node_id: m for r in reports for m in r.models if m.model_id == model_id}


def files_agree(held: Mapping[str, HeldModel]) -> tuple[set[str], list[CandidateReason]]:
    """The nodes whose files of the model match the most common set (paths and sizes), and a
    reason for each that differs: an instance must never mix two versions of a model. Nodes
    that state no digest go along with the majority."""
    groups = Counter(m.files_digest for m in held.values() if m.files_digest)
    if len(groups) <= 1:
        return set(held), []
    # most nodes first, then the smallest digest: every node picks the same group
    majority = min(groups, key=lambda d: (-groups[d], d))
    allowed = {n for n, m in held.items() if m.files_digest in (majority, None)}
    reasons = [
        CandidateReason(
            (n,),
            reason(
                "files_differ",
                nodes=(n,),
                model=m.model_id,
                agreeing=len(allowed),
                digest=m.files_digest,
                majority=majority,
            ),  # fmt: skip
        )
        for n, m in sorted(held.items())
        if n not in allowed
    ]
    return allowed, reasons


def store_port(instance_id: str, generation: int = 0) -> int:
    """Per generation, so a new process group never waits on the old one's port."""
    low, high = STORE_PORTS
    key = f"{instance_id}/{generation}".encode()
    digest = int.from_bytes(hashlib.sha256(key).digest()[:4], "big")
    return low + digest % (high - low + 1)


def interface_for(report: NodeReport | None, host: str) -> str | None:
    """The interface of a node that holds an address (schema.address.interface_holding)."""
    if report is None:
        return None
    return interface_holding(host, ((i.name, c) for i in report.interfaces for c in i.addresses))


def instance_from_placement(
    placement: Placement,
    request: PlacementRequest,
    *,
    instance_id: str,
    meta: str,
    reports: Mapping[str, NodeReport],
    now: float,
    generation: int = 0,
    reason: str = "",
) -> InstanceSpec:
    return InstanceSpec(
        instance_id=instance_id,
        model_id=request.model.model_id,
        sharding=request.sharding,
        backend=request.backend,
        engine=BACKEND_ENGINE[request.backend],
        meta=meta,
        nodes=placement.nodes,
        layer_ranges=placement.layer_ranges,
        store_address=placement.store_address,
        store_port=store_port(instance_id, generation),
        rank_addresses=placement.rank_addresses,
        rank_interfaces=tuple(
            interface_for(reports.get(node), addr)
            for node, addr in zip(placement.nodes, placement.rank_addresses, strict=True)
        ),
        rdma_devices=placement.rdma_devices,
        created_at=now,
        generation=generation,
        reason=reason,
    )


# ---- exo-shaped documents ---------------------------------------------------------------------


def instance_document(
    instance: InstanceSpec, runners: Mapping[str, RunnerState] | None = None
) -> dict[str, Any]:
    """{meta: {...}}: an instance as /instance/placement, /instance/{id} and /state show it
    (exo's camelCase shape, `schema.exo.InstanceBody`)."""
    runners = runners or {}
    world = len(instance.nodes)
    num_layers = max((end for _, end in instance.layer_ranges), default=0)
    node_to_runner, runner_to_shard, status, hosts = {}, {}, {}, {}
    for rank, node in enumerate(instance.nodes):
        rid = runner_of(instance, rank)
        start, end = instance.layer_ranges[rank]
        node_to_runner[node] = rid
        shard = ShardMetadata(
            model_id=instance.model_id, device_rank=rank, world_size=world,
            start_layer=start, end_layer=end, n_layers=num_layers,
        )  # fmt: skip
        runner_to_shard[rid] = {SHARD_META[instance.sharding]: shard}
        held = runners.get(rid)
        status[rid] = (
            RunnerStatus(status=held.status, reason=held.reason, since=held.since)
            if held
            else RunnerStatus(status="pending")
        )
        hosts[node] = (HostPort(ip=instance.rank_addresses[rank], port=instance.store_port),)
    body = InstanceBody(
        instance_id=instance.instance_id,
        model_id=instance.model_id,
        sharding=instance.sharding.capitalize(),
        backend=instance.backend,
        node_to_runner=node_to_runner,
        runner_to_shard=runner_to_shard,
        hosts_by_node=hosts,
        store_address=f"{instance.store_address}:{instance.store_port}",
        rank_interfaces=dict(zip(instance.nodes, instance.rank_interfaces, strict=False)),
        runner_status=status,
        created_at=instance.created_at,
        generation=instance.generation,
        placed_because=instance.reason,
    )
    return {instance.meta: body.wire()}


def parse_instance_document(doc: Any) -> tuple[str, str, str, list[str]]:
    """A posted instance -> (model id, sharding, meta name, nodes in rank order).

    Only the choices are taken from the document; layers, addresses and ports are worked
    out again from the current view, so a stale preview can never place a broken layout.
    """
    if isinstance(doc, dict) and len(doc) == 1:
        parse_meta(next(iter(doc)))  # an unknown meta name is the first thing to report
    meta, model_id, sharding, nodes = posted_choices(doc)
    return model_id, sharding, meta, nodes
