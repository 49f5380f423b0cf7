"""The documents nodes exchange: each node owns one NodeReport and publishes it.

Plain pydantic models, no behaviour beyond validation: the pure logic that reads them lives in
view.py (merge, liveness, leader), links.py (path statistics) and interfaces.py (local kinds).
Every field has a default where an older peer might lack it, so a report from a node one
version behind still validates.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
MAX_REPORT_BYTES = 1_000_000  # a larger report from a peer is dropped, never parsed


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class InterfaceKind(StrEnum):
    LOOPBACK = "loopback"
    THUNDERBOLT = "thunderbolt"
    ETHERNET = "ethernet"
    WIFI = "wifi"
    VPN = "vpn"
    BRIDGE = "bridge"
    VETH = "veth"
    OTHER = "other"


class InterfaceInfo(Model):
    name: str
    kind: InterfaceKind = InterfaceKind.OTHER
    addresses: tuple[str, ...] = ()  # CIDR strings: "192.168.100.2/24", "fe80::1/64"
    mac: str | None = None
    up: bool = True
    speed_mbps: int | None = None  # link speed where the OS exposes it
    rdma: bool = False  # an RDMA device sits on this interface
    driver: str | None = None


class ThunderboltLink(Model):
    """One Thunderbolt port with a peer Mac (possibly behind hubs or docks)."""

    receptacle: str  # "1", "2", ... as system_profiler numbers the ports
    interface: str | None = None  # enX that networksetup pairs with "Thunderbolt N"
    peer_domain_uuid: str | None = None
    peer_name: str | None = None
    speed_gbps: float | None = None
    is_tb5: bool = False  # only for link speed > 40 Gb/s
    hops: int = 0  # hubs/docks between this port and the peer


class GpuInfo(Model):
    name: str
    backend: str  # "cuda" or "mps"
    memory_total: int | None = None  # bytes


class Resources(Model):
    ram_total: int = 0  # bytes
    ram_available: int = 0
    cpu_count: int = 0
    cpu_percent: float = 0.0
    gpus: tuple[GpuInfo, ...] = ()
    device: str = ""  # "MacBookPro18,2 · Apple M1 Max": model and chip (cluster.machine)


class PathStats(Model):
    """Measurements of one path: a local address to one address of a peer, one direction.

    direction "outbound": this node probed the peer's address and got identity-checked
    replies. "inbound": the peer's probes reached this node's local address (recorded by the
    receiver, so a path that works one way is visible on both sides).
    """

    peer_node_id: str
    peer_addr: str
    local_addr: str | None = None
    local_interface: str | None = None
    interface_kind: InterfaceKind = InterfaceKind.OTHER
    direction: str = "outbound"  # outbound | inbound
    rtt_ms_ewma: float | None = None
    rtt_ms_p50: float | None = None
    rtt_ms_p95: float | None = None
    loss: float = 0.0  # fraction of the recent window that got no reply
    sent: int = 0
    received: int = 0
    last_success: float | None = None  # unix time
    last_attempt: float | None = None


class NodeReport(Model):
    node_id: str
    name: str = ""
    boot_id: str = ""
    boot_started: float = 0.0  # unix time this process started: orders reports across boots
    seq: int = 0  # bumped on every change within a boot
    joined_at: float = 0.0  # first time this node id ever started: "earliest join" for leader
    pinned_leader: bool = False
    version: str = ""
    commit: str | None = None
    protocol: int = PROTOCOL_VERSION
    namespace_hash: str = ""
    flags: dict[str, str] = Field(default_factory=dict)  # settings that must match for drift
    api_port: int = 0
    addresses: tuple[str, ...] = ()  # where peers may reach this node's API (host:port)
    resources: Resources = Resources()
    engines: tuple[str, ...] = ()  # engine:device it can run: torch:cpu, torch:cuda, mlx:metal
    backends: tuple[str, ...] = ()  # instance backends it can run: gloo, nccl, ring, jaccl
    interfaces: tuple[InterfaceInfo, ...] = ()
    thunderbolt: tuple[ThunderboltLink, ...] = ()
    links: tuple[PathStats, ...] = ()
    shutting_down: bool = False  # a clean stop: peers drop this node at once
    sent_at: float = 0.0  # unix time the report was produced
    models: tuple[HeldModel, ...] = ()
    auto_place: tuple[AutoPlace, ...] = ()
    runners: tuple[RunnerState, ...] = ()
    plan: ClusterPlan | None = None  # the newest this node adopted; the leader's is the source
    health: tuple[PathHealth, ...] = ()
    store: StoreState | None = None  # the model store: where downloads land, what is in flight


# -- instances: what the leader plans and what each node runs ----------------------------------


class HeldModel(Model):
    """A model this node can load from its own disk: what placement may assign to it."""

    model_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    weight_bytes: int  # bytes the weights take once loaded on this node's device and dtype
    dtype_bytes: int = 4
    context_length: int = 0
    arch: str = ""  # model_type / general.architecture
    # what this node may place it with: the card's backends that the node can run
    backends: tuple[str, ...] = ("gloo", "nccl")
    mlx_layouts: tuple[str, ...] = ()  # pipeline / tensor: what mlx-lm can split it into here
    mlx_weight_bytes: int = 0  # bytes its weights take on the MLX engine (quantized stay so)
    files_digest: str | None = None  # paths and sizes of its files: nodes that differ don't mix


class AutoPlace(Model):
    """`shoal run --model X --min-nodes N`: the leader places X once N nodes hold it."""

    model_id: str
    min_nodes: int = 2
    sharding: str = "pipeline"  # pipeline | tensor
    backend: str = "gloo"  # gloo | nccl | ring | jaccl
    allow_blocked: bool = False  # `shoal run --allow-blocked`: the card's block is overridden


# The engine an instance of each backend runs on: torch (gloo over TCP, nccl on CUDA) or mlx
# (mx.distributed's ring over TCP, JACCL's RDMA over Thunderbolt 5).
BACKEND_ENGINE = {"gloo": "torch", "nccl": "torch", "ring": "mlx", "jaccl": "mlx"}
MLX_BACKENDS = frozenset(b for b, engine in BACKEND_ENGINE.items() if engine == "mlx")


class InstanceSpec(Model):
    """One placed instance: a model split over nodes in rank order."""

    instance_id: str
    model_id: str
    sharding: str = "pipeline"  # pipeline | tensor
    backend: str = "gloo"  # gloo | nccl (torch engine) | ring | jaccl (mlx engine)
    engine: str = "torch"  # torch | mlx: which engine its runners load the model with
    meta: str = "GlooInstance"  # the instance meta name shown in /state (exo-style)
    nodes: tuple[str, ...] = ()  # rank order
    layer_ranges: tuple[tuple[int, int], ...] = ()  # [start, end) per rank
    store_address: str = ""  # rank 0's host that every rank dials (TCPStore)
    store_port: int = 0
    rank_addresses: tuple[str, ...] = ()  # where each rank is reached
    rank_interfaces: tuple[str | None, ...] = ()  # GLOO/NCCL_SOCKET_IFNAME per rank
    rdma_devices: tuple[tuple[str | None, ...], ...] = ()  # jaccl: [i][j] rank i's device to j
    created_at: float = 0.0
    generation: int = 0  # bumped when the leader re-places it (failover, recovery)
    reason: str = ""  # why this generation was placed


class ClusterPlan(Model):
    """Written only by the leader; newest (term, version) wins everywhere."""

    term: int = 0
    version: int = 0
    leader: str = ""
    instances: tuple[InstanceSpec, ...] = ()


class PathHealth(Model):
    """A node's verdict on one of its outbound paths (cluster.health)."""

    peer_node_id: str
    peer_addr: str
    interface_kind: InterfaceKind = InterfaceKind.OTHER
    status: str = "ok"  # ok | degraded | down
    reason: str = ""
    since: float = 0.0
    baseline_ms: float | None = None
    current_ms: float | None = None


class RunnerState(Model):
    """One runner subprocess on this node, as its node reports it."""

    runner_id: str
    instance_id: str
    model_id: str = ""
    rank: int = 0
    status: str = "idle"  # idle connecting loading warming ready running failed stopped
    reason: str | None = None
    port: int | None = None  # rank 0: its OpenAI endpoint's port
    pid: int | None = None
    since: float = 0.0
    tokens: int = 0  # rank 0: tokens generated so far
    tok_s: float | None = None  # rank 0: recent generation rate
    context_length: int | None = None  # rank 0, once ready: the longest sequence it serves
    layers: tuple[int, int] | None = None  # while loading: (layers loaded, of this rank's)


class DownloadState(Model):
    """One `shoal models pull` / `POST /models/pull` on this node: each snapshot of the pull's
    progress, as it goes into the node's report and `/state` unchanged."""

    model_id: str
    status: Literal["downloading", "done", "failed"] = "downloading"
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    current_file: str | None = None
    error: str | None = None
    started_at: float = 0.0
    finished_at: float | None = None


class StoreState(Model):
    root: str = ""
    readonly: tuple[str, ...] = ()
    disk_free: int = 0  # bytes free where downloads land
    disk_total: int = 0
    downloads: tuple[DownloadState, ...] = ()


NodeReport.model_rebuild()
