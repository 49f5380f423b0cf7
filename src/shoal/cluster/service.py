"""The cluster loop of one node: publish our report, poll peers', probe paths, track liveness.

Everything that decides lives in the pure modules (view, links statistics, interfaces);
this module only moves data between them, the network and the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil
from pydantic import ValidationError

from shoal import __version__
from shoal.cluster.discovery import Discovery, PeerAnnouncement, namespace_hash
from shoal.cluster.events import EventLog
from shoal.cluster.health import PathHealthTracker
from shoal.cluster.identity import NodeIdentity
from shoal.cluster.interfaces import local_interfaces
from shoal.cluster.links import Prober
from shoal.cluster.machine import local_device_label
from shoal.cluster.peers import PeerClient, PeerUnknown
from shoal.cluster.refusals import refused_poll, unsigned_answer
from shoal.cluster.thunderbolt import local_thunderbolt_links
from shoal.cluster.view import ClusterView, PeerStatus, Timing, membership_changes
from shoal.runner.accelerators import torch_gpus
from shoal.schema.address import base_url, join_host_port, split_host_port
from shoal.schema.reasons import PathRef, reason
from shoal.schema.report import (
    MAX_REPORT_BYTES,
    PROTOCOL_VERSION,
    GpuInfo,
    InterfaceInfo,
    InterfaceKind,
    NodeReport,
    PathStats,
    Resources,
    ThunderboltLink,
)
from shoal.schema.thresholds import Thresholds
from shoal.web.signing import SignatureError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSettings:
    namespace: str = "default"
    static_peers: tuple[tuple[str, int], ...] = ()
    discovery: bool = True
    discovery_interfaces: tuple[str, ...] | None = None  # None: every interface
    pinned_leader: bool = False
    offline: bool = False  # --offline; SHOAL_OFFLINE / HF_HUB_OFFLINE in the env count too
    flags: tuple[tuple[str, str], ...] = ()  # more settings that must match across nodes
    # Twice a second: a report poll is one HTTP request, usually a 304 (the ETag), and a probe a
    # datagram of a few dozen bytes per peer address, so a dead node or a cut path is seen in
    # about two seconds (cluster.view, placement.addressing) at a cost a LAN does not notice.
    poll_interval: float = 0.5
    probe_interval: float = 0.5
    timing: Timing = field(default_factory=Timing)
    secret: bytes | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)


class PlanMember(Protocol):
    """What the cluster loop asks of the node's plan controller."""

    def report_fields(self) -> dict[str, Any]:
        """Fields this node's report carries for the plan (models, runners, plan, ...)."""
        ...

    def tick(self) -> None:
        """One round of the plan: read, decide, reconcile, publish."""
        ...


class ClusterService:
    def __init__(
        self,
        identity: NodeIdentity,
        settings: ClusterSettings,
        host: str,
        api_port: int,
        peers: PeerClient,
        events: EventLog | None = None,
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.host = host
        self.api_port = api_port
        self.namespace_hash = namespace_hash(settings.namespace)
        self.view = ClusterView(
            self_id=identity.node_id,
            namespace_hash=self.namespace_hash,
            self_boot_id=identity.boot_id,
            timing=settings.timing,
        )
        self.prober = Prober(
            node_id=identity.node_id,
            namespace_hash=self.namespace_hash,
            bind_host=host,
            port=api_port,
            interval=settings.probe_interval,
            secret=settings.secret,
            classify_interface=self._interface_kind,
        )
        self.peers = peers  # every peer's API addresses, and the pool every call goes through
        self._static = list(settings.static_peers)  # polled until their report names them
        # The last report and ETag per address: an unchanged report costs a 304, not a body.
        self._cached: dict[tuple[str, int], tuple[str, NodeReport]] = {}
        self._report = NodeReport(node_id=identity.node_id)
        self._seq = 0
        self._commit = _git_commit()
        self._interfaces: tuple[InterfaceInfo, ...] = ()
        self._thunderbolt: tuple[ThunderboltLink, ...] = ()
        self._gpus: tuple[GpuInfo, ...] = ()
        self._device = ""  # "MacBookPro18,2 · Apple M1 Max", read once at start
        self._discovery: Discovery | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.health = PathHealthTracker(settings.thresholds)
        self._statuses: dict[str, PeerStatus] = {}  # peers' statuses at the last tick (events)
        self.events = events  # history across restarts
        self._member: PlanMember | None = None  # the node's plan controller, given at start

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, member: PlanMember | None = None) -> None:
        """Start probing, announcing and polling; `member` (the plan controller) adds its
        fields to every report and runs once per poll tick."""
        self._member = member
        self._gpus = torch_gpus()
        self._device = await asyncio.to_thread(local_device_label)
        await self._read_local_hardware()
        self._refresh_report()
        await self.prober.start()
        if self.settings.discovery:
            loop = asyncio.get_running_loop()
            self._discovery = Discovery(
                node_id=self.identity.node_id,
                namespace=self.settings.namespace,
                api_port=self.api_port,
                version=__version__,
                interfaces=(
                    list(self.settings.discovery_interfaces)
                    if self.settings.discovery_interfaces is not None
                    else None
                ),
                advertise_addresses=None,
                on_peer=lambda a: loop.call_soon_threadsafe(self._on_announcement, a),
                on_goodbye=lambda nid: loop.call_soon_threadsafe(self._on_goodbye, nid),
            )
            await asyncio.to_thread(self._discovery.start)
        self._tasks = [asyncio.create_task(self._poll_loop(), name="shoal-cluster-poll")]

    async def stop(self) -> None:
        """Tell peers we are leaving, then stop probing and announcing."""
        self._stopping = True
        self._refresh_report(shutting_down=True)
        await self._send_goodbyes()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._discovery is not None:
            await asyncio.to_thread(self._discovery.stop)
        await self.prober.stop()

    # -- what the API serves --------------------------------------------------------------

    @property
    def report(self) -> NodeReport:
        return self._report

    @property
    def etag(self) -> str:
        return f'"{self._report.boot_id}-{self._report.seq}"'

    def refresh_report(self) -> None:
        """Publish a change now rather than at the next tick."""
        self._refresh_report()

    def address_of(self, node_id: str) -> tuple[str, int] | None:
        """Where this node reaches a node's API, ourselves included: a peer at the best of its
        addresses by this node's measurements (cluster.peers)."""
        if node_id == self.identity.node_id:
            return ("127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host), self.api_port
        return self.peers.best(node_id)

    def url_of(self, node_id: str, path: str = "") -> str | None:
        address = self.address_of(node_id)
        return None if address is None else base_url(*address) + path

    def accept_goodbye(self, node_id: str, boot_id: str) -> None:
        self.view.goodbye(node_id, boot_id)

    # -- loops ---------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        ticks = 0
        while not self._stopping:
            started = time.monotonic()
            if ticks and ticks % 30 == 0:  # cables and addresses change rarely
                await self._read_local_hardware()
            links = self.prober.snapshot(time.time())  # one snapshot: judged, then published
            self._judge_paths(links)
            self._refresh_report(links=links)
            await self._poll_peers()
            self.view.refresh(time.time())
            self._note_membership()
            self.prober.set_targets(self._probe_targets())
            try:
                if self._member is not None:
                    self._member.tick()
            except Exception:  # the plan side failing must never stop the cluster loop
                log.exception("plan tick failed")
            ticks += 1
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.05, self.settings.poll_interval - elapsed))

    def _judge_paths(self, links: list[PathStats]) -> None:
        now = time.time()
        for change in self.health.observe(links, now):
            if self.events is None:
                continue
            peer, me = change.peer_node_id, self.identity.node_id
            path = PathRef(me, peer, change.peer_addr)
            kind, names = change.interface_kind, {peer: self.name_of(peer)}
            if change.status == "ok":
                why = reason("path_recovered", nodes=(me, peer), path=path, kind=kind)
                self.events.record("recovered", why, names, peer=peer, addr=change.peer_addr)
            else:
                why = reason("path_health", nodes=(me, peer), path=path, kind=kind,
                             status=change.status, detail=change.reason)  # fmt: skip
                self.events.record(change.status, why, names, peer=peer, addr=change.peer_addr)

    def _note_membership(self) -> None:
        """node_joined / node_gone events since the last tick (goodbyes between ticks too)."""
        before = self._statuses
        self._statuses = {n: p.status for n, p in self.view.peers.items()}
        if self.events is None:
            return
        for node_id, kind in membership_changes(before, self._statuses):
            names = {node_id: self.name_of(node_id)}
            if kind == "node_gone":
                gone = self.view.peers[node_id].gone_reason or "no reason recorded"
                why = reason("member_gone", nodes=(node_id,), detail=gone)
            else:
                code = "member_back" if node_id in before else "member_joined"
                why = reason(code, nodes=(node_id,))
            self.events.record(kind, why, names, node=node_id)

    def name_of(self, node_id: str) -> str:
        report = self.view.report_of(node_id)
        return report.name if report and report.name else node_id[:8]

    async def _read_local_hardware(self) -> None:
        self._interfaces = tuple(await asyncio.to_thread(local_interfaces))
        self._thunderbolt = tuple(await asyncio.to_thread(local_thunderbolt_links))

    async def _poll_peers(self) -> None:
        jobs = [self._poll_peer(node_id) for node_id in self.peers.peers()]
        jobs += [self._poll_static(address) for address in self._static]
        if jobs:
            await asyncio.gather(*jobs)

    async def _poll_peer(self, node_id: str) -> None:
        for address in self.peers.addresses(node_id):  # best first, the next when one fails
            report = await self._fetch_report(address, node_id)
            if report is None or report.node_id != node_id:  # silent, or now someone else
                self.peers.failed(address)  # the next poll and every call try the others first
                continue
            self.peers.answered(node_id, address)
            self._accept(report, address)
            return
        self.view.miss(node_id, time.time())

    async def _poll_static(self, address: tuple[str, int]) -> None:
        report = await self._fetch_report(address)
        if report is not None and report.node_id != self.identity.node_id:
            self._accept(report, address)

    async def _fetch_report(
        self, address: tuple[str, int], node_id: str | None = None
    ) -> NodeReport | None:
        """The report at that address; None if silent, malformed or refused (with a cluster
        secret: an answer not signed with it; the refusal goes in the view's `refused`)."""
        url = base_url(*address) + "/cluster/report"
        cached = self._cached.get(address)
        headers = {"If-None-Match": cached[0]} if cached else {}
        try:
            response = await self.peers.http.get(url, headers=headers)
        except httpx.HTTPError:
            return None
        if response.status_code in (401, 403):  # e.g. it has a cluster secret we lack
            named, why = refused_poll(response.status_code, response.content, response.headers)
            self._refused(address, named or node_id, None, why)
            return None
        try:
            signer = self.peers.verify(response)
        except SignatureError as exc:  # its report must not merge: read it only to name it
            report = _parse_report(response.content, url) if response.status_code == 200 else None
            named = report.node_id if report else node_id
            self._refused(address, named, report.name if report else None, unsigned_answer(exc))
            return None
        if response.status_code == 304 and cached:
            return cached[1]
        if response.status_code != 200:
            return None
        report = _parse_report(response.content, url)
        if report is None:
            return None
        if signer is not None and signer != report.node_id:
            why = f"its report names node {report.node_id} but is signed by {signer}"
            self._refused(address, report.node_id, report.name, why)
            return None
        if etag := response.headers.get("etag"):
            self._cached[address] = (etag, report)
        return report

    def _refused(
        self, address: tuple[str, int], node_id: str | None, name: str | None, why: str
    ) -> None:
        where = join_host_port(*address)
        self.view.refuse(node_id or where, name or where, f"at {where}: {why}", time.time())

    def _accept(self, report: NodeReport, address: tuple[str, int]) -> None:
        if report.shutting_down:
            self.view.goodbye(report.node_id, report.boot_id)
            return
        if self.view.accept(report, time.time()):
            self.view.refused.pop(join_host_port(*address), None)  # refused before, unnamed
            advertised = [split_host_port(a, report.api_port) for a in report.addresses]
            self.peers.learn(report.node_id, [address, *advertised])  # type: ignore[list-item]

    def _on_announcement(self, announcement: PeerAnnouncement) -> None:
        hosts = announcement.addresses
        self.peers.learn(announcement.node_id, [(h, announcement.api_port) for h in hosts])

    def _on_goodbye(self, node_id: str) -> None:
        held = self.view.report_of(node_id)
        if held is not None:
            self.view.goodbye(node_id, held.boot_id)

    async def _send_goodbyes(self) -> None:
        body = {"node_id": self.identity.node_id, "boot_id": self.identity.boot_id}

        async def tell(node_id: str) -> None:
            with contextlib.suppress(httpx.HTTPError, PeerUnknown):
                await self.peers.post(node_id, "/cluster/goodbye", json=body, timeout=0.5)

        alive = set(self.view.alive()) - {self.identity.node_id}
        await asyncio.gather(*(tell(n) for n in self.peers.peers() if n in alive))

    def _probe_targets(self) -> dict[str, list[tuple[str, int]]]:
        """Every address of every peer ever seen, gone ones too: probing never stops, so the
        path that was best before a crash is found again when the peer comes back."""
        targets: dict[str, list[tuple[str, int]]] = {}
        for node_id in self.peers.peers():
            report = self.view.report_of(node_id)
            if node_id == self.identity.node_id or report is None:
                continue
            targets[node_id] = [(h, report.api_port) for h in self.peers.hosts(node_id)]
        return targets

    def _interface_kind(self, name: str) -> InterfaceKind:
        return next((i.kind for i in self._interfaces if i.name == name), InterfaceKind.OTHER)

    # -- our own report ------------------------------------------------------------------

    def _refresh_report(
        self, shutting_down: bool = False, links: list[PathStats] | None = None
    ) -> None:
        ident = self.identity
        body: dict[str, Any] = dict(
            node_id=ident.node_id,
            name=ident.name,
            boot_id=ident.boot_id,
            boot_started=ident.boot_started,
            joined_at=ident.joined_at,
            pinned_leader=self.settings.pinned_leader,
            version=__version__,
            commit=self._commit,
            protocol=PROTOCOL_VERSION,
            namespace_hash=self.namespace_hash,
            flags={
                "namespace": self.namespace_hash,
                "protocol": str(PROTOCOL_VERSION),
                "offline": str(self.settings.offline or _offline()).lower(),
                **dict(self.settings.flags),
            },
            api_port=self.api_port,
            addresses=tuple(self._advertised_addresses()),
            resources=_resources(self._gpus, self._device),
            interfaces=self._interfaces,
            thunderbolt=self._thunderbolt,
            links=tuple(self.prober.snapshot(time.time()) if links is None else links),
            shutting_down=shutting_down,
            health=self.health.snapshot(time.time()),
            **(self._member.report_fields() if self._member is not None else {}),
        )
        # seq moves only when the content does, so an unchanged report polls as 304.
        if body != self._report.model_dump(exclude={"seq", "sent_at"}, mode="python"):
            self._seq += 1
        self._report = NodeReport(**body, seq=self._seq, sent_at=time.time())
        self.view.accept(self._report, time.time())

    def _advertised_addresses(self) -> list[str]:
        if self.host not in ("0.0.0.0", "::", ""):
            return [join_host_port(self.host, self.api_port)]
        out = []
        for info in self._interfaces:
            for cidr in info.addresses:
                ip = ipaddress.ip_interface(cidr).ip
                if ip.version == 4 and not ip.is_loopback:
                    out.append(f"{ip}:{self.api_port}")
        return out


def _parse_report(body: bytes, url: str) -> NodeReport | None:
    """A peer's report, or None (logged) when oversized or malformed."""
    if len(body) > MAX_REPORT_BYTES:
        log.warning("dropped an oversized report (%d bytes) from %s", len(body), url)
        return None
    try:
        return NodeReport.model_validate_json(body)
    except ValidationError as exc:
        log.warning("dropped a malformed report from %s: %s", url, exc.errors()[:1])
        return None


def _resources(gpus: tuple[GpuInfo, ...], device: str) -> Resources:
    memory = psutil.virtual_memory()
    return Resources(
        ram_total=memory.total,
        ram_available=memory.available,
        cpu_count=psutil.cpu_count() or 0,
        cpu_percent=psutil.cpu_percent(interval=None),
        gpus=gpus,
        device=device,
    )


def _offline() -> bool:
    """Offline mode (no hub downloads) must match across nodes, or placement surprises."""
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("SHOAL_OFFLINE", "HF_HUB_OFFLINE")
    )


def _git_commit() -> str | None:
    """The commit of a source checkout, for drift warnings; None for an installed wheel."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=2,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
