"""Address ranking, one rule at a time, and the seeds' scenarios."""

from __future__ import annotations

import pytest

from shoal.placement.addressing import (
    PathOption,
    address_class,
    options_to,
    rank_paths,
    rtt_bucket,
)
from shoal.schema.report import InterfaceKind, PathStats

NOW = 1000.0
TB, ETH, WIFI, VPN = (
    InterfaceKind.THUNDERBOLT,
    InterfaceKind.ETHERNET,
    InterfaceKind.WIFI,
    InterfaceKind.VPN,
)


def opt(
    addr: str,
    kind: InterfaceKind = ETH,
    rtt: float | None = 0.5,
    ago: float | None = 1.0,
    **extra: object,
) -> PathOption:
    return PathOption(peer_addr=addr, interface_kind=kind, rtt_ms=rtt,
                      last_success=None if ago is None else NOW - ago, **extra)  # fmt: skip


def best(*options: PathOption) -> str:
    return rank_paths(options, NOW)[0].peer_addr


@pytest.mark.parametrize(
    ("name", "options", "winner"),
    [
        # 1. measured usable beats everything unverified, however it looks
        ("usable beats unmeasured TB", [opt("192.168.100.2", TB, None, None),
                                         opt("10.0.0.2", VPN, 60.0)], "10.0.0.2"),
        ("recent beats stale success", [opt("192.168.100.2", TB, 0.3, ago=60.0),
                                        opt("10.0.0.2", ETH, 3.0)], "10.0.0.2"),
        # 2. RTT bucket
        ("faster bucket wins over kind", [opt("10.0.0.2", ETH, 0.4),
                                          opt("192.168.100.2", TB, 8.0)], "10.0.0.2"),
        ("same bucket: noise does not decide", [opt("10.0.0.3", WIFI, 0.2),
                                                opt("10.0.0.2", ETH, 0.9)], "10.0.0.2"),
        # 3. interface kind
        ("thunderbolt over ethernet", [opt("10.0.0.2", ETH, 0.6),
                                       opt("10.1.0.2", TB, 0.7)], "10.1.0.2"),
        ("ethernet over wifi", [opt("10.0.0.3", WIFI, 2.0), opt("10.0.0.2", ETH, 2.5)],
         "10.0.0.2"),
        ("wifi over vpn", [opt("100.64.0.9", VPN, 3.0), opt("10.0.0.3", WIFI, 3.0)],
         "10.0.0.3"),
        ("rdma first", [opt("10.1.0.2", TB, 0.5), opt("10.2.0.2", TB, 0.5, rdma=True)],
         "10.2.0.2"),
        # 4. preferred subnets
        ("direct TB subnet preferred", [opt("10.1.0.2", TB, 0.5),
                                        opt("192.168.100.2", TB, 0.5)], "192.168.100.2"),
        # 5. address class
        ("RFC1918 over CGNAT", [opt("100.100.1.2", ETH, 0.5), opt("172.16.0.2", ETH, 0.5)],
         "172.16.0.2"),
        ("CGNAT over public", [opt("8.8.4.4", ETH, 0.5), opt("100.100.1.2", ETH, 0.5)],
         "100.100.1.2"),
        # 6. link-local and bridge aliases last
        ("not link-local on a tie", [opt("169.254.3.2", ETH, 0.5), opt("10.0.0.2", ETH, 0.5)],
         "10.0.0.2"),
        ("not a bridge alias on a tie", [opt("10.0.0.2", ETH, 0.5, bridge_alias=True),
                                         opt("10.0.0.9", ETH, 0.5)], "10.0.0.9"),
    ],
)  # fmt: skip
def test_each_rule(name, options, winner):
    assert best(*options) == winner, name
    assert best(*reversed(options)) == winner, "order of the input must not matter"


def test_dual_homed_lan_and_tailscale_peers_pick_lan():
    # seed 002: after a restart both answer; Tailscale must not win on arrival order
    tailscale = opt("100.101.7.3", VPN, 45.0)
    lan = opt("192.168.1.20", ETH, 0.8)
    assert best(tailscale, lan) == "192.168.1.20"


def test_direct_tb_subnet_beats_a_bridge_alias_on_the_same_port():
    direct = opt("192.168.100.2", TB, 0.4, interface_name="en5")
    alias = opt("10.7.0.2", TB, 0.4, interface_name="bridge0", bridge_alias=True)
    assert best(alias, direct) == "192.168.100.2"


def test_faster_link_local_tb_is_not_beaten_by_lan_on_ring_paths():
    link_local_tb = opt("169.254.10.2", TB, 0.3)
    lan = opt("192.168.1.20", ETH, 2.0)
    assert best(lan, link_local_tb) == "169.254.10.2"


@pytest.mark.parametrize(
    ("rtt", "bucket"), [(0.2, 0), (1.0, 1), (4.9, 1), (19.0, 2), (99.0, 3), (500.0, 4), (None, 5)]
)
def test_rtt_buckets(rtt, bucket):
    assert rtt_bucket(rtt) == bucket


@pytest.mark.parametrize(
    ("host", "cls"),
    [("10.1.2.3", 0), ("192.168.100.1", 0), ("fd00::2", 0), ("100.64.0.1", 1),
     ("100.127.255.254", 1), ("8.8.8.8", 2), ("169.254.1.1", 2), ("not-an-ip", 2)],
)  # fmt: skip
def test_address_class(host, cls):
    assert address_class(host) == cls


def test_options_come_from_outbound_records_to_that_peer():
    links = [
        PathStats(peer_node_id="b", peer_addr="10.0.0.2:52415", interface_kind=ETH,
                  rtt_ms_ewma=0.5, last_success=NOW - 1),
        PathStats(peer_node_id="b", peer_addr="[fe80::2%en5]:52415", interface_kind=TB,
                  rtt_ms_ewma=0.2, last_success=NOW - 1),
        PathStats(peer_node_id="b", peer_addr="10.0.0.2", direction="inbound"),
        PathStats(peer_node_id="c", peer_addr="10.0.0.3:52415"),
    ]  # fmt: skip
    options = options_to("b", links)
    assert [o.peer_addr for o in options] == ["10.0.0.2", "fe80::2%en5"]
    assert rank_paths(options, NOW)[0].peer_addr == "fe80::2%en5"
