"""Advice for the operator, derived from the nodes' reports: what they could enable or fix.

Pure: reports in, hints out. `/state` serves them under "hints" for the dashboard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shoal.cluster.thunderbolt import TB5_MIN_GBPS
from shoal.schema.report import InterfaceInfo, InterfaceKind, NodeReport, ThunderboltLink

RDMA_HOWTO = (
    "RDMA over Thunderbolt 5 needs macOS 26.2 or later on both Macs and is enabled once per "
    "Mac: start up in Recovery, open Terminal, run `rdma_ctl enable`, then restart; "
    "`rdma_ctl status` shows whether it is on"
)


def rdma_hints(reports: Iterable[NodeReport]) -> list[dict[str, Any]]:
    """One hint per Thunderbolt 5 link (faster than 40 Gb/s) whose interface has no RDMA."""
    hints = []
    for report in sorted(reports, key=lambda r: r.node_id):
        seen: set[str | None] = set()
        for link in report.thunderbolt:
            if not (link.is_tb5 or (link.speed_gbps or 0.0) > TB5_MIN_GBPS):
                continue
            candidates = _interfaces_of(report, link)
            if any(i.rdma for i in candidates):
                continue
            interface = link.interface or (candidates[0].name if candidates else None)
            if interface in seen:
                continue
            seen.add(interface)
            hints.append(
                {
                    "kind": "rdma",
                    "node": report.node_id,
                    "interface": interface,
                    "message": _rdma_message(report, link, interface),
                }
            )
    return hints


def _interfaces_of(report: NodeReport, link: ThunderboltLink) -> list[InterfaceInfo]:
    """The link's own interface; any Thunderbolt interface where the link names none."""
    if link.interface is not None:
        return [i for i in report.interfaces if i.name == link.interface]
    return [i for i in report.interfaces if i.kind == InterfaceKind.THUNDERBOLT]


def _rdma_message(report: NodeReport, link: ThunderboltLink, interface: str | None) -> str:
    name = report.name or report.node_id[:8]
    speed = f"{link.speed_gbps:g} Gb/s " if link.speed_gbps else ""
    where = f" on {interface}" if interface else ""
    peer = f" to {link.peer_name}" if link.peer_name else ""
    return (
        f"{name}: the {speed}Thunderbolt 5 link{where}{peer} carries no RDMA, so the "
        f"cluster talks TCP over it. {RDMA_HOWTO}."
    )
