"""The replicated cluster view: each peer's newest report, liveness, leader, and /state.

Pure: no sockets, threads or clock reads; the poll loop owns the I/O and passes `now` in. Every
node folds the same reports the same way, so every node computes the same leader.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any, NamedTuple

from shoal.schema.report import PROTOCOL_VERSION, NodeReport, PathStats


class PeerStatus(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # missed polls lately: still counts for leadership, but flagged
    GONE = "gone"


@dataclass(frozen=True)
class Timing:
    suspect_after: float = 1.0  # seconds since the last successful poll (polls every 0.5 s)
    gone_after: float = 2.0  # 4 polls in a row unanswered (config: --gone-after)
    link_recent: float = 10.0  # a path whose last success is this recent counts as working
    refused_kept: int = 32  # distinct refused nodes remembered for /state

    def __post_init__(self) -> None:
        if not 0 < self.suspect_after < self.gone_after:
            raise ValueError(f"need 0 < suspect_after < gone_after: {self}")


@dataclass(frozen=True)
class PeerState:
    report: NodeReport
    accepted_at: float  # when `report` arrived: with its sent_at, gives the peer's clock offset
    last_seen: float  # last successful poll or accepted report
    misses: int = 0  # consecutive failed polls
    status: PeerStatus = PeerStatus.ALIVE
    gone_reason: str | None = None
    left: bool = False  # said goodbye or shut down: only a newer report brings it back


@dataclass(frozen=True)
class Refusal:
    node_id: str
    name: str
    reason: str
    count: int
    first_at: float
    last_at: float


def is_newer(candidate: NodeReport, held: NodeReport | None) -> bool:
    """Newest by (boot_started, seq): a restart wins even with a smaller seq."""
    return held is None or (candidate.boot_started, candidate.seq) > (held.boot_started, held.seq)


class ClusterView:
    """This node's copy of the cluster: the peers' reports and what their silence means."""

    def __init__(
        self,
        self_id: str,
        namespace_hash: str,
        *,
        self_boot_id: str = "",
        protocol: int = PROTOCOL_VERSION,
        timing: Timing | None = None,
    ) -> None:
        self.self_id = self_id
        self.self_boot_id = self_boot_id
        self.namespace_hash = namespace_hash
        self.protocol = protocol
        self.timing = timing or Timing()
        self.peers: dict[str, PeerState] = {}
        self.self_report: NodeReport | None = None
        self.refused: dict[str, Refusal] = {}

    def accept(self, report: NodeReport, now: float) -> bool:
        """Merge a polled or pushed report; True when it replaced what we held."""
        reason = self._refusal_reason(report)
        if reason is not None:
            self._refuse(report, reason, now)
            return False
        if report.node_id == self.self_id:  # ours: from our report loop, or a --peers loop back
            if is_newer(report, self.self_report):
                self.self_report = report
            return False
        held = self.peers.get(report.node_id)
        if held is not None and not is_newer(report, held.report):
            unchanged = (report.boot_id, report.seq) == (held.report.boot_id, held.report.seq)
            if unchanged and not held.left:
                # an answered poll with nothing new still proves the peer is reachable
                self.peers[report.node_id] = replace(
                    held, last_seen=now, misses=0, status=PeerStatus.ALIVE, gone_reason=None
                )
            return False
        self.refused.pop(report.node_id, None)  # e.g. it was restarted with the right namespace
        if report.shutting_down:
            gone = dict(status=PeerStatus.GONE, gone_reason="shutting down", left=True)
            self.peers[report.node_id] = PeerState(report, now, now, **gone)
        else:
            self.peers[report.node_id] = PeerState(report, now, now)  # a rejoin lands here too
        return True

    def miss(self, node_id: str, now: float) -> None:
        """A failed poll of this peer."""
        held = self.peers.get(node_id)
        if held is not None:
            self.peers[node_id] = self._aged(replace(held, misses=held.misses + 1), now)

    def goodbye(self, node_id: str, boot_id: str) -> bool:
        """mDNS goodbye or shutdown notice: gone at once, unless it is from an older boot."""
        held = self.peers.get(node_id)
        if held is None or held.report.boot_id != boot_id:
            return False  # a late goodbye of a previous boot must not remove the restarted node
        self.peers[node_id] = replace(
            held, status=PeerStatus.GONE, gone_reason="said goodbye", left=True
        )
        return True

    def refresh(self, now: float) -> dict[str, PeerStatus]:
        """Re-derive statuses from time since last_seen; returns the peers that changed."""
        before = {n: p.status for n, p in self.peers.items()}
        self.peers = {n: self._aged(p, now) for n, p in self.peers.items()}
        return {n: p.status for n, p in self.peers.items() if p.status != before[n]}

    def report_of(self, node_id: str) -> NodeReport | None:
        """The newest report held for a node, ours included once accepted."""
        if node_id == self.self_id:
            return self.self_report
        held = self.peers.get(node_id)
        return held.report if held else None

    def alive(self) -> list[str]:
        """Node ids that count for leadership and placement (self and suspects included)."""
        ids = {self.self_id}
        ids.update(n for n, p in self.peers.items() if p.status != PeerStatus.GONE)
        return sorted(ids)

    def suspects(self) -> list[str]:
        return sorted(n for n, p in self.peers.items() if p.status == PeerStatus.SUSPECT)

    def alive_reports(self, self_report: NodeReport) -> list[NodeReport]:
        peers = [p.report for n, p in self.peers.items() if p.status != PeerStatus.GONE]
        return sorted([self_report, *peers], key=lambda r: r.node_id)

    def leader(self, self_report: NodeReport) -> str | None:
        return choose_leader(self.alive_reports(self_report))

    def _aged(self, held: PeerState, now: float) -> PeerState:
        if held.status == PeerStatus.GONE:
            return held  # only a report brings a gone peer back (see accept)
        silent = now - held.last_seen
        if silent > self.timing.gone_after:
            reason = f"no report for {silent:.1f} s ({held.misses} missed polls)"
            return replace(held, status=PeerStatus.GONE, gone_reason=reason)
        if silent > self.timing.suspect_after:
            return replace(held, status=PeerStatus.SUSPECT)
        return held

    def _refusal_reason(self, report: NodeReport) -> str | None:
        theirs, ours = report.namespace_hash, self.namespace_hash
        if theirs != ours:
            return f"namespace hash {theirs!r} is not ours ({ours!r}): give both one namespace"
        if report.protocol != self.protocol:
            return f"protocol {report.protocol}, ours is {self.protocol}: run one shoal version"
        if report.node_id == self.self_id and self.self_boot_id not in ("", report.boot_id):
            return "our node id from another machine: node.json was copied; delete it there"
        return None

    def _refuse(self, report: NodeReport, reason: str, now: float) -> None:
        self.refuse(report.node_id, report.name, reason, now)

    def refuse(self, node_id: str, name: str, reason: str, now: float) -> None:
        """Record a node refused (its report, or its answers: e.g. not signed with our cluster
        secret); kept for /state until it merges, the most recent `refused_kept` of them."""
        held = self.refused.get(node_id)
        first_at, count = (held.first_at, held.count + 1) if held else (now, 1)
        self.refused[node_id] = Refusal(node_id, name, reason, count, first_at, now)
        while len(self.refused) > self.timing.refused_kept:
            oldest = min(self.refused.values(), key=lambda r: r.last_at)
            del self.refused[oldest.node_id]


def choose_leader(reports: Iterable[NodeReport]) -> str | None:
    """Pinned first, then earliest join, then smallest node id; None for an empty set."""

    def rank(r: NodeReport) -> tuple[bool, float, str]:
        # joined_at 0 means a peer that does not report it: rank it last, not first
        return (not r.pinned_leader, r.joined_at if r.joined_at > 0 else math.inf, r.node_id)

    best = min(reports, key=rank, default=None)
    return best.node_id if best else None


def membership_changes(
    before: Mapping[str, PeerStatus], after: Mapping[str, PeerStatus]
) -> list[tuple[str, str]]:
    """(node id, "node_joined" | "node_gone") per peer whose membership changed between two
    snapshots of the peers' statuses: joined when first seen or back after gone (suspect and
    alive are both members), gone when it turned gone. A peer first seen gone is no event."""
    changes = []
    for node_id, status in sorted(after.items()):
        was = before.get(node_id)
        if status != PeerStatus.GONE and was in (None, PeerStatus.GONE):
            changes.append((node_id, "node_joined"))
        elif status == PeerStatus.GONE and was not in (None, PeerStatus.GONE):
            changes.append((node_id, "node_gone"))
    return changes


def drift_warnings(reports: Iterable[NodeReport]) -> list[str]:
    """One sentence per setting that differs across the given (alive) nodes."""
    reports = sorted(reports, key=lambda r: r.node_id)
    labels = _labels(reports)
    checks: list[tuple[str, dict[str, str]]] = [
        ("version", {r.node_id: r.version or "(unknown)" for r in reports}),
        # a node that does not know its commit (installed from a wheel) is no evidence of drift
        ("commit", {r.node_id: r.commit for r in reports if r.commit}),
        ("protocol", {r.node_id: str(r.protocol) for r in reports}),
    ]
    for key in sorted({k for r in reports for k in r.flags}):
        checks.append((f"flag {key}", {r.node_id: r.flags.get(key, "(unset)") for r in reports}))
    warnings = []
    for what, values in checks:
        by_value: dict[str, list[str]] = {}
        for node_id, value in values.items():
            by_value.setdefault(value, []).append(labels[node_id])
        if len(by_value) > 1:
            parts = "; ".join(f"{v} on {', '.join(sorted(n))}" for v, n in sorted(by_value.items()))
            warnings.append(f"{what} differs across nodes: {parts}")
    return warnings


def _labels(reports: list[NodeReport]) -> dict[str, str]:
    """Friendly names, with the node id added where two nodes share a name."""
    names = [r.name for r in reports]
    unique = {r.node_id for r in reports if r.name and names.count(r.name) == 1}
    return {r.node_id: r.name if r.node_id in unique else _id_label(r) for r in reports}


def _id_label(r: NodeReport) -> str:
    return f"{r.name} ({r.node_id})" if r.name else r.node_id


# --- documents served by the API --------------------------------------------------------------


class _Path(NamedTuple):
    """One direction of a path: from_node's from_addr to to_node's to_addr."""

    from_node: str
    from_addr: str | None
    to_node: str
    to_addr: str | None

    def reversed(self) -> _Path:
        return _Path(self.to_node, self.to_addr, self.from_node, self.from_addr)


def _oriented(owner: NodeReport, stats: PathStats) -> _Path:
    if stats.direction == "inbound":  # the peer's probes reached the owner
        return _Path(stats.peer_node_id, stats.peer_addr, owner.node_id, stats.local_addr)
    return _Path(owner.node_id, stats.local_addr, stats.peer_node_id, stats.peer_addr)


def _same(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b  # an unrecorded address matches any


_ORIENTED_FIELDS = {"peer_node_id", "peer_addr", "local_addr"}  # replaced by from_/to_ fields


def _link_rows(view: ClusterView, reports: list[NodeReport], now: float) -> list[dict[str, Any]]:
    records = []
    working: dict[tuple[str, str], list[tuple[str | None, str | None]]] = {}
    # each peer's clock minus ours, from its report's sent_at and when we accepted it
    offsets = {n: p.report.sent_at - p.accepted_at for n, p in view.peers.items()}
    for owner in reports:
        # last_success is on the recorder's clock: judge its age there, so clock skew between
        # machines cannot make a working path look stale or a dead one look fresh
        owner_now = now + (offsets.get(owner.node_id, 0.0) if owner.sent_at else 0.0)
        for stats in owner.links:
            path = _oriented(owner, stats)
            age = owner_now - stats.last_success if stats.last_success is not None else math.inf
            recent = age <= view.timing.link_recent
            records.append((owner, stats, path, recent))
            if recent:
                pair = working.setdefault((path.from_node, path.to_node), [])
                pair.append((path.from_addr, path.to_addr))

    def works(p: _Path) -> bool:
        known = working.get((p.from_node, p.to_node), [])
        return any(_same(p.from_addr, a) and _same(p.to_addr, b) for a, b in known)

    rows = [
        {
            **path._asdict(),
            "recorded_by": owner.node_id,
            **stats.model_dump(mode="json", exclude=_ORIENTED_FIELDS),
            "recent": recent,
            # only one way of this address pair works, whichever side recorded it
            "one_way": works(path) != works(path.reversed()),
        }
        for owner, stats, path, recent in records
    ]
    order = ("from_node", "to_node", "from_addr", "to_addr", "recorded_by", "direction")
    return sorted(rows, key=lambda row: tuple(row[k] or "" for k in order))


def _multiaddr(addr: str | None, port: int = 0) -> str | None:
    if not addr:
        return None
    host = addr.split("/")[0]
    try:
        family = f"ip{ipaddress.ip_address(host.split('%')[0]).version}"
    except ValueError:
        family = "dns"
    return f"/{family}/{host}" + (f"/tcp/{port}" if port else "")


def _connections(rows: list[dict[str, Any]], ports: dict[str, int]) -> list[dict[str, Any]]:
    """exo-style edges, one per (source, sink, sink address), from either side's records."""
    edges: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for row in (r for r in rows if r["recent"]):
        key = (row["from_node"], row["to_node"], row["to_addr"])
        edge = edges.setdefault(
            key,
            {
                "localNodeId": row["from_node"],
                "sendBackNodeId": row["to_node"],
                "localMultiaddr": _multiaddr(row["from_addr"]),
                "sendBackMultiaddr": _multiaddr(row["to_addr"], ports.get(row["to_node"], 0)),
                "interfaceKind": row["interface_kind"],
                "rttMs": row["rtt_ms_ewma"],
                "oneWay": row["one_way"],
                "recordedBy": [],
            },
        )
        edge["recordedBy"].append(f"{row['recorded_by']}:{row['direction']}")
    return list(edges.values())


def _profile(r: NodeReport) -> dict[str, Any]:
    res = r.resources
    gpus = [g.model_dump(mode="json") for g in res.gpus]
    return {
        "modelId": res.device or "unknown",
        "chipId": res.gpus[0].name if res.gpus else "unknown",
        "friendlyName": r.name or r.node_id,
        "memory": {"ramTotal": res.ram_total, "ramAvailable": res.ram_available},
        "system": {"cpuCount": res.cpu_count, "cpuPercent": res.cpu_percent, "gpus": gpus},
        "networkInterfaces": [
            {"name": i.name, "ipAddress": a.split("/")[0], "type": str(i.kind)}
            for i in r.interfaces
            for a in i.addresses
        ],
    }


def _node_rows(view: ClusterView, self_report: NodeReport, now: float) -> list[dict[str, Any]]:
    leader = view.leader(self_report)
    me = PeerState(self_report, now, now)
    states = [me, *(p for n, p in view.peers.items() if n != view.self_id)]
    return [
        {
            **s.report.model_dump(mode="json", exclude={"links"}),  # links: /cluster/links
            "name": s.report.name or s.report.node_id,
            "status": str(s.status),
            "gone_reason": s.gone_reason,
            "is_self": s.report.node_id == view.self_id,
            "is_leader": s.report.node_id == leader,
            "last_seen": s.last_seen,
            "seconds_since_seen": max(0.0, now - s.last_seen),
            "misses": s.misses,
        }
        for s in sorted(states, key=lambda s: s.report.node_id)
    ]


def nodes_document(view: ClusterView, self_report: NodeReport, now: float) -> dict[str, Any]:
    """GET /cluster/nodes: every node this one knows, gone ones included with the reason."""
    rows = _node_rows(view, self_report, now)
    return {"self": view.self_id, "leader": view.leader(self_report), "nodes": rows}


def links_document(view: ClusterView, self_report: NodeReport, now: float) -> dict[str, Any]:
    """GET /cluster/links: every path record of every alive node, oriented from -> to."""
    rows = _link_rows(view, view.alive_reports(self_report), now)
    return {"self": view.self_id, "recent_window_s": view.timing.link_recent, "links": rows}


def state_document(view: ClusterView, self_report: NodeReport, now: float) -> dict[str, Any]:
    """GET /state: exo's topology shape (nodeId, nodeProfile, connections) plus ours."""
    alive = view.alive_reports(self_report)
    rows = _link_rows(view, alive, now)
    ports = {r.node_id: r.api_port for r in alive}
    refused = sorted(view.refused.values(), key=lambda r: (-r.last_at, r.node_id))
    return {
        "topology": {
            "nodes": [{"nodeId": r.node_id, "nodeProfile": _profile(r)} for r in alive],
            "connections": _connections(rows, ports),
        },
        "self": view.self_id,
        "leader": choose_leader(alive),
        "nodes": _node_rows(view, self_report, now),
        "links": rows,
        "drift": drift_warnings(alive),
        "refused": [asdict(r) for r in refused],
    }
