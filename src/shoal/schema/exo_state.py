"""/state's exo keys built from shoal's reports: the topology (exo's older shape, which
cluster.view builds, and its current one), and the per-node maps nodeIdentities, nodeMemory,
nodeDisk, nodeSystem, nodeNetwork. Pure: reports in, exo's shapes out. The instance document
and the other exo shapes are in schema.exo."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shoal.schema.exo import ByteSize, CamelDocument, downloads_of
from shoal.schema.report import NodeReport

# ---- the topology cluster.view.state_document builds (exo's older shape) ---------------------
# nodes [{nodeId, nodeProfile}] and a list of connections; /state serves exo's current shape
# (below), translated from it by `exo_topology`, with every measurement kept on the edges.


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


# ---- /state's topology, exo's current shape -------------------------------------------------


class Multiaddr(BaseModel):
    """An edge's sink address as exo serialises its Multiaddr (snake_case computed fields)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    address: str  # /ip4/10.0.0.2/tcp/52415
    address_type: str = "ip4"
    ip_address: str = ""
    port: int = 0


class SocketEdge(CamelDocument):
    """exo's SocketConnection {sinkMultiaddr}, with shoal's measurements of the path beside it."""

    sink_multiaddr: Multiaddr
    local_multiaddr: str | None = None
    interface_kind: str = "other"
    rtt_ms: float | None = None
    one_way: bool = False
    recorded_by: tuple[str, ...] = ()  # "node:direction"


class RdmaEdge(CamelDocument):
    """exo's RDMAConnection (shoal writes none: its RDMA paths show in /cluster/links)."""

    source_rdma_iface: str
    sink_rdma_iface: str


class ExoTopology(CamelDocument):
    """{nodes: [node id], connections: {source: {sink: [edge]}}}."""

    nodes: tuple[str, ...] = ()
    connections: dict[str, dict[str, tuple[SocketEdge | RdmaEdge, ...]]] = Field(
        default_factory=dict
    )


def parse_multiaddr(text: str | None) -> Multiaddr | None:
    """'/ip4/10.0.0.2/tcp/52415' -> its parts; None for anything that is not /ipN|dns/host."""
    parts = (text or "").split("/")
    if len(parts) < 3 or parts[0] or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return None
    port = 0
    if len(parts) >= 5 and parts[3] == "tcp" and parts[4].isdigit():
        port = int(parts[4])
    return Multiaddr(address=text or "", address_type=parts[1], ip_address=parts[2], port=port)


def exo_topology(old: Topology | Mapping[str, Any]) -> dict[str, Any]:
    """The view's topology (node profiles, a list of connections) in exo's current shape."""
    topo = old if isinstance(old, Topology) else Topology.model_validate(old)
    connections: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for c in topo.connections:
        sink = parse_multiaddr(c.send_back_multiaddr)
        if sink is None:  # exo's edge is its sink address: without one there is no edge
            continue
        edge = SocketEdge(
            sink_multiaddr=sink,
            local_multiaddr=c.local_multiaddr,
            interface_kind=c.interface_kind,
            rtt_ms=c.rtt_ms,
            one_way=c.one_way,
            recorded_by=tuple(c.recorded_by),
        )
        by_sink = connections.setdefault(c.local_node_id, {})
        by_sink.setdefault(c.send_back_node_id, []).append(edge.wire())
    return {"nodes": [n.node_id for n in topo.nodes], "connections": connections}


# ---- /state's per-node maps, from each node's report ----------------------------------------

DEVICE_SEPARATOR = " · "  # cluster.machine.SEPARATOR: "MacBookPro18,2 · Apple M1 Max"
INTERFACE_TYPES = {"thunderbolt": "thunderbolt", "ethernet": "ethernet", "wifi": "wifi"}


class NodeIdentity(CamelDocument):
    model_id: str = "unknown"  # the machine: "MacBookPro18,2", a DMI product name
    chip_id: str = "unknown"  # "Apple M1 Max", the CPU's model name, or the first GPU's
    friendly_name: str = ""
    shoal_version: str = ""


class NodeMemory(CamelDocument):
    """RAM only: shoal's reports carry no swap figures, so exo's swap keys are left out."""

    ram_total: ByteSize = ByteSize()
    ram_available: ByteSize = ByteSize()


class NodeDisk(CamelDocument):
    total: ByteSize = ByteSize()
    available: ByteSize = ByteSize()


class NodeSystem(CamelDocument):
    """exo's pcpuUsage as a 0..1 share of the CPUs; GPU usage, temperature and power are not
    measured by shoal and left out."""

    pcpu_usage: float = 0.0
    cpu_count: int = 0
    cpu_percent: float = 0.0
    gpus: tuple[dict[str, Any], ...] = ()  # shoal's GpuInfo, snake_case as reports carry it


class InterfaceAddress(CamelDocument):
    name: str = ""
    ip_address: str = ""
    interface_type: str = "unknown"  # exo's: thunderbolt | ethernet | wifi | unknown
    kind: str = "other"  # shoal's own kind (loopback, vpn, bridge, veth, ...)


class NodeNetwork(CamelDocument):
    interfaces: tuple[InterfaceAddress, ...] = ()


def _split_device(r: NodeReport) -> tuple[str, str]:
    model, _, chip = r.resources.device.partition(DEVICE_SEPARATOR)
    return model, chip


def node_identity(r: NodeReport) -> dict[str, Any]:
    model, chip = _split_device(r)
    gpu = r.resources.gpus[0].name if r.resources.gpus else ""
    return NodeIdentity(
        model_id=model or "unknown",
        chip_id=chip or gpu or "unknown",
        friendly_name=r.name or r.node_id,
        shoal_version=r.version,
    ).wire()


def node_memory(r: NodeReport) -> dict[str, Any]:
    res = r.resources
    return NodeMemory(
        ram_total=ByteSize(in_bytes=res.ram_total),
        ram_available=ByteSize(in_bytes=res.ram_available),
    ).wire()


def node_disk(r: NodeReport) -> dict[str, Any] | None:
    """Where the node's downloads land; None for a node without a model store."""
    if r.store is None:
        return None
    return NodeDisk(
        total=ByteSize(in_bytes=r.store.disk_total), available=ByteSize(in_bytes=r.store.disk_free)
    ).wire()


def node_system(r: NodeReport) -> dict[str, Any]:
    res = r.resources
    return NodeSystem(
        pcpu_usage=round(res.cpu_percent / 100.0, 4),
        cpu_count=res.cpu_count,
        cpu_percent=res.cpu_percent,
        gpus=tuple(g.model_dump(mode="json") for g in res.gpus),
    ).wire()


def node_network(r: NodeReport) -> dict[str, Any]:
    return NodeNetwork(
        interfaces=tuple(
            InterfaceAddress(
                name=i.name,
                ip_address=a.split("/")[0],
                interface_type=INTERFACE_TYPES.get(str(i.kind), "unknown"),
                kind=str(i.kind),
            )
            for i in r.interfaces
            for a in i.addresses
        )
    ).wire()


def node_maps(reports: Iterable[NodeReport]) -> dict[str, dict[str, Any]]:
    """/state's per-node maps by exo's key names, one entry per alive node."""
    reports = sorted(reports, key=lambda r: r.node_id)
    disks = {r.node_id: d for r in reports if (d := node_disk(r)) is not None}
    return {
        "nodeIdentities": {r.node_id: node_identity(r) for r in reports},
        "nodeMemory": {r.node_id: node_memory(r) for r in reports},
        "nodeDisk": disks,
        "nodeSystem": {r.node_id: node_system(r) for r in reports},
        "nodeNetwork": {r.node_id: node_network(r) for r in reports},
        "downloads": {r.node_id: downloads_of(r) for r in reports},
    }
