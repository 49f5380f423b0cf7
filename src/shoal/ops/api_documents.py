"""The HTTP documents the `shoal` subcommands read, as pydantic types (extra fields ignored).

Only what the tools read is declared; every field has a default so a document from an older
node, or a partial one in a test, still validates. These stand in until `shoal.schema` holds
the HTTP documents (/state, /cluster/*, instance documents); then they are imported from there.
The node rows reuse the report types of `shoal.schema.report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from shoal.models.manifest import Manifest
from shoal.schema.report import (
    HeldModel,
    InterfaceInfo,
    Resources,
    RunnerState,
    StoreState,
)


class Document(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class CamelDocument(BaseModel):
    """exo's camelCase shapes (the instance document): fields by their snake_case names."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True
    )


# ---- /state, /cluster/nodes, /cluster/links --------------------------------------------------


class NodeRow(Document):
    """One node as this node's view holds it: its report plus the view's verdict."""

    node_id: str
    name: str = ""
    status: str = "?"  # alive | suspect | gone
    gone_reason: str | None = None
    is_self: bool = False
    is_leader: bool = False
    seconds_since_seen: float = 0.0
    version: str = "?"
    addresses: tuple[str, ...] = ()  # host:port where peers reach its API
    resources: Resources = Resources()
    interfaces: tuple[InterfaceInfo, ...] = ()
    models: tuple[HeldModel, ...] = ()
    store: StoreState | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.node_id


class LinkRow(Document):
    """One path record, oriented from -> to, as one side recorded it."""

    from_node: str | None = None
    from_addr: str | None = None
    to_node: str | None = None
    to_addr: str | None = None
    interface_kind: str = "?"
    direction: str = "?"
    rtt_ms_ewma: float | None = None
    rtt_ms_p95: float | None = None
    loss: float | None = None
    recent: bool = False
    one_way: bool = False
    recorded_by: str | None = None


class RefusedPeer(Document):
    node_id: str | None = None
    name: str = ""
    reason: str = ""


class Alert(Document):
    kind: str | None = None
    status: str | None = None
    message: str | None = None


class Event(Document):
    at: float = 0.0
    kind: str = "?"
    message: str = ""


class PreflightCheck(Document):
    ok: bool = False
    message: str | None = None
    better: str | None = None


# ---- the instance document: {meta: body} -----------------------------------------------------


class Shard(CamelDocument):
    model_id: str | None = None
    device_rank: int = 0
    world_size: int | None = None
    start_layer: int | None = None
    end_layer: int | None = None


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
    sharding: str | None = None
    backend: str | None = None
    node_to_runner: dict[str, str] = Field(default_factory=dict)
    runner_to_shard: dict[str, dict[str, Shard]] = Field(default_factory=dict)  # {meta: shard}
    hosts_by_node: dict[str, tuple[HostPort, ...]] = Field(default_factory=dict)
    store_address: str | None = None  # host:port
    rank_interfaces: dict[str, str | None] = Field(default_factory=dict)
    runner_status: dict[str, RunnerStatus] = Field(default_factory=dict)
    generation: int = 0
    placed_because: str = ""

    def shard(self, runner_id: str) -> Shard:
        """The runner's shard, whatever its meta key; an empty one for an unknown runner."""
        return next(iter(self.runner_to_shard.get(runner_id, {}).values()), Shard())


def instance_body(document: Mapping[str, Any] | None) -> InstanceBody:
    """{meta: body} -> body (an empty body for an empty document)."""
    if not document:
        return InstanceBody()
    body = next(iter(document.values()))
    return body if isinstance(body, InstanceBody) else InstanceBody.model_validate(body)


class StateDocument(Document):
    """GET /state: the view (nodes, links, drift) and, with a controller, its instances."""

    leader: str | None = None
    nodes: tuple[NodeRow, ...] = ()
    links: tuple[LinkRow, ...] = ()
    drift: tuple[str, ...] = ()
    refused: tuple[RefusedPeer, ...] = ()
    instances: dict[str, dict[str, InstanceBody]] | None = None  # id -> {meta: body}
    runners: dict[str, RunnerState] = Field(default_factory=dict)
    preflight: dict[str, tuple[PreflightCheck, ...]] = Field(default_factory=dict)
    alerts: tuple[Alert, ...] | None = None  # None: no controller on this node
    events: tuple[Event, ...] = ()

    @classmethod
    def of(cls, state: StateDocument | Mapping[str, Any]) -> StateDocument:
        return state if isinstance(state, StateDocument) else cls.model_validate(state)

    def instance_bodies(self) -> dict[str, InstanceBody]:
        return {iid: instance_body(doc) for iid, doc in (self.instances or {}).items()}


class NodesDocument(Document):
    """GET /cluster/nodes."""

    self_id: str | None = Field(None, alias="self")
    leader: str | None = None
    nodes: tuple[NodeRow, ...] = ()


# ---- the rest the tools read -----------------------------------------------------------------


class ModelEntry(Document):
    id: str


class ModelList(Document):
    """GET /v1/models (only the ids: a server may leave out OpenAI's other fields)."""

    data: tuple[ModelEntry, ...] = ()


class ManifestEntry(Document):
    name: str | None = None
    node_id: str | None = None
    manifest: Manifest | None = None
    error: str | None = None


class ManifestsDocument(Document):
    """GET /cluster/manifests/{model}: every node's manifest and the card this node holds."""

    nodes: tuple[ManifestEntry, ...] = ()
    card: dict[str, Any] = Field(default_factory=dict)

    def by_name(self) -> dict[str, Manifest | str]:
        """Manifests by node name: the manifest, or why there is none."""
        out: dict[str, Manifest | str] = {}
        for entry in self.nodes:
            name = entry.name or entry.node_id or "?"
            out[name] = entry.manifest if entry.manifest is not None else (
                entry.error or "no manifest"
            )
        return out


class Reach(Document):
    """GET /cluster/reach: could that node open a TCP connection to host:port."""

    ok: bool = False
    ms: float | None = None
    error: str | None = None


class CreatedInstance(Document):
    instance_id: str


class StoreDocument(Document):
    """GET /models (the store part)."""

    store: StoreState = StoreState()


class ChatMessage(Document):
    content: str | None = None


class ChatChoice(Document):
    message: ChatMessage | None = None


class ChatReply(Document):
    """A non-streamed chat completion, as far as the tools read it."""

    choices: tuple[ChatChoice, ...] = ()

    @property
    def text(self) -> str:
        message = self.choices[0].message if self.choices else None
        return (message.content if message else None) or ""


class Usage(Document):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CompletionReply(Document):
    usage: Usage
