"""Wire format of link probes: small versioned JSON datagrams over UDP, optionally HMAC-signed.

probe: {"v": 1, "t": "probe", "from": <node id>, "ns": <namespace hash>, "nonce": <str>,
        "to": <"host:port" the sender targeted>, "ts": <send time, with a cluster secret>,
        "sig": <hex, only with a cluster secret>}
ack:   {"v": 1, "t": "ack", "node": <node id>, "ns": ..., "nonce": <the probe's nonce>, "sig": ...}

Datagrams come from anyone on the network, so decoding is strict: size first (before any
parsing), then shape, version, namespace and signature (shoal.web.signing's HMAC; a signed
probe must also be fresh, and the prober refuses a nonce it has seen: no replays). Every
rejection is a WireError with a short reason; the prober logs it and drops the datagram.
Unknown extra fields are ignored so a newer peer that adds one still talks to us. Never
pickle: a datagram is data, not code.

Also here: which local address and interface a probe leaves from (a connected UDP socket asks
the kernel's routing; psutil names the interface that holds the address).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from shoal.schema.address import interface_holding
from shoal.schema.report import InterfaceKind
from shoal.web.signing import SignatureError, check_fresh, mac

WIRE_VERSION = 1
MAX_DATAGRAM_BYTES = 2048  # a probe is ~150 bytes; anything larger is not ours
MAX_FIELD_CHARS = 256


class WireError(ValueError):
    """A datagram that is not a valid probe or ack for this cluster; the reason says why."""


@dataclass(frozen=True)
class Probe:
    sender: str  # node id of the prober
    namespace: str
    nonce: str
    target: str  # "host:port" the prober sent to: the receiver's local address of this path
    ts: str | None = None  # wall-clock send time: with a cluster secret, checked for freshness


@dataclass(frozen=True)
class Ack:
    node: str  # node id of whoever answered: checked against the peer expected at that address
    namespace: str
    nonce: str


Message = Probe | Ack


def format_addr(host: str, port: int) -> str:
    """Join as "host:port", with IPv6 hosts in brackets so the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _signature(body: dict[str, Any], secret: bytes) -> str:
    # Canonical form: sorted keys, no whitespace, without "sig" itself.
    unsigned = {k: v for k, v in body.items() if k != "sig"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    return mac(secret, "shoal-probe-1", canonical)


def encode(message: Message, secret: bytes | None = None) -> bytes:
    if isinstance(message, Probe):
        body: dict[str, Any] = {
            "v": WIRE_VERSION,
            "t": "probe",
            "from": message.sender,
            "ns": message.namespace,
            "nonce": message.nonce,
            "to": message.target,
        }
        if message.ts is not None:
            body["ts"] = message.ts
    else:
        body = {
            "v": WIRE_VERSION,
            "t": "ack",
            "node": message.node,
            "ns": message.namespace,
            "nonce": message.nonce,
        }
    if secret is not None:
        body["sig"] = _signature(body, secret)
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_DATAGRAM_BYTES:
        raise WireError(f"oversized: {len(data)} bytes")
    return data


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_CHARS:
        raise WireError(f"bad field {key!r}")
    return value


def decode(
    data: bytes, namespace: str, secret: bytes | None = None, now: float | None = None
) -> Message:
    """Parse one datagram addressed to `namespace`; raise WireError for anything else. With a
    secret, a probe must be signed and sent within the window of `now` (wall clock)."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise WireError(f"oversized: {len(data)} bytes")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # [[[[...
        raise WireError(f"malformed: {exc}") from None
    if not isinstance(body, dict):
        raise WireError("malformed: not an object")
    version = body.get("v")
    if type(version) is not int or version != WIRE_VERSION:  # bool is an int: exact type
        raise WireError(f"version {version!r} unsupported")
    kind = body.get("t")
    if kind not in ("probe", "ack"):
        raise WireError(f"unknown type {kind!r}")
    if _text(body, "ns") != namespace:
        raise WireError("other namespace")
    if secret is not None:
        sig = body.get("sig")
        if not isinstance(sig, str):
            raise WireError("unsigned")
        if not hmac.compare_digest(sig, _signature(body, secret)):
            raise WireError("bad signature")
    nonce = _text(body, "nonce")
    if kind == "probe":
        ts = _text(body, "ts") if secret is not None or "ts" in body else None
        if secret is not None and ts is not None:
            try:
                check_fresh(ts, now if now is not None else time.time())
            except SignatureError as exc:
                raise WireError(str(exc)) from None
        return Probe(_text(body, "from"), namespace, nonce, _text(body, "to"), ts)
    return Ack(_text(body, "node"), namespace, nonce)


@dataclass(frozen=True)
class LocalAddress:
    interface: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address


def read_local_addresses() -> list[LocalAddress]:
    """This machine's IP addresses with their interface and subnet (psutil)."""
    found: list[LocalAddress] = []
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6) or not addr.netmask:
                continue
            try:
                ip = ipaddress.ip_address(addr.address.split("%")[0])
                prefix = bin(int(ipaddress.ip_address(addr.netmask))).count("1")
            except ValueError:
                continue
            network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
            found.append(LocalAddress(name, network, ip))
    return found


def interface_for(host: str, local: Sequence[LocalAddress]) -> str | None:
    """The interface of this machine holding `host` (schema.address.interface_holding)."""
    return interface_holding(host, ((a.interface, f"{a.ip}/{a.network.prefixlen}") for a in local))


def source_address(bind_host: str, host: str, port: int) -> str | None:
    """The local address the kernel would send from to reach (host, port) from bind_host.

    A connected UDP socket makes the kernel pick a route and source address without sending
    anything; binding it to bind_host first matches what the probe socket will really use.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((bind_host, 0))
            sock.connect((host, port))
            return str(sock.getsockname()[0])
    except OSError:  # no route, or an address family the bind host cannot reach
        return None


def describe_local(
    host: str | None,
    local: Sequence[LocalAddress],
    classify: Callable[[str], InterfaceKind] | None = None,
) -> tuple[str | None, InterfaceKind]:
    """Interface name and kind of a local address; without a classifier only loopback is known."""
    name = None if host is None else interface_for(host, local)
    if name is not None and classify is not None:
        return name, classify(name)
    try:
        loopback = host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    return name, InterfaceKind.LOOPBACK if loopback else InterfaceKind.OTHER


def split_addr(addr: str) -> str:
    """Host part of "host:port" / "[v6]:port"."""
    return addr.rpartition(":")[0].strip("[]")
