"""Which address to use for a path: measured facts first, address shape only as a tiebreak.

Seed 002: after a restart a cluster dialled a peer over Tailscale (40-70 ms) while a direct
cable (<1 ms) was there, because the first address that answered won. Here every candidate
path is ranked by, in order:

1. measured usable: a recent identity-checked success beats anything unverified;
2. measured RTT, in coarse buckets (so noise between two good paths does not flip choices);
3. interface kind: thunderbolt/rdma > ethernet > wifi > vpn;
4. preferred subnets (config; the direct Thunderbolt subnet 192.168.100.0/24 by default);
5. address class: RFC 1918 over CGNAT (100.64.0.0/10, Tailscale) over public;
6. last: a link-local address or a bridge alias.

Pure functions over plain data; placement calls them per path it needs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shoal.schema.report import InterfaceKind, PathStats

DEFAULT_PREFERRED_SUBNETS = ("192.168.100.0/24",)
RTT_BUCKETS_MS = (1.0, 5.0, 20.0, 100.0)  # <1 ms, <5, <20, <100, slower
RECENT_S = 10.0  # a success older than this no longer counts as "usable now"
FAILING_AFTER_S = 2.0  # probes sent this long after the last reply, none answered: failing
# (4 probes at the 0.5 s interval: 4 datagrams in a row lost on a working LAN is rare)
CGNAT = ipaddress.ip_network("100.64.0.0/10")

_KIND_ORDER = {
    InterfaceKind.THUNDERBOLT: 0,
    InterfaceKind.ETHERNET: 1,
    InterfaceKind.VETH: 1,  # a namespace's cable: what tests use for ethernet
    InterfaceKind.WIFI: 2,
    InterfaceKind.VPN: 3,
    InterfaceKind.BRIDGE: 4,
    InterfaceKind.OTHER: 4,
    InterfaceKind.LOOPBACK: 5,
}


@dataclass(frozen=True)
class PathOption:
    """One way to reach a peer: its address and what was measured on the way there."""

    peer_addr: str  # host, no port
    interface_kind: InterfaceKind = InterfaceKind.OTHER
    interface_name: str | None = None
    rtt_ms: float | None = None
    last_success: float | None = None  # unix time
    rdma: bool = False
    bridge_alias: bool = False  # an address on a bridge that also carries a direct port
    failing: bool = False  # the prober's own record: its recent probes go unanswered


def rtt_bucket(rtt_ms: float | None) -> int:
    if rtt_ms is None:
        return len(RTT_BUCKETS_MS) + 1  # unmeasured: after every measured bucket
    return next(
        (i for i, bound in enumerate(RTT_BUCKETS_MS) if rtt_ms < bound), len(RTT_BUCKETS_MS)
    )


def address_class(host: str) -> int:
    """0 RFC 1918 / unique-local, 1 CGNAT (Tailscale and friends), 2 public or unknown."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return 2
    if ip.version == 4 and ip in CGNAT:
        return 1
    return 0 if ip.is_private and not ip.is_link_local else 2


def _preferred_index(host: str, preferred: Sequence[str]) -> int:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return len(preferred)
    for i, net in enumerate(preferred):
        network = ipaddress.ip_network(net, strict=False)
        if ip.version == network.version and ip in network:
            return i
    return len(preferred)


def _is_link_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_link_local
    except ValueError:
        return False


def rank_key(
    option: PathOption,
    now: float,
    preferred: Sequence[str] = DEFAULT_PREFERRED_SUBNETS,
    recent_s: float = RECENT_S,
) -> tuple[int, ...]:
    """Smaller is better; the tuple's order is the module docstring's order."""
    usable = (
        option.last_success is not None
        and now - option.last_success <= recent_s
        and not option.failing
    )
    kind = -1 if option.rdma else _KIND_ORDER.get(option.interface_kind, 4)
    return (
        0 if usable else 1,
        rtt_bucket(option.rtt_ms if usable else None),
        kind,
        _preferred_index(option.peer_addr, preferred),
        address_class(option.peer_addr),
        1 if _is_link_local(option.peer_addr) or option.bridge_alias else 0,
    )


def rank_paths(
    options: Iterable[PathOption],
    now: float,
    preferred: Sequence[str] = DEFAULT_PREFERRED_SUBNETS,
    recent_s: float = RECENT_S,
) -> list[PathOption]:
    """Best first; ties keep a stable order by address so every node decides the same."""
    return sorted(options, key=lambda o: (*rank_key(o, now, preferred, recent_s), o.peer_addr))


def outbound_to(peer_node_id: str, links: Iterable[PathStats]) -> dict[str, PathStats]:
    """One node's own outbound path records to a peer, by the peer's host (no port)."""
    return {
        host_of(p.peer_addr): p
        for p in links
        if p.peer_node_id == peer_node_id and p.direction == "outbound"
    }


def options_to(peer_node_id: str, links: Iterable[PathStats]) -> list[PathOption]:
    """One node's outbound path records to a peer, as options (addresses without ports)."""
    return [
        PathOption(
            peer_addr=host,
            interface_kind=p.interface_kind,
            interface_name=p.local_interface,
            rtt_ms=p.rtt_ms_ewma,
            last_success=p.last_success,
            failing=is_failing(p),
        )
        for host, p in outbound_to(peer_node_id, links).items()
    ]


def is_failing(p: PathStats) -> bool:
    """A path that worked and whose probes have gone unanswered since, judged on the prober's
    own clock (attempt vs reply), so clock skew cannot fake it. A path that never answered its
    prober is not "failing" but unmeasured from that side: the other side's inbound record may
    still show it working one way (and a peer's report polled a moment before its first reply
    must not veto a path its other end already saw work)."""
    if p.direction != "outbound" or p.last_attempt is None or p.last_success is None:
        return False
    return p.last_attempt - p.last_success >= FAILING_AFTER_S


def host_of(address: str) -> str:
    """'10.0.0.2:52415' or '[fe80::1%en5]:52415' -> the host part."""
    if address.startswith("["):
        return address[1 : address.index("]")]
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else address
