"""Thunderbolt links from system_profiler JSON: direct cables, hubs, docks, speeds, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shoal.cluster import interfaces, thunderbolt
from shoal.cluster.interfaces import parse_hardware_ports
from shoal.cluster.thunderbolt import (
    find_peer,
    local_thunderbolt_links,
    parse_link_speed,
    parse_thunderbolt,
)
from shoal.schema.report import ThunderboltLink

FIXTURES = Path(__file__).parent / "fixtures" / "thunderbolt"
PORTS_TEXT = (FIXTURES / "networksetup_listallhardwareports.txt").read_text()
PORTS = parse_hardware_ports(PORTS_TEXT)  # Thunderbolt 1..4 -> en2..en5

LOCAL = "3C9D5B8E-1F2A-4C6B-9E0D-7A1B2C3D4E5F"
PEER_A = "F389A8EB-2C44-4F1D-8A37-0B9E6D5C4A21"
PEER_B = "CFB268CB-77E1-4B0A-9D2C-5E4F3A2B1C0D"
PEER_C = "A1B2C3D4-E5F6-4789-8ABC-DEF012345678"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def link(
    receptacle: str, interface: str, uuid: str, name: str, speed: float, hops: int = 0
) -> ThunderboltLink:
    return ThunderboltLink(
        receptacle=receptacle,
        interface=interface,
        peer_domain_uuid=uuid,
        peer_name=name,
        speed_gbps=speed,
        is_tb5=speed > 40,
        hops=hops,
    )


FIXTURE_CASES = {
    "direct_cable.json": [link("4", "en5", PEER_A, "Mac Studio", 40.0)],
    "one_hub.json": [link("1", "en2", PEER_B, "MacBook Pro", 40.0, hops=1)],
    "two_hubs.json": [link("2", "en3", PEER_C, "Mac mini", 40.0, hops=2)],
    "empty_port.json": [],
    "tb4_up_to_40.json": [link("1", "en2", PEER_A, "Mac mini", 40.0)],
    "tb5_80.json": [link("2", "en3", PEER_B, "Mac Studio", 80.0)],
    "tb5_asymmetric.json": [link("3", "en4", PEER_C, "Mac Studio", 120.0)],
    "two_peers.json": [
        link("1", "en2", PEER_A, "Mac Studio", 80.0),
        link("2", "en3", PEER_B, "MacBook Pro", 40.0, hops=1),
    ],
}


@pytest.mark.parametrize(("fixture", "expected"), FIXTURE_CASES.items(), ids=list(FIXTURE_CASES))
def test_fixture_links(fixture: str, expected: list[ThunderboltLink]) -> None:
    assert parse_thunderbolt(load(fixture), PORTS) == expected


def test_every_fixture_file_has_a_case() -> None:
    assert {p.name for p in FIXTURES.glob("*.json")} == set(FIXTURE_CASES)


@pytest.mark.parametrize(
    ("fixture", "is_tb5"),
    [("tb4_up_to_40.json", False), ("direct_cable.json", False), ("tb5_80.json", True),
     ("tb5_asymmetric.json", True)],
)  # fmt: skip
def test_tb5_only_above_40_gbps(fixture: str, is_tb5: bool) -> None:
    assert [lk.is_tb5 for lk in parse_thunderbolt(load(fixture), PORTS)] == [is_tb5]


@pytest.mark.parametrize(
    ("text", "gbps"),
    [("80 Gb/s", 80.0), ("Up to 40 Gb/s", 40.0), ("120 Gb/s TX / 40 Gb/s RX", 120.0),
     ("40 Gb/s TX / 120 Gb/s RX", 120.0), ("up to 20 gb/s", 20.0), ("10Gbps", 10.0),
     ("2.5 Gb/s", 2.5), ("", None), ("unknown", None), (None, None), (40, None)],
)  # fmt: skip
def test_parse_link_speed(text: object, gbps: float | None) -> None:
    assert parse_link_speed(text) == gbps


def _bus(items: object, receptacle: object = "1", speed: object = "80 Gb/s") -> dict:
    tag = {"receptacle_id_key": receptacle, "current_speed_key": speed}
    return {"domain_uuid_key": LOCAL, "_items": items, "receptacle_1_tag": tag}


def _chain(depth: int, uuid: str = PEER_A) -> list:
    """`depth - 1` nested hubs with the peer Mac at the bottom."""
    items: list = [{"_name": "Peer", "domain_uuid_key": uuid}]
    for i in range(depth - 1):
        items = [{"_name": f"hub {i}", "_items": items}]
    return items


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_hops_count_hubs_at_any_depth(depth: int) -> None:
    (only,) = parse_thunderbolt({"SPThunderboltDataType": [_bus(_chain(depth))]}, PORTS)
    assert (only.hops, only.peer_domain_uuid, only.interface) == (depth - 1, PEER_A, "en2")


def test_first_peer_in_listed_order_wins() -> None:
    peer_a, peer_b = {"_name": "A", "domain_uuid_key": "A"}, {"domain_uuid_key": "B"}
    items = [{"_name": "dock", "_items": [{"_name": "ssd"}, peer_a]}, peer_b]
    assert find_peer(_bus(items)) == (peer_a, 1)


def test_own_domain_uuid_is_never_the_peer() -> None:
    assert parse_thunderbolt({"SPThunderboltDataType": [_bus(_chain(1, LOCAL))]}, PORTS) == []


MALFORMED = {
    "none": None,
    "list": [],
    "string": "SPThunderboltDataType",
    "empty": {},
    "buses_none": {"SPThunderboltDataType": None},
    "buses_dict": {"SPThunderboltDataType": {"_items": []}},
    "buses_junk": {"SPThunderboltDataType": [1, None, "bus", [], True]},
    "items_dict": {"SPThunderboltDataType": [_bus({"domain_uuid_key": PEER_A})]},
    "items_junk": {"SPThunderboltDataType": [_bus([1, "x", None, [{"domain_uuid_key": "Z"}]])]},
    "uuid_wrong_types": {"SPThunderboltDataType": [_bus([{"domain_uuid_key": v} for v in
                                                          (None, 7.5, [], {}, True, "", "  ")])]},
    "tag_list": {"SPThunderboltDataType": [{**_bus(_chain(1)), "receptacle_1_tag": ["1"]}]},
    "speed_dict": {"SPThunderboltDataType": [_bus(_chain(1), speed={"x": 1})]},
    "too_deep": {"SPThunderboltDataType": [_bus(_chain(5000))]},
}  # fmt: skip


@pytest.mark.parametrize("data", MALFORMED.values(), ids=list(MALFORMED))
@pytest.mark.parametrize("ports", [PORTS, {}, None, {1: 2, "en2": None}])
def test_malformed_input_never_raises(data: object, ports: object) -> None:
    links = parse_thunderbolt(data, ports)  # type: ignore[arg-type]
    assert all(isinstance(lk, ThunderboltLink) for lk in links)


@pytest.mark.parametrize(
    ("bus", "receptacle", "interface", "speed"),
    [(_bus(_chain(1), receptacle=3), "3", "en4", 80.0),
     (_bus(_chain(1), receptacle=None), "", None, 80.0),
     (_bus(_chain(1), receptacle="9"), "9", None, 80.0),
     (_bus(_chain(1), speed=None), "1", "en2", None),
     ({"_items": _chain(2)}, "", None, None)],
)  # fmt: skip
def test_partial_bus_keeps_the_peer_visible(bus, receptacle, interface, speed) -> None:
    (only,) = parse_thunderbolt({"SPThunderboltDataType": [bus]}, PORTS)
    assert (only.receptacle, only.interface, only.speed_gbps) == (receptacle, interface, speed)
    assert only.peer_domain_uuid == PEER_A
    assert only.is_tb5 == (speed == 80.0)


def test_local_links_empty_off_macos() -> None:
    if sys.platform == "darwin":
        pytest.skip("asks the real system_profiler on a Mac")
    assert local_thunderbolt_links() == []


@pytest.mark.parametrize(
    ("profiler_output", "expected"),
    [((FIXTURES / "one_hub.json").read_text(), FIXTURE_CASES["one_hub.json"]),
     ("not json", []), ("[[[[", []), (None, []), ("[" * 100_000, [])],
)  # fmt: skip
def test_local_links_shell_on_macos(monkeypatch, profiler_output, expected) -> None:
    def fake_tool(argv, timeout=0.0):
        return PORTS_TEXT if argv[0] == "networksetup" else profiler_output

    monkeypatch.setattr("platform.system", lambda: "Darwin")
    monkeypatch.setattr(interfaces, "run_tool", fake_tool)
    monkeypatch.setattr(thunderbolt, "run_tool", fake_tool)
    assert local_thunderbolt_links() == expected
