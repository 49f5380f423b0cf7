"""exo's camelCase wire shapes for instances and what a node holds: the instance document
({meta: body} with shardAssignments), the reading of a posted instance's choices, model cards,
download statuses, tagged runner statuses, and `exo_instance`, which adds exo's keys to a
placed instance's document. /state's topology and per-node maps are in schema.exo_state.

shoal's own documents are snake_case; the parts an exo client reads (`{meta: body}` instance
documents with shardAssignments {modelId, nodeToRunner, runnerToShard}, `{"RunnerReady": {...}}`
statuses, `{"inBytes": n}` sizes) are declared here, by their snake_case field names with
camelCase aliases, so both the node that writes them and the tools that read them use one type.
Every field has a default, so a partial document from an older node still validates. The
translations are pure functions: reports in, exo's shapes out (tests/test_exo_api.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

from shoal.schema.report import DownloadState, HeldModel, InstanceSpec, NodeReport, RunnerState

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


class ByteSize(CamelDocument):
    """exo's `Memory`: a size as `{"inBytes": n}`."""

    in_bytes: int = 0


def memory(n: int | None) -> dict[str, int]:
    return {"inBytes": int(n or 0)}


class ModelCardDoc(CamelDocument):
    """exo's model card as an instance's shards and a node's downloads carry it."""

    model_id: str = ""
    storage_size: ByteSize = ByteSize()
    n_layers: int = 0
    hidden_size: int = 0
    num_key_value_heads: int = 0
    supports_tensor: bool = False
    tasks: tuple[str, ...] = ("TextGeneration",)
    context_length: int = 0
    family: str = ""  # shoal: the architecture (model_type)
    quantization: str = ""
    base_model: str = ""
    capabilities: tuple[str, ...] = ("text",)
    backends: tuple[str, ...] = ()  # shoal's backends (gloo, nccl, ring, jaccl)


class ShardMetadata(CamelDocument):
    model_id: str | None = None
    device_rank: int = 0
    world_size: int | None = None
    start_layer: int | None = None
    end_layer: int | None = None
    n_layers: int | None = None
    model_card: ModelCardDoc | None = None  # exo reads the model id from here


class HostPort(CamelDocument):
    ip: str | None = None
    port: int | None = None


class RunnerStatus(CamelDocument):
    status: str = "?"
    reason: str | None = None
    since: float | None = None


class ShardAssignments(CamelDocument):
    """exo's `shardAssignments`: the same runners and shards as the body's own keys."""

    model_id: str | None = None
    node_to_runner: dict[str, str] = Field(default_factory=dict)
    runner_to_shard: dict[str, dict[str, ShardMetadata]] = Field(default_factory=dict)


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
    shard_assignments: ShardAssignments | None = None  # exo's nesting of the three above
    ephemeral_port: int | None = None  # exo: the port the group meets on (our store port)
    jaccl_devices: tuple[tuple[str | None, ...], ...] | None = None  # MlxJaccl: [i][j] device
    jaccl_coordinators: dict[str, str] | None = None  # MlxJaccl: node -> rank 0's host:port

    @model_validator(mode="before")
    @classmethod
    def _exo_nesting(cls, data: Any) -> Any:
        """exo's document has the runners only under shardAssignments: read them from there."""
        if isinstance(data, dict) and isinstance(data.get("shardAssignments"), dict):
            nested = data["shardAssignments"]
            for key in ("modelId", "nodeToRunner", "runnerToShard"):
                if key not in data and key in nested:
                    data = {**data, key: nested[key]}
        return data

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


# exo's InstanceMeta values, and the instance meta names they stand for
EXO_META = {"mlxring": "MlxRingInstance", "mlxjaccl": "MlxJacclInstance"}
INSTANCE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


def meta_name(text: str | None) -> str | None:
    """exo's instance_meta values (MlxRing, MlxJaccl) as the meta names they stand for;
    anything else unchanged (placement.plan.parse_meta judges it)."""
    if text is None:
        return None
    return EXO_META.get(text.strip().lower(), text)


def _choices_of(body: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    """The body's modelId/nodeToRunner/runnerToShard: shoal's top-level keys, else exo's
    `shardAssignments` (whose model id may also sit only in a shard's modelCard)."""
    if "nodeToRunner" in body or not isinstance(body.get("shardAssignments"), dict):
        return body, where
    nested = dict(body["shardAssignments"])
    if "modelId" not in nested:
        cards = [
            fields.get("modelCard", {}).get("modelId")
            for shard in (nested.get("runnerToShard") or {}).values()
            if isinstance(shard, dict)
            for fields in shard.values()
            if isinstance(fields, dict) and isinstance(fields.get("modelCard"), dict)
        ]
        nested["modelId"] = cards[0] if cards else body.get("modelId")
    return nested, f"{where}.shardAssignments"


def posted_instance_id(doc: Any) -> str | None:
    """The instanceId a posted {meta: body} names (None: placement picks one); ValueError if
    it is not a short id of letters, digits and . _ : - (runner ids and URLs are built on it)."""
    if not isinstance(doc, dict) or len(doc) != 1:
        return None
    body = next(iter(doc.values()))
    iid = body.get("instanceId") if isinstance(body, dict) else None
    if iid is None:
        return None
    if not isinstance(iid, str) or not 0 < len(iid) <= 128 or not set(iid) <= INSTANCE_ID_CHARS:
        raise ValueError(
            f"instanceId must be 1-128 letters, digits or . _ : - (e.g. a UUID), got {iid!r}"
        )
    return iid


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
    fields, where = _choices_of(body, f"instance.{meta}")
    posted = _validated(_PostedBody, fields, where)
    ranked, shardings = [], set()
    for node, rid in posted.node_to_runner.items():
        shard = posted.runner_to_shard.get(rid, {})
        if len(shard) != 1:
            raise ValueError(f"runner {rid!r} of node {node!r} has no shard in runnerToShard")
        ((kind, fields),) = shard.items()
        if kind not in SHARDING_OF_META:
            raise ValueError(f"runner {rid!r}: unknown shard kind {kind!r}")
        shardings.add(SHARDING_OF_META[kind])
        at = f"{where}.runnerToShard.{rid}.{kind}"
        ranked.append((_validated(_PostedShard, fields, at).device_rank, node))
    if len(shardings) != 1:
        raise ValueError("every runner of an instance must use the same sharding")
    ranks = sorted(rank for rank, _ in ranked)
    if ranks != list(range(len(ranked))):
        raise ValueError(f"deviceRank values must be 0..{len(ranked) - 1}, got {ranks}")
    return meta, posted.model_id, shardings.pop(), [node for _, node in sorted(ranked)]


# ---- model cards, downloads, runner statuses ------------------------------------------------

TORCH_BACKENDS = ("gloo", "nccl")


def model_card(model_id: str, held: HeldModel | None, storage_bytes: int = 0) -> dict[str, Any]:
    """exo's card of a model from what a node says it holds (zeros where no node holds it).
    shoal's torch engine splits every model it loads by heads; mlx only what mlx-lm can."""
    if held is None:
        return ModelCardDoc(model_id=model_id, storage_size=ByteSize(in_bytes=storage_bytes)).wire()
    tensor = bool(set(held.backends) & set(TORCH_BACKENDS)) or "tensor" in held.mlx_layouts
    return ModelCardDoc(
        model_id=model_id,
        storage_size=ByteSize(in_bytes=storage_bytes or held.weight_bytes),
        n_layers=held.num_layers,
        hidden_size=held.hidden_size,
        num_key_value_heads=held.num_kv_heads,
        supports_tensor=tensor,
        context_length=held.context_length,
        family=held.arch,
        backends=held.backends,
    ).wire()


def _whole_shard(card: dict[str, Any]) -> dict[str, Any]:
    n = int(card.get("nLayers") or 0)
    return {
        "PipelineShardMetadata": {
            "modelCard": card,
            "deviceRank": 0,
            "worldSize": 1,
            "startLayer": 0,
            "endLayer": n,
            "nLayers": n,
        }  # fmt: skip
    }


def downloads_of(r: NodeReport) -> list[dict[str, Any]]:
    """exo's download statuses of one node: each model on its disk is DownloadCompleted
    (size: what its weights take loaded, the number the report carries), each pull in flight
    DownloadOngoing, each failed one DownloadFailed."""
    out: list[dict[str, Any]] = []
    done = set()
    for held in r.models:
        card = model_card(held.model_id, held)
        size = memory(held.weight_bytes)
        out.append(
            {
                "DownloadCompleted": {
                    "nodeId": r.node_id,
                    "shardMetadata": _whole_shard(card),
                    "total": size,
                    "totalBytes": size,
                }  # fmt: skip
            }
        )
        done.add(held.model_id)
    for d in r.store.downloads if r.store is not None else ():
        base = {"nodeId": r.node_id, "shardMetadata": _whole_shard(model_card(d.model_id, None))}
        if d.status == "failed":
            out.append({"DownloadFailed": {**base, "errorMessage": d.error or "failed"}})
        elif d.status == "done":
            if d.model_id not in done:
                size = memory(d.bytes_total)
                out.append({"DownloadCompleted": {**base, "total": size, "totalBytes": size}})
        else:
            out.append({"DownloadOngoing": {**base, "downloadProgress": _progress(d, r.sent_at)}})
    return out


def _progress(d: DownloadState, now: float) -> dict[str, Any]:
    elapsed = max(now - d.started_at, 0.0) if d.started_at else 0.0
    speed = d.bytes_done / elapsed if elapsed > 0 else 0.0
    left = max(d.bytes_total - d.bytes_done, 0)
    return {
        "totalBytes": memory(d.bytes_total),
        "downloadedBytes": memory(d.bytes_done),
        "downloadedBytesThisSession": memory(d.bytes_done),
        "completedFiles": d.files_done,
        "totalFiles": d.files_total,
        "speed": speed,
        "etaMs": int(left / speed * 1000) if speed > 0 else 0,
        "files": {},
    }


# shoal's runner statuses -> exo's RunnerStatus tags
RUNNER_TAGS = {
    "idle": "RunnerIdle",
    "connecting": "RunnerConnecting",
    "connected": "RunnerConnected",
    "loading": "RunnerLoading",
    "loaded": "RunnerLoaded",
    "warming": "RunnerWarmingUp",
    "ready": "RunnerReady",
    "running": "RunnerRunning",
    "stopping": "RunnerShuttingDown",
    "stopped": "RunnerShutdown",
    "failed": "RunnerFailed",
}


def runner_tagged(state: RunnerState) -> dict[str, dict[str, Any]]:
    """{"RunnerReady": {...}} for one runner: what exo's clients test with `"RunnerReady" in`."""
    tag = RUNNER_TAGS.get(state.status) or "Runner" + state.status.title().replace("_", "")
    if tag == "RunnerLoading":
        loaded, total = state.layers or (0, 0)
        return {tag: {"layersLoaded": loaded, "totalLayers": total}}
    if tag == "RunnerReady":
        return {tag: {"prefillServerPort": None}}
    if tag == "RunnerFailed":
        return {tag: {"errorMessage": state.reason, "diagnostics": []}}
    return {tag: {}}


class TaggedRunnerStatus(BaseModel):
    """The tag keys a /state runner entry may carry beside shoal's own fields."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    runner_idle: dict[str, Any] | None = Field(None, alias="RunnerIdle")
    runner_connecting: dict[str, Any] | None = Field(None, alias="RunnerConnecting")
    runner_connected: dict[str, Any] | None = Field(None, alias="RunnerConnected")
    runner_loading: dict[str, Any] | None = Field(None, alias="RunnerLoading")
    runner_loaded: dict[str, Any] | None = Field(None, alias="RunnerLoaded")
    runner_warming_up: dict[str, Any] | None = Field(None, alias="RunnerWarmingUp")
    runner_ready: dict[str, Any] | None = Field(None, alias="RunnerReady")
    runner_running: dict[str, Any] | None = Field(None, alias="RunnerRunning")
    runner_shutting_down: dict[str, Any] | None = Field(None, alias="RunnerShuttingDown")
    runner_shutdown: dict[str, Any] | None = Field(None, alias="RunnerShutdown")
    runner_failed: dict[str, Any] | None = Field(None, alias="RunnerFailed")

    @model_serializer(mode="wrap")
    def _present_tags_only(self, handler: Any) -> dict[str, Any]:
        """Only the runner's own tag is a key: clients test `"RunnerReady" in runner`."""
        out = handler(self)
        for name, field in TaggedRunnerStatus.model_fields.items():
            for key in (name, field.alias):
                if key in out and out[key] is None:
                    del out[key]
        return out


# ---- instance documents: exo's keys beside shoal's ------------------------------------------


def exo_instance(
    document: Mapping[str, Any],
    spec: InstanceSpec | None = None,
    cards: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A {meta: body} from placement.plan.instance_document with exo's keys added: each
    shard's modelCard, shardAssignments {modelId, nodeToRunner, runnerToShard} and
    ephemeralPort, and for a JACCL instance its devices matrix and coordinators."""
    if not document:
        return dict(document)
    ((meta, raw),) = document.items()
    body = dict(raw)
    model_id = body.get("modelId") or ""
    card = (cards or {}).get(model_id) or model_card(model_id, None)
    shards = {
        rid: {kind: {**fields, "modelCard": card} for kind, fields in shard.items()}
        for rid, shard in (body.get("runnerToShard") or {}).items()
    }
    body["runnerToShard"] = shards
    body["shardAssignments"] = {
        "modelId": model_id,
        "nodeToRunner": dict(body.get("nodeToRunner") or {}),
        "runnerToShard": shards,
    }
    if spec is not None:
        body["ephemeralPort"] = spec.store_port
        if spec.backend == "jaccl":
            body["jacclDevices"] = [list(row) for row in spec.rdma_devices]
            coordinator = f"{spec.store_address}:{spec.store_port}"
            body["jacclCoordinators"] = {node: coordinator for node in spec.nodes}
    return {meta: InstanceBody.model_validate(body).wire()}
