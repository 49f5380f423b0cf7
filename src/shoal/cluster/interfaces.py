"""Local network interfaces and their kind (thunderbolt, ethernet, wifi, vpn, bridge, ...).

Linux reads `/sys/class/net/<if>`; the readers take the sysfs root as an argument, so tests
classify fake trees. macOS maps devices to `networksetup -listallhardwareports` port names.
`local_interfaces()` is the thin shell over psutil; a missing tool or file yields kind "other".

Linux rules, first match wins (checked against a 6.x kernel inside a network namespace):
  loopback     name "lo", `type` 772, or IFF_LOOPBACK in `flags`
  wifi         `wireless/` or `phy80211` present, or uevent DEVTYPE=wlan
  bridge       `bridge/` present or uevent DEVTYPE=bridge (a real bridge shows both)
  thunderbolt  `device/driver` basename "thunderbolt-net", or a `thunderbolt*` name
  vpn          `tun_flags` present (tun and tap: tailscale0, ZeroTier), uevent DEVTYPE=wireguard
               or driver wireguard, `type` 65534 (none), or a tailscale*/utun*/wg*/tun*/zt* name
  veth         no `device` link and either a `veth*` name or: `type` 1, no uevent DEVTYPE,
               `iflink` != `ifindex` (a veth's iflink is its peer's ifindex) and no `lower_*`
               entry (macvlan/ipvlan/vlan point iflink at their parent but list `lower_<parent>`;
               vlan and vxlan also set DEVTYPE). Missed: an unnamed veth whose peer, in another
               namespace, happens to have the same ifindex.
  ethernet     `type` 1 with a `device` link (a real NIC; ifb, dummy, macvlan have none)
  other        everything else
"""

from __future__ import annotations

import ipaddress
import logging
import os
import platform
import re
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from shoal.schema.report import InterfaceInfo, InterfaceKind

log = logging.getLogger(__name__)

SYSFS_NET_ROOT = Path("/sys/class/net")
INFINIBAND_ROOT = Path("/sys/class/infiniband")
TOOL_TIMEOUT_S = 10.0

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
ARPHRD_NONE = 65534  # tun devices and wireguard: no link-layer header
IFF_UP = 0x1
IFF_LOOPBACK = 0x8

_VPN_NAME_PREFIXES = ("tailscale", "utun", "wg", "tun", "zt")
_MAC_VPN_NAME_PREFIXES = ("utun", "ipsec", "ppp", "tailscale")
_MAC_ETHERNET_PORT = re.compile(r"\b(ethernet|lan)\b", re.IGNORECASE)


def _read_text(path: Path) -> str | None:
    # Virtual devices answer EINVAL to reading `speed`; a vanished interface answers ENOENT.
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except (OSError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path) or ""
    try:
        return int(text, 16) if text.startswith("0x") else int(text)  # `flags` is hex
    except ValueError:
        return None


def _present(path: Path) -> bool:
    return os.path.lexists(path)  # a symlink counts even when its target is missing


def _entries(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:  # absent, or gone since we looked: interfaces come and go
        return []


def _uevent(dev: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in (_read_text(dev / "uevent") or "").splitlines())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def _device_driver(dev: Path) -> str | None:
    # Basename of the `device/driver` link: the kernel driver of a physical device.
    try:
        target = os.readlink(dev / "device" / "driver")
    except OSError:
        return None
    return Path(target).name or None


def _is_veth(dev: Path, name: str, arp_type: int | None, devtype: str) -> bool:
    if _present(dev / "device"):
        return False
    if name.startswith("veth"):
        return True
    ifindex, iflink = _read_int(dev / "ifindex"), _read_int(dev / "iflink")
    if arp_type != ARPHRD_ETHER or devtype or ifindex is None or iflink in (None, 0, ifindex):
        return False
    return not any(entry.startswith("lower_") for entry in _entries(dev))


def _classify(dev: Path, name: str) -> tuple[InterfaceKind, str | None]:
    """Kind plus the driver name where sysfs shows it (or the rule that matched implies it)."""
    devtype = _uevent(dev).get("DEVTYPE", "")
    arp_type = _read_int(dev / "type")
    flags = _read_int(dev / "flags") or 0
    driver = _device_driver(dev)
    if name == "lo" or arp_type == ARPHRD_LOOPBACK or flags & IFF_LOOPBACK:
        return InterfaceKind.LOOPBACK, driver
    if _present(dev / "wireless") or _present(dev / "phy80211") or devtype == "wlan":
        return InterfaceKind.WIFI, driver
    if _present(dev / "bridge") or devtype == "bridge":
        return InterfaceKind.BRIDGE, driver or "bridge"
    if driver == "thunderbolt-net" or name.startswith("thunderbolt"):
        return InterfaceKind.THUNDERBOLT, driver
    if _present(dev / "tun_flags"):
        return InterfaceKind.VPN, driver or "tun"
    if devtype == "wireguard" or driver == "wireguard":
        return InterfaceKind.VPN, "wireguard"
    if arp_type == ARPHRD_NONE or name.startswith(_VPN_NAME_PREFIXES):
        return InterfaceKind.VPN, driver
    if _is_veth(dev, name, arp_type, devtype):
        return InterfaceKind.VETH, "veth"
    if arp_type == ARPHRD_ETHER and _present(dev / "device"):
        return InterfaceKind.ETHERNET, driver
    return InterfaceKind.OTHER, driver


def _safe_name(name: str) -> bool:
    # The name becomes a path component: never let it climb out of the sysfs root.
    return bool(name) and "/" not in name and name not in (".", "..")


def classify_linux_interface(sysfs_root: Path, name: str) -> InterfaceKind:
    """Kind of interface `name` from a sysfs tree shaped like /sys/class/net (SYSFS_NET_ROOT)."""
    if not _safe_name(name):
        return InterfaceKind.OTHER
    return _classify(Path(sysfs_root) / name, name)[0]


def has_rdma(infiniband_root: Path, name: str) -> bool:
    """True when an RDMA device (InfiniBand, RoCE, soft-RoCE) sits on interface `name`."""
    for ibdev in _entries(infiniband_root):
        base = Path(infiniband_root) / ibdev
        if _safe_name(name) and _present(base / "device" / "net" / name):
            return True
        # RoCE names its netdev per GID entry; soft-RoCE (rxe) has no `device/net` at all.
        for ndev in base.glob("ports/*/gid_attrs/ndevs/*"):
            if _read_text(ndev) == name:
                return True
    return False


def read_linux_interface(
    sysfs_root: Path,
    name: str,
    addresses: Sequence[str] = (),
    *,
    infiniband_root: Path = INFINIBAND_ROOT,
) -> InterfaceInfo:
    """Everything sysfs says about interface `name`, with the given CIDR addresses attached."""
    if not _safe_name(name):
        return InterfaceInfo(name=name, addresses=tuple(addresses), up=False)
    device = name.split(":", 1)[0]  # "eth0:1" is an address label on eth0, not a device
    dev = Path(sysfs_root) / device
    kind, driver = _classify(dev, device)
    mac = (_read_text(dev / "address") or "").lower()
    speed = _read_int(dev / "speed")
    flags = _read_int(dev / "flags")
    up = bool(flags & IFF_UP) if flags is not None else _read_text(dev / "operstate") == "up"
    return InterfaceInfo(
        name=name,
        kind=kind,
        addresses=tuple(addresses),
        mac=mac if mac and mac.strip("0:") else None,  # tun has none, lo is all zeros
        up=up,
        speed_mbps=speed if speed and speed > 0 else None,  # -1 means "unknown"
        rdma=has_rdma(infiniband_root, device),
        driver=driver,
    )


def parse_hardware_ports(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` output -> {device: port name}, e.g. en1 -> Wi-Fi."""
    ports: dict[str, str] = {}
    port: str | None = None
    for line in text.splitlines() if isinstance(text, str) else []:
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "Hardware Port":
            port = value or None
        elif key == "Device" and port and value:
            ports[value] = port
            port = None
    return ports


def classify_macos_interface(name: str, port: str | None) -> InterfaceKind:
    """Kind of a macOS interface from its hardware port name, else from its BSD name."""
    if port:
        # Ethernet first: Apple's "Thunderbolt Ethernet" adapter is an Ethernet path.
        if _MAC_ETHERNET_PORT.search(port):
            return InterfaceKind.ETHERNET
        # "Thunderbolt N" and "Thunderbolt Bridge" (bridge0 over the TB ports) both carry the
        # direct-cable addresses; addressing tells the bridge alias apart by its name.
        if port.lower().startswith("thunderbolt"):
            return InterfaceKind.THUNDERBOLT
        if port.lower() in ("wi-fi", "airport"):
            return InterfaceKind.WIFI
    if re.fullmatch(r"lo\d*", name):
        return InterfaceKind.LOOPBACK
    if name.startswith(_MAC_VPN_NAME_PREFIXES):
        return InterfaceKind.VPN
    if name.startswith("bridge"):
        return InterfaceKind.BRIDGE
    # awdl/llw (AirDrop), anpi, ap, gif, stf and ports like "Bluetooth PAN" or "iPhone USB".
    return InterfaceKind.OTHER


def run_tool(argv: Sequence[str], timeout: float = TOOL_TIMEOUT_S) -> str | None:
    """Stdout of a local tool, or None (with a debug log) when it is missing or fails."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s unavailable: %s", argv[0], exc)
        return None
    if proc.returncode != 0:
        log.debug("%s exited %d: %s", argv[0], proc.returncode, proc.stderr.strip()[:200])
        return None
    return proc.stdout


def macos_hardware_ports() -> dict[str, str]:
    """{device: port name} on this Mac; {} elsewhere or when networksetup fails."""
    if platform.system() != "Darwin":
        return {}
    return parse_hardware_ports(run_tool(["networksetup", "-listallhardwareports"]) or "")


def address_to_cidr(address: str, netmask: str | None) -> str | None:
    """CIDR of a psutil address: fe80::1%en0 with ffff:ffff:ffff:ffff:: -> fe80::1/64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    prefix = ip.max_prefixlen
    if netmask:
        try:
            prefix = bin(int(ipaddress.ip_address(netmask.split("%", 1)[0]))).count("1")
        except ValueError:
            pass
    return f"{ip}/{prefix}"


def _addresses_and_mac(entries: Sequence[Any]) -> tuple[tuple[str, ...], str | None]:
    """psutil's address entries of one interface -> (CIDR strings, MAC or None)."""
    ips = [e for e in entries if e.family in (socket.AF_INET, socket.AF_INET6)]
    cidrs = tuple(c for e in ips if (c := address_to_cidr(e.address, e.netmask)))
    macs = [e.address for e in entries if e.family == psutil.AF_LINK and e.address.strip("0:-")]
    return cidrs, macs[0].lower().replace("-", ":") if macs else None


def local_interfaces() -> list[InterfaceInfo]:
    """This machine's interfaces, sorted by name: addresses, up flag, MAC, kind, speed, RDMA."""
    try:
        all_addrs = psutil.net_if_addrs()
        all_stats = psutil.net_if_stats()
    except (OSError, psutil.Error) as exc:
        log.debug("cannot list interfaces: %s", exc)
        return []
    system = platform.system()
    ports = macos_hardware_ports() if system == "Darwin" else {}
    result: list[InterfaceInfo] = []
    for name in sorted(set(all_addrs) | set(all_stats)):
        cidrs, mac = _addresses_and_mac(all_addrs.get(name, []))
        if system == "Linux":
            info = read_linux_interface(SYSFS_NET_ROOT, name, cidrs)
            result.append(info if info.mac or not mac else info.model_copy(update={"mac": mac}))
            continue
        kind = InterfaceKind.OTHER
        if system == "Darwin":
            kind = classify_macos_interface(name, ports.get(name))
        stats = all_stats.get(name)
        up, speed = (stats.isup, stats.speed or None) if stats else (False, None)
        result.append(
            InterfaceInfo(name=name, kind=kind, addresses=cidrs, mac=mac, up=up, speed_mbps=speed)
        )
    return result
