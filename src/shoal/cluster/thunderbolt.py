"""Thunderbolt links to peer Macs from `system_profiler SPThunderboltDataType -json`.

Shape of that JSON: `SPThunderboltDataType` is a list of buses, one per port of this Mac. A bus
has this Mac's `domain_uuid_key`, a `receptacle_1_tag` ({`receptacle_id_key`: "1",
`current_speed_key`: "Up to 40 Gb/s" / "80 Gb/s" / "120 Gb/s TX / 40 Gb/s RX"}) and `_items`: the
devices on that port. A peer Mac carries its own `domain_uuid_key`; a hub or dock carries none and
lists what hangs off it in its own `_items`. The peer is the first descendant with a domain uuid,
at any depth: a parser that only looks one level down loses every Mac behind a hub.

Receptacle N is the port networksetup calls "Thunderbolt N", which names the enX device.
Parsing is pure and tolerant: a bus it cannot read is skipped, never raised on.
"""

from __future__ import annotations

import json
import logging
import platform
import re
from collections.abc import Mapping
from typing import Any

from shoal.cluster.interfaces import macos_hardware_ports, run_tool
from shoal.schema.report import ThunderboltLink

log = logging.getLogger(__name__)

TB5_MIN_GBPS = 40.0  # TB4 tops out at 40 Gb/s; TB5 links at 80 (or 120/40 asymmetric)
MAX_TREE_DEPTH = 32  # a real chain is at most 6 deep; bounds malformed or hostile input
SYSTEM_PROFILER_TIMEOUT_S = 30.0

_SPEED = re.compile(r"(\d+(?:\.\d+)?)\s*Gb(?:/s|ps)", re.IGNORECASE)


def parse_link_speed(text: object) -> float | None:
    """Gb/s of a `current_speed_key`: the largest number, so "120 Gb/s TX / 40 Gb/s RX" -> 120."""
    if not isinstance(text, str):
        return None
    speeds = [float(match) for match in _SPEED.findall(text)]
    return max(speeds) if speeds else None


def _text(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _children(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = node.get("_items")
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, Mapping)]


def find_peer(bus: Mapping[str, Any]) -> tuple[Mapping[str, Any], int] | None:
    """First device under `bus` (depth-first, in listed order) with a domain uuid, and the
    number of hubs/docks between the port and it."""
    own_uuid = _text(bus.get("domain_uuid_key"))
    # (node, depth) with the next node to visit on top; depth 1 = plugged into the port.
    stack = [(child, 1) for child in reversed(_children(bus))]
    while stack:
        node, depth = stack.pop()
        uuid = _text(node.get("domain_uuid_key"))
        if uuid is not None and uuid != own_uuid:
            return node, depth - 1
        if depth < MAX_TREE_DEPTH:
            stack.extend((child, depth + 1) for child in reversed(_children(node)))
    return None


def _bus_link(bus: Mapping[str, Any], port_devices: Mapping[str, str]) -> ThunderboltLink | None:
    found = find_peer(bus)
    if found is None:
        return None
    peer, hops = found
    tag = bus.get("receptacle_1_tag")
    tag = tag if isinstance(tag, Mapping) else {}
    receptacle = _text(tag.get("receptacle_id_key"))
    if receptacle is None:
        # Keep the peer visible (its uuid still pairs the two sides); only the enX is unknown.
        log.debug("thunderbolt bus %r has a peer but no receptacle id", bus.get("_name"))
    speed = parse_link_speed(tag.get("current_speed_key"))
    return ThunderboltLink(
        receptacle=receptacle or "",
        interface=port_devices.get(f"Thunderbolt {receptacle}") if receptacle else None,
        peer_domain_uuid=_text(peer.get("domain_uuid_key")),
        peer_name=_text(peer.get("_name")) or _text(peer.get("device_name_key")),
        speed_gbps=speed,
        is_tb5=speed is not None and speed > TB5_MIN_GBPS,
        hops=hops,
    )


def parse_thunderbolt(data: object, hardware_ports: Mapping[str, str]) -> list[ThunderboltLink]:
    """One link per Thunderbolt bus that has a peer Mac somewhere below it.

    `hardware_ports` is {device: port name} as `parse_hardware_ports` returns it.
    """
    buses = data.get("SPThunderboltDataType") if isinstance(data, Mapping) else None
    if not isinstance(buses, list):
        return []
    port_devices: dict[str, str] = {}
    if isinstance(hardware_ports, Mapping):
        port_devices = {
            port: device
            for device, port in hardware_ports.items()
            if isinstance(port, str) and isinstance(device, str)
        }
    links = []
    for bus in buses:
        if isinstance(bus, Mapping) and (link := _bus_link(bus, port_devices)) is not None:
            links.append(link)
    return links


def local_thunderbolt_links() -> list[ThunderboltLink]:
    """This Mac's Thunderbolt links to peers; [] on other systems or when the tools fail."""
    if platform.system() != "Darwin":
        return []
    argv = ["system_profiler", "SPThunderboltDataType", "-json"]
    output = run_tool(argv, timeout=SYSTEM_PROFILER_TIMEOUT_S)
    if output is None:
        return []
    try:
        data = json.loads(output)
    except (ValueError, RecursionError) as exc:
        log.debug("system_profiler printed no usable JSON: %s", exc)
        return []
    return parse_thunderbolt(data, macos_hardware_ports())
