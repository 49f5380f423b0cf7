"""exo's camelCase wire shapes, in one place: the instance document and /state's topology.

shoal's own documents are snake_case; the parts an exo client reads (`{meta: body}` instance
documents with nodeToRunner/runnerToShard, `topology.nodes[].nodeProfile`,
`topology.connections`) are declared here, by their snake_case field names with camelCase
aliases, so both the node that writes them and the tools that read them use one type.
Every field has a default, so a partial document from an older node still validates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from pydantic.alias_generators import to_camel

T = TypeVar("T", bound=BaseModel)
SHARD_META = {"pipeline": "PipelineShardMetadata", "tensor": "TensorShardMetadata"}
SHARDING_OF_META = {meta: sharding for sharding, meta in SHARD_META.items()}


class CamelDocument(BaseModel):
    """Fields by snake_case name in Python, camelCase on the wire; unknown keys kept."""

    model_config = ConfigDict(
        frozen=True, extra="allow", alias_generator=to_camel, populate_by_name=True
    )

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# ---- the instance document: {meta: body} -----------------------------------------------------


class ShardMetadata(CamelDocument):
    model_id: str | None = None
    device_rank: int = 0
    world_size: int | None = None
    start_layer: int | None = None
    end_layer: int | None = None
    n_layers: int | None = None


class HostPort(CamelDocument):
    ip: str | None = None
    port: int | None = None


class RunnerStatus(CamelDocument):
    status: str = "?"
    reason: str | None = None
    since: float | None = None


class InstanceBody(CamelDocument):
    instance_id: str = "?"
    model_id: str | None = None
    sharding: str | None = None  # "Pipeline" | "Tensor"
    backend: str | None = None
    node_to_runner: dict[str, str] = Field(default_factory=dict)
    runner_to_shard: dict[str, dict[str, ShardMetadata]] = Field(default_factory=dict)
    hosts_by_node: dict[str, tuple[HostPort, ...]] = Field(default_factory=dict)
    store_address: str | None = None  # host:port
    rank_interfaces: dict[str, str | None] = Field(default_factory=dict)
    runner_status: dict[str, RunnerStatus] = Field(default_factory=dict)
    created_at: float | None = None
    generation: int = 0
    placed_because: str = ""

    def shard(self, runner_id: str) -> ShardMetadata:
        """The runner's shard, whatever its meta key; an empty one for an unknown runner."""
        return next(iter(self.runner_to_shard.get(runner_id, {}).values()), ShardMetadata())


InstanceDocument = dict[str, InstanceBody]  # {meta name: body}, one key


def instance_body(document: Mapping[str, Any] | None) -> InstanceBody:
    """{meta: body} -> body (an empty body for an empty document)."""
    if not document:
        return InstanceBody()
    body = next(iter(document.values()))
    return body if isinstance(body, InstanceBody) else InstanceBody.model_validate(body)


class _PostedShard(CamelDocument):
    device_rank: StrictInt


class _PostedBody(CamelDocument):
    model_id: str = Field(min_length=1)
    node_to_runner: dict[str, str] = Field(min_length=1)
    runner_to_shard: dict[str, dict[str, dict[str, Any]]]  # {runner: {shard kind: fields}}


def _validated(model: type[T], data: Any, where: str) -> T:
    """`data` as `model`, or ValueError naming the first wrong field by its wire path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in (where, *error["loc"]))
        raise ValueError(f"{field}: {error['msg']}") from None


def posted_choices(doc: Any) -> tuple[str, str, str, list[str]]:
    """A posted {meta: body} -> (meta, model id, sharding, nodes in rank order).

    Only the choices are read; ValueError says which field is wrong. The meta name itself is
    checked by the caller (placement knows which backends exist)."""
    if not isinstance(doc, dict) or len(doc) != 1:
        raise ValueError(
            "the instance must be an object with one key, its meta name, e.g. "
            '{"GlooInstance": {...}} as /instance/placement returns it'
        )
    ((meta, body),) = doc.items()
    if not isinstance(body, dict):
        raise ValueError(f"instance.{meta} must be an object")
    posted = _validated(_PostedBody, body, f"instance.{meta}")
    ranked, shardings = [], set()
    for node, rid in posted.node_to_runner.items():
        shard = posted.runner_to_shard.get(rid, {})
        if len(shard) != 1:
            raise ValueError(f"runner {rid!r} of node {node!r} has no shard in runnerToShard")
        ((kind, fields),) = shard.items()
        if kind not in SHARDING_OF_META:
            raise ValueError(f"runner {rid!r}: unknown shard kind {kind!r}")
        shardings.add(SHARDING_OF_META[kind])
        where = f"instance.{meta}.runnerToShard.{rid}.{kind}"
        ranked.append((_validated(_PostedShard, fields, where).device_rank, node))
    if len(shardings) != 1:
        raise ValueError("every runner of an instance must use the same sharding")
    ranks = sorted(rank for rank, _ in ranked)
    if ranks != list(range(len(ranked))):
        raise ValueError(f"deviceRank values must be 0..{len(ranked) - 1}, got {ranks}")
    return meta, posted.model_id, shardings.pop(), [node for _, node in sorted(ranked)]


# ---- /state's topology -----------------------------------------------------------------------


class Memory(CamelDocument):
    ram_total: int = 0
    ram_available: int = 0


class System(CamelDocument):
    cpu_count: int = 0
    cpu_percent: float = 0.0
    gpus: tuple[dict[str, Any], ...] = ()  # shoal's GpuInfo, snake_case as reports carry it


class NetworkInterface(CamelDocument):
    name: str
    ip_address: str
    type: str


class NodeProfile(CamelDocument):
    model_id: str = "unknown"
    chip_id: str = "unknown"
    friendly_name: str = ""
    memory: Memory = Memory()
    system: System = System()
    network_interfaces: tuple[NetworkInterface, ...] = ()


class TopologyNode(CamelDocument):
    node_id: str
    node_profile: NodeProfile = NodeProfile()


class Connection(CamelDocument):
    """One exo-style edge: source, sink and the sink's address, from either side's records."""

    local_node_id: str
    send_back_node_id: str
    local_multiaddr: str | None = None
    send_back_multiaddr: str | None = None
    interface_kind: str = "other"
    rtt_ms: float | None = None
    one_way: bool = False
    recorded_by: list[str] = Field(default_factory=list)  # "node:direction"


class Topology(CamelDocument):
    nodes: tuple[TopologyNode, ...] = ()
    connections: tuple[Connection, ...] = ()
