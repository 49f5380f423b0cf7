"""Operator hints: a Thunderbolt 5 link without RDMA says how to enable it; nothing else does."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.cluster.hints import rdma_hints
from shoal.schema.report import InterfaceInfo, InterfaceKind, NodeReport, ThunderboltLink

TB = InterfaceKind.THUNDERBOLT


def link(interface: str | None = "en2", gbps: float | None = 80.0, **kw: Any) -> ThunderboltLink:
    kw.setdefault("is_tb5", gbps is not None and gbps > 40)
    return ThunderboltLink(receptacle="1", interface=interface, speed_gbps=gbps, **kw)


def iface(name: str = "en2", rdma: bool = False, kind: InterfaceKind = TB) -> InterfaceInfo:
    return InterfaceInfo(name=name, kind=kind, rdma=rdma)


def node(links: tuple = (), interfaces: tuple = (), node_id: str = "a") -> NodeReport:
    return NodeReport(node_id=node_id, name=node_id, thunderbolt=links, interfaces=interfaces)


# reports -> (node, interface) of each hint
CASES = {
    "tb5_without_rdma": ([node((link(),), (iface(),))], [("a", "en2")]),
    "tb5_with_rdma": ([node((link(),), (iface(rdma=True),))], []),
    "tb4_40_gbps": ([node((link(gbps=40.0),), (iface(),))], []),
    "tb3_20_gbps": ([node((link(gbps=20.0),), (iface(),))], []),
    "flagged_tb5_speed_unknown": (
        [node((link(gbps=None, is_tb5=True),), (iface(),))],
        [("a", "en2")],
    ),
    "asymmetric_120_40": ([node((link(gbps=120.0),), (iface(),))], [("a", "en2")]),
    "no_thunderbolt": ([node((), (iface("en0", kind=InterfaceKind.ETHERNET),))], []),
    "rdma_on_another_interface_only": (
        [node((link("en3"),), (iface("en2", rdma=True), iface("en3")))],
        [("a", "en3")],
    ),
    "unnamed_link_any_tb_interface_without_rdma": (
        [node((link(None),), (iface("en0", kind=InterfaceKind.WIFI), iface("en5")))],
        [("a", "en5")],
    ),
    "unnamed_link_tb_interface_with_rdma": (
        [node((link(None),), (iface("en5", rdma=True),))],
        [],
    ),
    "two_nodes_one_with_rdma": (
        [
            node((link(),), (iface(rdma=True),), node_id="a"),
            node((link(),), (iface(),), node_id="b"),
        ],
        [("b", "en2")],
    ),
    "two_ports_two_hints": (
        [node((link("en2"), link("en3")), (iface("en2"), iface("en3")))],
        [("a", "en2"), ("a", "en3")],
    ),
}


@pytest.mark.parametrize(("reports", "expected"), CASES.values(), ids=CASES)
def test_rdma_hints(reports: list[NodeReport], expected: list[tuple[str, str]]) -> None:
    hints = rdma_hints(reports)
    assert [(h["node"], h["interface"]) for h in hints] == expected
    assert all(h["kind"] == "rdma" for h in hints)


def test_rdma_hint_names_the_link_and_the_command() -> None:
    report = node((link(peer_name="studio-2"),), (iface(),))
    (hint,) = rdma_hints([report])
    assert set(hint) == {"kind", "node", "interface", "message"}
    message = hint["message"]
    assert message.startswith("a: the 80 Gb/s Thunderbolt 5 link on en2 to studio-2")
    assert "Recovery" in message and "`rdma_ctl enable`" in message and "26.2" in message
