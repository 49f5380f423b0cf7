"""The HTTP documents a node serves about the cluster: /state, /cluster/nodes, /cluster/links,
/cluster/alerts, /cluster/history, and the small answers the `shoal` tools read.

The routes declare these as their response models and the tools parse with them, so writer
and reader share one type. Every field a node writes is declared; unknown keys are kept
(`extra="allow"`), so a newer node's additions pass through an older one unchanged, and
every field has a default where an older node might lack it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from shoal.schema.exo import InstanceBody, TaggedRunnerStatus, instance_body
from shoal.schema.exo_state import (
    ExoTopology,
    NodeDisk,
    NodeIdentity,
    NodeMemory,
    NodeNetwork,
    NodeSystem,
    Topology,
)
from shoal.schema.report import NodeReport, PathStats, RunnerState, StoreState


class Document(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)


# ---- /cluster/nodes, /cluster/links ----------------------------------------------------------


class NodeRow(NodeReport):
    """One node as this node's view holds it: its report (links aside: /cluster/links has
    them) plus the view's verdict."""

    model_config = ConfigDict(frozen=True, extra="allow")

    links: tuple[PathStats, ...] = Field((), exclude=True)
    status: str = "?"  # alive | suspect | gone
    gone_reason: str | None = None
    is_self: bool = False
    is_leader: bool = False
    last_seen: float = 0.0
    seconds_since_seen: float = 0.0
    misses: int = 0

    @property
    def display_name(self) -> str:
        return self.name or self.node_id


class LinkRow(Document):
    """One path record, oriented from -> to, as one side recorded it."""

    from_node: str | None = None
    from_addr: str | None = None
    to_node: str | None = None
    to_addr: str | None = None
    recorded_by: str | None = None
    local_interface: str | None = None
    interface_kind: str = "other"
    direction: str = "?"
    rtt_ms_ewma: float | None = None
    rtt_ms_p50: float | None = None
    rtt_ms_p95: float | None = None
    loss: float | None = None
    sent: int = 0
    received: int = 0
    last_success: float | None = None
    last_attempt: float | None = None
    recent: bool = False
    one_way: bool = False  # only one way of this address pair works


class NodesDocument(Document):
    """GET /cluster/nodes: every node this one knows, gone ones with the reason."""

    self_id: str | None = Field(None, alias="self")
    leader: str | None = None
    nodes: tuple[NodeRow, ...] = ()


class LinksDocument(Document):
    """GET /cluster/links: every path record of every alive node."""

    self_id: str | None = Field(None, alias="self")
    recent_window_s: float = 0.0
    links: tuple[LinkRow, ...] = ()


# ---- alerts and events -----------------------------------------------------------------------


class Alert(Document):
    """Something wrong now; path alerts name `node`, instance alerts `instance` and carry
    their reason's code and fields, runner alerts `runner`."""

    kind: str | None = None  # path | instance | runner
    status: str | None = None
    message: str | None = None
    since: float | None = None


class Event(Document):
    """One entry of a node's history; a reason's code and fields ride along as extras."""

    at: float = 0.0
    kind: str = "?"
    message: str = ""


class AlertsDocument(Document):
    """GET /cluster/alerts."""

    alerts: tuple[Alert, ...] = ()
    events: tuple[Event, ...] = ()


class HistoryDocument(Document):
    """GET /cluster/history: every alive node's events, oldest first, each `recorded_by`."""

    events: tuple[Event, ...] = ()
    unreachable: tuple[str, ...] = ()


# ---- /state ----------------------------------------------------------------------------------


class RefusedPeer(Document):
    node_id: str | None = None
    name: str = ""
    reason: str = ""
    count: int = 0
    first_at: float = 0.0
    last_at: float = 0.0


class PreflightCheck(Document):
    """One path an instance needs, checked against its kind's thresholds."""

    src: str = ""
    dst: str = ""
    host: str = ""
    kind: str = ""
    rtt_ms: float | None = None
    loss: float = 0.0
    ok: bool = False
    code: str = ""
    bound_ms: float | None = None
    max_loss: float | None = None
    better_host: str = ""
    better_kind: str = ""
    better_rtt_ms: float | None = None
    reason: str = ""
    better: str | None = None
    message: str | None = None  # the check as one sentence


class UsedPathRow(Document):
    src: str
    dst: str
    host: str | None = None
    kind: str | None = None  # the interface kind the source measured it on


class ModelRow(Document):
    """One model any node holds or downloads."""

    model_id: str
    holders: dict[str, str | None] = Field(default_factory=dict)  # node -> files digest
    differ: tuple[str, ...] = ()  # nodes whose files differ from the rest
    card: dict[str, Any] | None = None
    downloads: tuple[dict[str, Any], ...] = ()


class Hint(Document):
    kind: str = "?"
    node: str | None = None
    interface: str | None = None
    message: str = ""


class PlanRef(Document):
    term: int = 0
    version: int = 0
    leader: str = ""


class StateRunner(RunnerState, TaggedRunnerStatus):
    """A runner in /state: shoal's fields and exo's tag of its status ({"RunnerReady": {}})."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    runner_id: str = ""  # exo's entries are the tag alone: its key is the runner's id
    instance_id: str = ""


EXO_FIELDS = (
    "node_identities", "node_memory", "node_disk", "node_system", "node_network", "downloads",
)  # fmt: skip
# present only where the node runs a controller; absent (not null) elsewhere
CONTROLLER_FIELDS = (
    "instances", "runners", "alerts", "preflight", "instance_paths", "models", "hints",
    "events", "plan",
)  # fmt: skip


class StateDocument(Document):
    """GET /state: exo's keys (topology, nodeIdentities, nodeMemory, nodeDisk, nodeSystem,
    nodeNetwork, downloads; instances and runners carry exo's keys too) plus the view (nodes,
    links, drift, refused) and, on a node with a controller, its instances, runners, alerts,
    preflight, models and history."""

    # /state serves exo's current shape; cluster.view.state_document, before the route
    # translates it (schema.exo_state.exo_topology), the older one of node profiles
    topology: ExoTopology | Topology = ExoTopology()
    # exo's per-node maps (schema.exo_state.node_maps): None, and absent, before the route adds them
    node_identities: dict[str, NodeIdentity] | None = Field(None, alias="nodeIdentities")
    node_memory: dict[str, NodeMemory] | None = Field(None, alias="nodeMemory")
    node_disk: dict[str, NodeDisk] | None = Field(None, alias="nodeDisk")
    node_system: dict[str, NodeSystem] | None = Field(None, alias="nodeSystem")
    node_network: dict[str, NodeNetwork] | None = Field(None, alias="nodeNetwork")
    downloads: dict[str, tuple[dict[str, Any], ...]] | None = None
    self_id: str | None = Field(None, alias="self")
    leader: str | None = None
    nodes: tuple[NodeRow, ...] = ()
    links: tuple[LinkRow, ...] = ()
    drift: tuple[str, ...] = ()
    refused: tuple[RefusedPeer, ...] = ()
    instances: dict[str, dict[str, InstanceBody]] | None = None  # id -> {meta: body}
    runners: dict[str, StateRunner] | None = None
    alerts: tuple[Alert, ...] | None = None  # None: no controller on this node
    preflight: dict[str, tuple[PreflightCheck, ...]] | None = None
    instance_paths: dict[str, tuple[UsedPathRow, ...]] | None = None
    models: tuple[ModelRow, ...] | None = None
    hints: tuple[Hint, ...] | None = None
    events: tuple[Event, ...] | None = None
    plan: PlanRef | None = None

    @model_serializer(mode="wrap")
    def _controller_parts_only_when_present(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for name in CONTROLLER_FIELDS + EXO_FIELDS:
            for key in (name, type(self).model_fields[name].alias):
                if key and out.get(key, ...) is None:
                    del out[key]
        return out

    @classmethod
    def of(cls, state: StateDocument | dict[str, Any]) -> StateDocument:
        return state if isinstance(state, StateDocument) else cls.model_validate(state)

    def instance_bodies(self) -> dict[str, InstanceBody]:
        return {iid: instance_body(doc) for iid, doc in (self.instances or {}).items()}


class PreflightDocument(Document):
    """GET /instance/preflight: the layout placement would choose and its paths' checks."""

    ok: bool = False
    instance: dict[str, InstanceBody] = Field(default_factory=dict)
    checks: tuple[PreflightCheck, ...] = ()


class Preview(Document):
    model_id: str
    sharding: str
    instance_meta: str
    min_nodes: int
    instance: dict[str, InstanceBody] | None = None  # None: refused, `error` says why
    error: str | None = None


class PreviewsDocument(Document):
    """GET /instance/previews: every layout kind and node count, placed or refused."""

    previews: tuple[Preview, ...] = ()


# ---- the small answers the tools read --------------------------------------------------------


class ModelEntry(Document):
    id: str


class ModelList(Document):
    """GET /v1/models (only the ids: a server may leave out OpenAI's other fields)."""

    data: tuple[ModelEntry, ...] = ()


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
