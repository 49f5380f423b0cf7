"""host:port, the one parser ('10.0.0.2:52415', '[fe80::1%en5]:52415', a bare host), and which
interface holds an address.

Every node-to-node address in shoal is written `host:port` with IPv6 hosts in brackets (the
reports' `addresses`, an instance's store address, the prober's peer_addr); URLs put the same
bracketed host after `http://`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


def split_host_port(address: str, default_port: int | None = None) -> tuple[str, int | None]:
    """'[::1]:80' -> ('::1', 80); '10.0.0.2' -> ('10.0.0.2', default_port); a bare IPv6
    address (colons, no brackets) is a host without a port."""
    address = address.strip()
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            return address, default_port
        rest = address[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
        return address[1:end], int(port) if port.isdigit() else default_port
    host, sep, port = address.rpartition(":")
    if not sep or ":" in host or not port.isdigit():
        return address, default_port
    return host, int(port)


def is_loopback(host: str) -> bool:
    """An IP literal of this machine's loopback (a hostname is not: it may resolve anywhere)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(address: str) -> str:
    """The host part of 'host:port' (brackets removed)."""
    return split_host_port(address)[0]


def url_host(host: str) -> str:
    """A host as it goes into a URL or a 'host:port': IPv6 in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def join_host_port(host: str, port: int) -> str:
    return f"{url_host(host)}:{port}"


def base_url(host: str, port: int) -> str:
    return f"http://{join_host_port(host, port)}"


def interface_holding(host: str, addresses: Iterable[tuple[str, str]]) -> str | None:
    """The interface holding `host` among (interface, "ip/prefix") pairs: an exact address
    first, else the narrowest subnet containing it (127.0.0.2 lives on lo through 127.0.0.1/8).
    One rule for this machine's own addresses (probes) and for a peer's report (placement)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    best: tuple[int, str] | None = None
    for name, cidr in addresses:
        try:
            iface = ipaddress.ip_interface(cidr)
        except ValueError:
            continue
        if iface.ip == ip:
            return name
        if iface.version == ip.version and ip in iface.network:
            if best is None or iface.network.prefixlen > best[0]:
                best = (iface.network.prefixlen, name)
    return best[1] if best else None
