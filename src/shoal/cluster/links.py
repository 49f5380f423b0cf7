"""Path probing: RTT and loss per (local address -> peer address), both directions.

Paths are chosen from measurements (DESIGN §4): every interval a node probes every address of
every peer over UDP. A reply counts only if the node expected at that address answered the nonce
sent there, so an alias, a loopback or another machine never passes for the peer. The receiver
records the inbound path too, so a path that works one way only is visible on both sides.
LinkStats/LinkTable are pure bookkeeping (times passed in); Prober owns the socket and timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from shoal.cluster import probe_wire as wire
from shoal.cluster.ratelimit import RateLimiter
from shoal.schema.report import InterfaceKind, PathStats
from shoal.web.signing import WINDOW_S, NonceCache

logger = logging.getLogger(__name__)

OUTBOUND = "outbound"
INBOUND = "inbound"
EWMA_ALPHA = 0.3
WINDOW = 120  # samples kept per path for percentiles and loss: a minute at the default interval
REPLY_TIMEOUT_S = 2.0  # far above any sane LAN/VPN RTT; a later reply counts as lost
MAX_OUTSTANDING = 64  # probes awaiting a reply per path; beyond that the oldest is lost
OUTAGE_S = 5.0  # a reply after this long without one ends an outage: loss counts from there
INBOUND_TTL_S = 300.0  # forget an inbound path nobody has probed for this long
MAX_INBOUND_PATHS = 256  # inbound records come from the network: cap them
ROUTE_REFRESH_S = 30.0  # re-resolve local address/interface per path (cables come and go)
ACK_OK, ACK_WRONG_IDENTITY, ACK_UNKNOWN = "ok", "wrong identity", "unknown nonce"
PROBE_RATE_PER_S = 100.0  # datagrams a second one source address may send us...
PROBE_BURST = 400.0  # ...after a burst of this many; the rest are dropped unread


def percentile(values: Iterable[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..1), as numpy's default; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class PathKey:
    peer_node_id: str
    peer_addr: str  # "host:port"
    direction: str = OUTBOUND
    local_addr: str | None = None  # in the key for inbound paths only: one per local address


@dataclass(eq=False)
class LinkStats:
    """Measurements of one path. Times are seconds on one clock chosen by the caller."""

    peer_node_id: str
    peer_addr: str
    direction: str = OUTBOUND
    local_addr: str | None = None
    local_interface: str | None = None
    interface_kind: InterfaceKind = InterfaceKind.OTHER
    window: int = WINDOW
    alpha: float = EWMA_ALPHA
    reply_timeout: float = REPLY_TIMEOUT_S
    sent: int = 0
    received: int = 0
    wrong_identity: int = 0  # replies at this address from a node other than the peer
    last_wrong_node: str | None = None
    last_success: float | None = None
    last_attempt: float | None = None
    rtt_ewma: float | None = None  # seconds
    _outstanding: dict[str, float] = field(default_factory=dict, repr=False)  # nonce -> sent at
    _rtts: deque[float] = field(init=False, repr=False)
    _outcomes: deque[bool] = field(init=False, repr=False)  # True answered, False lost

    def __post_init__(self) -> None:
        self._rtts = deque(maxlen=self.window)
        self._outcomes = deque(maxlen=self.window)

    def record_sent(self, nonce: str, t: float) -> None:
        if len(self._outstanding) >= MAX_OUTSTANDING:
            oldest = next(iter(self._outstanding))  # dicts keep send order
            del self._outstanding[oldest]
            self._outcomes.append(False)
        self._outstanding[nonce] = t
        self.sent += 1
        self.last_attempt = t

    def record_reply(self, nonce: str, t: float) -> float | None:
        """RTT in seconds, or None for a nonce not outstanding (unknown, duplicate, expired)."""
        sent_at = self._outstanding.pop(nonce, None)
        if sent_at is None:
            return None
        if self.last_success is None or t - self.last_success > OUTAGE_S:
            # the first reply after an outage (a peer restarting, a cable plugged back): the
            # probes nobody was there to answer say nothing about the path, so they leave the
            # loss window (preflight would refuse the path for a minute otherwise)
            self._outcomes.clear()
            self._outstanding = {n: s for n, s in self._outstanding.items() if s > sent_at}
        rtt = max(0.0, t - sent_at)
        old = self.rtt_ewma
        self.rtt_ewma = rtt if old is None else self.alpha * rtt + (1 - self.alpha) * old
        self._rtts.append(rtt)
        self._outcomes.append(True)
        self.received += 1
        self.last_success = t
        return rtt

    def expire(self, t: float) -> int:
        """Count probes unanswered for longer than reply_timeout as lost; return how many."""
        expired = [n for n, sent in self._outstanding.items() if t - sent > self.reply_timeout]
        for nonce in expired:
            del self._outstanding[nonce]
            self._outcomes.append(False)
        return len(expired)

    def is_outstanding(self, nonce: str) -> bool:
        return nonce in self._outstanding

    @property
    def loss(self) -> float:
        return self._outcomes.count(False) / len(self._outcomes) if self._outcomes else 0.0

    @property
    def rtt_p50(self) -> float | None:
        return percentile(self._rtts, 0.5)

    @property
    def rtt_p95(self) -> float | None:
        return percentile(self._rtts, 0.95)

    def to_report(self, clock_offset: float = 0.0) -> PathStats:
        """clock_offset turns this path's clock into unix time (0 when it already is)."""

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000.0, 3)

        def unix(t: float | None) -> float | None:
            return None if t is None else t + clock_offset

        return PathStats(
            peer_node_id=self.peer_node_id,
            peer_addr=self.peer_addr,
            local_addr=self.local_addr,
            local_interface=self.local_interface,
            interface_kind=self.interface_kind,
            direction=self.direction,
            loss=self.loss,
            sent=self.sent,
            received=self.received,
            rtt_ms_ewma=ms(self.rtt_ewma),
            rtt_ms_p50=ms(self.rtt_p50),
            rtt_ms_p95=ms(self.rtt_p95),
            last_success=unix(self.last_success),
            last_attempt=unix(self.last_attempt),
        )


class LinkTable:
    """All paths of one node, bounded: outbound by the targets, inbound by a TTL and a cap."""

    def __init__(
        self,
        *,
        window: int = WINDOW,
        reply_timeout: float = REPLY_TIMEOUT_S,
        inbound_ttl: float = INBOUND_TTL_S,
        max_inbound: int = MAX_INBOUND_PATHS,
    ) -> None:
        self._make = partial(LinkStats, window=window, reply_timeout=reply_timeout)
        self._inbound_ttl, self._max_inbound = inbound_ttl, max_inbound
        self._paths: dict[PathKey, LinkStats] = {}
        self._nonces: dict[str, PathKey] = {}  # outstanding probe -> the path it was sent on

    def _new(self, key: PathKey) -> LinkStats:
        return self._make(key.peer_node_id, key.peer_addr, key.direction, key.local_addr)

    def get(self, key: PathKey) -> LinkStats | None:
        return self._paths.get(key)

    def outbound(self, peer_node_id: str, peer_addr: str) -> LinkStats:
        key = PathKey(peer_node_id, peer_addr)
        if key not in self._paths:
            self._paths[key] = self._new(key)
        return self._paths[key]

    def retain_outbound(self, keys: set[PathKey]) -> None:
        """Forget outbound paths that are no longer targets."""
        for key in [k for k in self._paths if k.direction == OUTBOUND and k not in keys]:
            del self._paths[key]

    def record_sent(self, peer_node_id: str, peer_addr: str, nonce: str, t: float) -> None:
        self.outbound(peer_node_id, peer_addr).record_sent(nonce, t)
        self._nonces[nonce] = PathKey(peer_node_id, peer_addr)

    def record_ack(self, nonce: str, node_id: str, t: float) -> tuple[str, LinkStats | None]:
        """Match a reply to its probe. It counts (ACK_OK) only if `node_id` is the peer expected
        at the address the nonce went to: another node there is ACK_WRONG_IDENTITY."""
        key = self._nonces.get(nonce)
        stats = None if key is None else self._paths.get(key)
        if key is None or stats is None or not stats.is_outstanding(nonce):
            return ACK_UNKNOWN, None  # expired, duplicate, or never ours
        if node_id != key.peer_node_id:
            # The probe stays outstanding: it expires as lost unless the real peer answers it.
            stats.wrong_identity += 1
            stats.last_wrong_node = node_id
            return ACK_WRONG_IDENTITY, stats
        del self._nonces[nonce]
        stats.record_reply(nonce, t)
        return ACK_OK, stats

    def record_inbound(
        self, peer_node_id: str, peer_addr: str, local_addr: str, t: float
    ) -> LinkStats:
        """Count one probe from a peer that reached `local_addr` (no RTT: the prober has it)."""
        key = PathKey(peer_node_id, peer_addr, INBOUND, local_addr)
        stats = self._paths.get(key)
        if stats is None:
            inbound = [k for k in self._paths if k.direction == INBOUND]
            if len(inbound) >= self._max_inbound:
                quietest = min(inbound, key=lambda k: self._paths[k].last_success or 0.0)
                del self._paths[quietest]
            stats = self._paths[key] = self._new(key)
        stats.received += 1
        stats.last_success = t
        return stats

    def expire(self, t: float) -> None:
        for key, stats in list(self._paths.items()):
            if key.direction == OUTBOUND:
                stats.expire(t)
            elif stats.last_success is not None and t - stats.last_success > self._inbound_ttl:
                del self._paths[key]
        self._nonces = {
            nonce: key
            for nonce, key in self._nonces.items()
            if (stats := self._paths.get(key)) is not None and stats.is_outstanding(nonce)
        }

    def paths(self) -> list[LinkStats]:
        return list(self._paths.values())

    def snapshot(self, clock_offset: float = 0.0) -> list[PathStats]:
        return [stats.to_report(clock_offset) for stats in self._paths.values()]


class Prober(asyncio.DatagramProtocol):
    """Probes every address of every target peer and answers the peers' probes (one UDP socket).
    drop_outgoing: a firewall stand-in for tests; datagrams to addresses it accepts are not sent.
    """

    def __init__(
        self,
        node_id: str,
        namespace_hash: str,
        *,
        bind_host: str,
        port: int,
        interval: float = 0.5,
        reply_timeout: float = REPLY_TIMEOUT_S,
        window: int = WINDOW,
        secret: bytes | None = None,
        classify_interface: Callable[[str], InterfaceKind] | None = None,
        drop_outgoing: Callable[[tuple[str, int]], bool] | None = None,
    ) -> None:
        self.node_id, self.namespace_hash, self.secret = node_id, namespace_hash, secret
        self.bind_host, self.port, self.interval = bind_host, port, interval
        self.table = LinkTable(window=window, reply_timeout=reply_timeout)
        self._classify, self._drop_outgoing = classify_interface, drop_outgoing
        self._targets: dict[PathKey, tuple[str, int]] = {}
        self._local: list[wire.LocalAddress] = []
        self._routes_at = float("-inf")
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        # Every peer sends about one probe (and one ack) a second per address pair; several
        # nodes may share a source address (one host, NAT).
        self.flood = RateLimiter(PROBE_RATE_PER_S, PROBE_BURST)
        self._seen = NonceCache()  # with a secret: probes already answered (replays dropped)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the socket is bound to; the real port when started with port 0."""
        if self._transport is None:
            raise RuntimeError("prober not started")
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.bind_host, self.port)
        )
        self._refresh_routes(time.monotonic())  # local addresses now carry the bound port
        self._task = asyncio.create_task(self._run(), name=f"shoal-prober-{self.node_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            await asyncio.sleep(0)  # the loop closes the socket on its next turn

    def set_targets(self, targets: Mapping[str, Sequence[tuple[str, int]]]) -> None:
        """Peers to probe: node id -> every (host, port) it may be reached at."""
        wanted = {
            PathKey(node, wire.format_addr(host, port)): (host, port)
            for node, addrs in targets.items()
            if node != self.node_id
            for host, port in addrs
        }
        if wanted == self._targets:
            return
        self._targets = wanted
        self.table.retain_outbound(set(wanted))
        self._refresh_routes(time.monotonic())

    def _refresh_routes(self, now: float) -> None:
        self._routes_at = now
        self._local = wire.read_local_addresses()
        local_port = self.address[1] if self._transport is not None else self.port
        for key, (host, port) in self._targets.items():
            stats = self.table.outbound(key.peer_node_id, key.peer_addr)
            source = wire.source_address(self.bind_host, host, port)
            stats.local_addr = None if source is None else wire.format_addr(source, local_port)
            local = wire.describe_local(source, self._local, self._classify)
            stats.local_interface, stats.interface_kind = local

    def probe_once(self, now: float | None = None) -> None:
        """Expire old probes and send one probe to every target address."""
        now = time.monotonic() if now is None else now
        if now - self._routes_at > ROUTE_REFRESH_S:
            self._refresh_routes(now)
        self.table.expire(now)
        for key, addr in self._targets.items():
            nonce = secrets.token_hex(8)
            self.table.record_sent(key.peer_node_id, key.peer_addr, nonce, now)
            ts = f"{time.time():.3f}" if self.secret is not None else None
            probe = wire.Probe(self.node_id, self.namespace_hash, nonce, key.peer_addr, ts)
            self._send(probe, addr)

    async def _run(self) -> None:
        while True:
            try:
                self.probe_once()
            except Exception:  # probing never stops: a path lost now must be found again later
                logger.exception("link probing round failed")
            await asyncio.sleep(self.interval)

    def _send(self, message: wire.Probe | wire.Ack, addr: tuple[Any, ...]) -> None:
        dropped = self._drop_outgoing is not None and self._drop_outgoing((addr[0], addr[1]))
        if self._transport is None or dropped:
            return
        self._transport.sendto(wire.encode(message, self.secret), addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("link probe socket error: %s", exc)  # e.g. ICMP unreachable

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        now = time.monotonic()
        verdict = self.flood.allow(str(addr[0]), now)  # before decoding: a flood costs little
        if not verdict.allowed:
            if verdict.log_dropped:
                logger.warning(
                    "link probes from %s over %g/s: %d dropped since the last line",
                    addr[0],
                    self.flood.rate,
                    verdict.log_dropped,
                )
            return
        source = wire.format_addr(str(addr[0]), int(addr[1]))  # addr keeps an IPv6 scope id
        try:
            message = wire.decode(data, self.namespace_hash, self.secret, time.time())
        except wire.WireError as exc:
            logger.debug("link probe from %s dropped: %s", source, exc)
            return
        if isinstance(message, wire.Probe):
            if self.secret is not None and message.ts is not None:
                key, expires = f"{message.sender}/{message.nonce}", float(message.ts) + WINDOW_S
                if not self._seen.add(key, expires, time.time()):
                    logger.debug("link probe from %s dropped: replayed", source)
                    return
            self._send(wire.Ack(self.node_id, self.namespace_hash, message.nonce), addr)
            if message.sender != self.node_id:  # our own probe looped back: not a path
                self._record_inbound(message, source, now)
            return
        # The ack's source is not compared with the target: a multi-homed peer may answer from
        # another of its addresses, and the nonce already proves the probe reached that node.
        verdict, stats = self.table.record_ack(message.nonce, message.node, now)
        if verdict == ACK_WRONG_IDENTITY and stats is not None and stats.wrong_identity == 1:
            who = (stats.peer_addr, message.node, stats.peer_node_id)
            logger.warning("link %s: node %s answered, not %s; not counted", *who)
        elif verdict != ACK_OK:
            logger.debug("link ack from %s (node %s) dropped: %s", source, message.node, verdict)

    def _record_inbound(self, probe: wire.Probe, source: str, now: float) -> None:
        stats = self.table.record_inbound(probe.sender, source, probe.target, now)
        if stats.received == 1:  # a new path: resolve its interface once, not per probe
            host = wire.split_addr(probe.target)
            local = wire.describe_local(host, self._local, self._classify)
            stats.local_interface, stats.interface_kind = local

    def snapshot(self, now: float | None = None) -> list[PathStats]:
        """Every outbound and inbound path, timestamps in unix time as of `now`."""
        mono = time.monotonic()
        self.table.expire(mono)
        offset = (time.time() if now is None else now) - mono
        return self.table.snapshot(offset)

    def path(self, peer_node_id: str, peer_addr: str) -> LinkStats | None:
        """The outbound path to one peer address (health checks, tests)."""
        return self.table.get(PathKey(peer_node_id, peer_addr))

    def inbound(self, peer: str) -> list[LinkStats]:
        """Paths on which this peer's probes reached us."""
        return [s for s in self.table.paths() if (s.direction, s.peer_node_id) == (INBOUND, peer)]
