"""Finding peers: zeroconf mDNS (`_shoal._tcp.local.`) and static `--peers` lists.

Pure helpers first, then `Discovery`, a thin shell over zeroconf's thread-based API: callbacks run
on zeroconf's browser thread (use `call_soon_threadsafe`); start()/stop() block (`to_thread`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil
from zeroconf import (
    InterfaceChoice,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from shoal.schema.report import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_shoal._tcp.local."
DEFAULT_NAMESPACE = "default"
DEFAULT_API_PORT = 52415
# One resolve of a peer's SRV/TXT/address records; a live responder answers well inside this.
RESOLVE_TIMEOUT_MS = 3000
# A node id is one DNS label of our instance name, so it must fit in one (63 bytes).
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,63}")
# "[v6addr]:port", "[v6addr]", "host:port" or "host"
_PEER = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[A-Za-z0-9._-]+))(?::(?P<port>[^:]*))?")
_TXT_FIELDS: dict[str, tuple[Callable[[str], object], str]] = {  # field -> (check, what it is)
    "id": (_NODE_ID.fullmatch, "a node id"),
    "ns": (re.compile(r"[0-9a-f]{12}").fullmatch, "a namespace hash"),
    "port": (lambda text: _port(text), "a port from 1 to 65535"),
    "proto": (re.compile(r"[0-9]{1,6}").fullmatch, "a protocol version"),
}
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class NotAPeer(ValueError):
    """An mDNS record that is not a usable peer of ours; the message says why."""


@dataclass(frozen=True)
class PeerAnnouncement:
    node_id: str
    addresses: tuple[str, ...]  # IPv4 first; IPv6 may carry a %scope
    api_port: int
    version: str
    proto: int


def namespace_hash(namespace: str) -> str:
    """Short stable id of a namespace; announcements carry this rather than the name itself."""
    return hashlib.sha256(namespace.encode()).hexdigest()[:12]


def parse_static_peers(text: str, default_port: int = DEFAULT_API_PORT) -> list[tuple[str, int]]:
    """`--peers host:port,host2,[v6addr]:port` -> [(host, port)], duplicates dropped."""
    peers: list[tuple[str, int]] = []
    for entry in (part.strip() for part in text.split(",")):
        if entry and (peer := _parse_peer(entry, default_port)) not in peers:
            peers.append(peer)
    return peers


def _parse_peer(entry: str, default_port: int) -> tuple[str, int]:
    if _ip_version(entry) == 6:  # a bare IPv6 address: every colon is its own, so no port
        return entry, default_port
    match = _PEER.fullmatch(entry)
    if match is None:
        why = "expected host:port, host or [v6addr]:port (brackets around IPv6 with a port)"
    elif match["v6"] is not None and _ip_version(match["v6"]) != 6:
        why = f"{match['v6']!r} is not an IPv6 address"
    elif match["port"] is not None and _port(match["port"]) is None:
        why = f"port {match['port']!r} is not a number from 1 to 65535"
    else:
        port = default_port if match["port"] is None else int(match["port"])
        return match["v6"] or match["host"], port
    raise ValueError(f"bad peer {entry!r} in --peers: {why}")


def build_txt(node_id: str, namespace: str, api_port: int, version: str) -> dict[str, str]:
    return {
        "id": node_id,
        "ns": namespace_hash(namespace),
        "port": str(api_port),
        "proto": str(PROTOCOL_VERSION),
        "v": version,
    }


def parse_announcement(
    fields: Mapping[str, str | None], addresses: Iterable[str], own_id: str, own_ns: str
) -> PeerAnnouncement:
    """A resolved service's TXT fields (as zeroconf decodes them) and addresses -> a peer;
    raises NotAPeer saying why not: a missing or garbled field, another namespace, ourselves."""
    valid: dict[str, str] = {}
    for name, (check, what) in _TXT_FIELDS.items():
        value = fields.get(name)
        if value is None:
            raise NotAPeer(f"TXT field {name!r} is missing")
        if not check(value):
            raise NotAPeer(f"TXT field {name!r}={value!r} is not {what}")
        valid[name] = value
    if valid["ns"] != own_ns:
        raise NotAPeer(f"namespace hash {valid['ns']} is not ours ({own_ns})")
    if valid["id"] == own_id:
        raise NotAPeer("it is our own announcement")
    if not (ordered := order_addresses(addresses)):
        raise NotAPeer("it lists no addresses")
    # The version is informational (drift is judged from reports), so an old peer may omit it.
    version = fields.get("v") or "unknown"
    return PeerAnnouncement(valid["id"], ordered, int(valid["port"]), version, int(valid["proto"]))


def order_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """IPv4 before IPv6 (scoped v6 needs the right interface), otherwise in the given order."""
    unique = list(dict.fromkeys(addresses))
    return tuple(sorted(unique, key=lambda address: _ip_version(address) != 4))


def resolve_interfaces(
    values: Sequence[str], addresses_by_interface: Mapping[str, Sequence[str]]
) -> list[str]:
    """`--interfaces` values (IP addresses or interface names) -> addresses mDNS binds to."""
    resolved: list[str] = []
    for value in values:
        if _ip_version(value):
            found = [value]
        elif value in addresses_by_interface:
            found = [a for a in addresses_by_interface[value] if _ip_version(a) == 4]
            if not found:
                raise ValueError(f"interface {value!r} has no IPv4 address to run mDNS on")
        else:
            known = ", ".join(sorted(addresses_by_interface)) or "none"
            raise ValueError(f"{value!r} is neither an IP address nor an interface ({known})")
        resolved += [address for address in found if address not in resolved]
    return resolved


def default_advertise_addresses(
    bound: Sequence[str] | None, addresses_by_interface: Mapping[str, Sequence[str]]
) -> list[str]:
    """The addresses we announce: those mDNS is bound to, or every address peers can dial."""
    if bound:
        return list(order_addresses(bound))
    every = [ipaddress.ip_address(a) for addrs in addresses_by_interface.values() for a in addrs]
    # Loopback is useless to a peer, and a v6 link-local address is useless without its scope.
    dialable = [
        str(ip) for ip in every if not (ip.is_loopback or ip.version == 6 and ip.is_link_local)
    ]
    return list(order_addresses(dialable)) or ["127.0.0.1"]


def local_addresses() -> dict[str, list[str]]:
    """Interface name -> its IPv4/IPv6 addresses (without %scope), from the OS."""
    return {
        name: [e.address.split("%")[0] for e in entries if e.family in _IP_FAMILIES]
        for name, entries in psutil.net_if_addrs().items()
    }


def _port(text: str) -> int | None:
    """1-65535 in plain ASCII digits (no sign, space or leading zero), else None."""
    return int(text) if re.fullmatch(r"[1-9][0-9]{0,4}", text) and int(text) < 65536 else None


def _ip_version(text: str) -> int:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


class Discovery:
    """Announces this node over mDNS and reports peers of the same namespace."""

    def __init__(
        self,
        node_id: str,
        namespace: str,
        api_port: int,
        version: str,
        *,
        interfaces: list[str] | None,  # None = all; IP addresses or interface names
        advertise_addresses: list[str] | None,  # None = those of `interfaces` (or all)
        on_peer: Callable[[PeerAnnouncement], None],
        on_goodbye: Callable[[str], None],
    ) -> None:
        if not _NODE_ID.fullmatch(node_id):
            raise ValueError(f"node id {node_id!r} must be 1-63 letters, digits, '-' or '_'")
        if not 1 <= api_port <= 65535:
            raise ValueError(f"api port {api_port} must be the bound port (1-65535), not 0")
        self.node_id = node_id
        self.namespace = namespace
        self.namespace_hash = namespace_hash(namespace)
        self.api_port = api_port
        self.version = version
        by_interface = local_addresses()
        self._bind = None if interfaces is None else resolve_interfaces(interfaces, by_interface)
        if advertise_addresses is None:
            advertise_addresses = default_advertise_addresses(self._bind, by_interface)
        self.advertise_addresses = list(order_addresses(advertise_addresses))
        self._on_peer = on_peer
        self._on_goodbye = on_goodbye
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._browser: ServiceBrowser | None = None
        self._peers: dict[str, PeerAnnouncement] = {}  # instance name -> last one reported

    def start(self) -> None:
        """Register (mDNS probing takes ~1.5 s) and start browsing for peers."""
        _refuse_event_loop("start")
        zc = Zeroconf(interfaces=InterfaceChoice.All if self._bind is None else self._bind)
        try:
            self._info = self._service_info()
            zc.register_service(self._info)
            self._browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_change])
        except NonUniqueNameException:
            zc.close()
            raise DuplicateNode(self._info.name) from None
        except BaseException:
            zc.close()
            raise
        self._zc = zc

    def update_addresses(self, addresses: list[str]) -> None:
        """Re-announce after our addresses changed; peers see a service update."""
        self.advertise_addresses = list(order_addresses(addresses))
        if self._zc is not None:
            self._info = self._service_info()
            self._zc.update_service(self._info)

    def stop(self) -> None:
        """Unregister (peers get the mDNS goodbye at once) and close; safe to call twice."""
        _refuse_event_loop("stop")
        zc, info, browser = self._zc, self._info, self._browser
        self._zc = self._info = self._browser = None
        if zc is None or info is None or browser is None:
            return
        browser.cancel()
        try:
            zc.unregister_service(info)
        finally:
            zc.close()

    def _service_info(self) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.node_id}.{SERVICE_TYPE}",
            port=self.api_port,
            properties=build_txt(self.node_id, self.namespace, self.api_port, self.version),
            parsed_addresses=self.advertise_addresses,
            server=f"{self.node_id}.local.",
        )

    # zeroconf passes these by keyword, so the names matter.
    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        try:
            if state_change is ServiceStateChange.Removed:
                self._forget(name)
            else:
                self._resolve(zeroconf, service_type, name)
        except Exception:  # an error must not end zeroconf's browser thread
            log.exception("discovery: handling %s of %s failed", state_change.name, name)

    def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = ServiceInfo(service_type, name)
        if not info.request(zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("discovery: ignoring %s: no records within %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        fields, addresses = info.decoded_properties, info.parsed_scoped_addresses()
        try:
            peer = parse_announcement(fields, addresses, self.node_id, self.namespace_hash)
        except NotAPeer as exc:
            log.debug("discovery: ignoring %s: %s", name, exc)
            self._forget(name)  # a peer that turned into a non-peer is gone for us
            return
        if self._peers.get(name) != peer:  # zeroconf repeats unchanged services; we don't
            self._peers[name] = peer
            self._on_peer(peer)

    def _forget(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is not None:
            self._on_goodbye(peer.node_id)


class DuplicateNode(Exception):
    """Another live node announces our node id: shoal runs twice with one data dir, or a
    node.json was copied between machines."""


def _refuse_event_loop(method: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"Discovery.{method}() blocks; use asyncio.to_thread(discovery.{method})")
