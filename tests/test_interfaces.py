"""Interface kinds from fake sysfs trees shaped like the real one, macOS port names, the shell."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from shoal.cluster.interfaces import (
    address_to_cidr,
    classify_linux_interface,
    classify_macos_interface,
    has_rdma,
    local_interfaces,
    parse_hardware_ports,
    read_linux_interface,
)
from shoal.schema.report import InterfaceInfo
from shoal.schema.report import InterfaceKind as K

FIXTURES = Path(__file__).parent / "fixtures" / "thunderbolt"
PORTS_TEXT = (FIXTURES / "networksetup_listallhardwareports.txt").read_text()


def fake_netdev(
    root: Path,
    name: str,
    *,
    arp_type: int | None = 1,
    flags: int = 0x1003,
    ifindex: int = 2,
    iflink: int | None = None,
    devtype: str | None = None,
    driver: str | None = None,
    device: bool = False,
    entries: tuple[str, ...] = (),
    files: dict[str, str] | None = None,
) -> Path:
    """/sys/class/net/<name> holding only what the kernel shows for such a device: `device` links
    into a fake /sys/devices (its `driver` into .../drivers/<x>); veth, bridge, tun have none."""
    dev = root / name
    dev.mkdir(parents=True)
    uevent = (f"DEVTYPE={devtype}\n" if devtype else "") + f"INTERFACE={name}\nIFINDEX={ifindex}\n"
    link = ifindex if iflink is None else iflink
    base = {"flags": f"{flags:#x}", "ifindex": f"{ifindex}", "iflink": f"{link}", "uevent": uevent}
    if arp_type is not None:
        base["type"] = f"{arp_type}\n"
    for fname, text in {**base, **(files or {})}.items():
        (dev / fname).write_text(text)
    if device or driver:
        target = root.parent / "devices" / name
        target.mkdir(parents=True)
        if driver:  # readlink only: the driver's directory need not exist
            (target / "driver").symlink_to(root.parent / "drivers" / driver)
        (dev / "device").symlink_to(target)
    for entry in entries:  # markers such as wireless/, bridge/, lower_eth0
        (dev / entry).mkdir()
    return dev


# (name, fake_netdev options, kind); options mirror what `ls /sys/class/net/X` showed here.
CASES = [
    ("lo", dict(arp_type=772, flags=0x9, ifindex=1), K.LOOPBACK),
    ("lo-renamed", dict(arp_type=772, flags=0x9), K.LOOPBACK),
    ("lback", dict(flags=0x8), K.LOOPBACK),
    ("eth0", dict(driver="virtio_net", ifindex=4), K.ETHERNET),
    ("enp3s0", dict(driver="e1000e"), K.ETHERNET),
    ("enx001", dict(device=True), K.ETHERNET),
    ("wlan0", dict(driver="iwlwifi", devtype="wlan", entries=("wireless", "phy80211")), K.WIFI),
    ("wlp2s0", dict(driver="ath11k_pci", entries=("phy80211",)), K.WIFI),
    ("wlx0", dict(driver="mt7921u", devtype="wlan"), K.WIFI),
    ("br0", dict(devtype="bridge", entries=("bridge", "brif", "lower_vt1")), K.BRIDGE),
    ("docker0", dict(entries=("bridge",)), K.BRIDGE),
    ("tun0", dict(arp_type=65534, flags=0x1090, files={"tun_flags": "0x1801\n"}), K.VPN),
    ("tap0", dict(flags=0x1002, files={"tun_flags": "0x1802\n"}), K.VPN),
    ("tailscale0", dict(arp_type=65534, files={"tun_flags": "0x1001\n"}), K.VPN),
    ("wg0", dict(arp_type=65534, devtype="wireguard"), K.VPN),
    ("office", dict(arp_type=65534, devtype="wireguard"), K.VPN),
    ("ztabcdef", dict(files={"tun_flags": "0x1002\n"}), K.VPN),
    ("ppp0", dict(arp_type=65534), K.VPN),
    ("thunderbolt0", dict(driver="thunderbolt-net"), K.THUNDERBOLT),
    ("tbt-left", dict(driver="thunderbolt-net"), K.THUNDERBOLT),
    ("thunderbolt1", dict(), K.THUNDERBOLT),
    ("vt0", dict(ifindex=3, iflink=2, entries=("upper_mv0",)), K.VETH),
    ("eth0", dict(ifindex=6, iflink=17), K.VETH),  # a container's end of a veth pair
    ("veth9a1b2c", dict(ifindex=5, iflink=5), K.VETH),  # peer in another netns, same index
    ("mv0", dict(ifindex=7, iflink=3, entries=("lower_vt0",)), K.OTHER),  # macvlan
    ("eth0.5", dict(devtype="vlan", ifindex=8, iflink=4, entries=("lower_eth0",)), K.OTHER),
    ("vxlan0", dict(devtype="vxlan", ifindex=9, iflink=4), K.OTHER),
    ("ifb0", dict(flags=0x82), K.OTHER),
    ("gre1", dict(arp_type=778, ifindex=9, iflink=0), K.OTHER),
]


@pytest.mark.parametrize(("name", "options", "kind"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_linux_kind_from_sysfs(tmp_path: Path, name: str, options: dict, kind: K) -> None:
    root = tmp_path / "class" / "net"
    fake_netdev(root, name, **options)
    assert classify_linux_interface(root, name) == kind


@pytest.mark.parametrize(
    ("name", "kind"),
    [("lo", K.LOOPBACK), ("tailscale0", K.VPN), ("wg1", K.VPN), ("utun4", K.VPN),
     ("thunderbolt0", K.THUNDERBOLT), ("ghost0", K.OTHER), ("../../etc", K.OTHER), ("", K.OTHER)],
)  # fmt: skip
def test_linux_kind_without_sysfs_falls_back_to_name(tmp_path: Path, name: str, kind: K) -> None:
    assert classify_linux_interface(tmp_path / "missing", name) == kind
    info = read_linux_interface(tmp_path / "missing", name, infiniband_root=tmp_path)
    assert (info.kind, info.up, info.mac, info.speed_mbps) == (kind, False, None, None)


def test_read_linux_interface_collects_speed_mac_driver_and_up(tmp_path: Path) -> None:
    root = tmp_path / "class" / "net"
    files = {"speed": "10000\n", "address": "52:54:00:AB:CD:EF\n"}
    fake_netdev(root, "eth0", driver="virtio_net", files=files)
    info = read_linux_interface(root, "eth0", ["10.0.0.2/24"], infiniband_root=tmp_path / "ib")
    assert info == InterfaceInfo(
        name="eth0", kind=K.ETHERNET, addresses=("10.0.0.2/24",), mac="52:54:00:ab:cd:ef",
        up=True, speed_mbps=10000, rdma=False, driver="virtio_net",
    )  # fmt: skip
    assert read_linux_interface(root, "eth0:1", infiniband_root=tmp_path).kind == K.ETHERNET


@pytest.mark.parametrize(
    ("speed", "expected"), [("1000\n", 1000), ("-1\n", None), ("0\n", None), ("junk", None),
                            (None, None), ("dir", None)],
)  # fmt: skip
def test_speed_ignores_unknown_and_unreadable(tmp_path: Path, speed: str | None, expected) -> None:
    root = tmp_path / "net"
    dev = fake_netdev(root, "eth0", driver="igb")
    if speed == "dir":
        (dev / "speed").mkdir()  # stands in for the EINVAL a virtual device answers
    elif speed is not None:
        (dev / "speed").write_text(speed)
    assert read_linux_interface(root, "eth0").speed_mbps == expected


@pytest.mark.parametrize(
    ("name", "options", "up", "mac", "driver"),
    [("lo", dict(arp_type=772, flags=0x9, files={"address": "00:00:00:00:00:00\n"}), True, None,
      None),
     ("tun0", dict(arp_type=65534, flags=0x1090, files={"tun_flags": "0x1801", "address": "\n"}),
      False, None, "tun"),
     ("br0", dict(flags=0x1002, entries=("bridge",)), False, None, "bridge"),
     ("vt0", dict(ifindex=3, iflink=2), True, None, "veth"),
     ("wg0", dict(arp_type=65534, devtype="wireguard", flags=0x91), True, None, "wireguard")],
)  # fmt: skip
def test_read_linux_interface_virtual_devices(tmp_path, name, options, up, mac, driver) -> None:
    root = tmp_path / "net"
    fake_netdev(root, name, **options)
    info = read_linux_interface(root, name, infiniband_root=tmp_path / "ib")
    assert (info.up, info.mac, info.driver) == (up, mac, driver)


def test_rdma_found_by_device_net_and_by_roce_gid_ndevs(tmp_path: Path) -> None:
    ib = tmp_path / "infiniband"
    (ib / "mlx5_0" / "device" / "net" / "enp1s0f0np0").mkdir(parents=True)
    ndevs = ib / "rxe0" / "ports" / "1" / "gid_attrs" / "ndevs"
    ndevs.mkdir(parents=True)
    (ndevs / "0").write_text("eth1\n")
    (ndevs / "1").mkdir()  # an empty GID slot: unreadable, skipped
    assert has_rdma(ib, "enp1s0f0np0")
    assert has_rdma(ib, "eth1")
    assert not has_rdma(ib, "eth0")
    assert not has_rdma(tmp_path / "absent", "eth1")
    root = tmp_path / "net"
    fake_netdev(root, "eth1", driver="virtio_net")
    assert read_linux_interface(root, "eth1", infiniband_root=ib).rdma


def test_parse_hardware_ports_fixture() -> None:
    assert parse_hardware_ports(PORTS_TEXT) == {
        "en0": "Ethernet", "en1": "Wi-Fi", "bridge0": "Thunderbolt Bridge",
        "en2": "Thunderbolt 1", "en3": "Thunderbolt 2", "en4": "Thunderbolt 3",
        "en5": "Thunderbolt 4", "en8": "USB 10/100/1000 LAN", "en9": "iPhone USB",
        "en10": "Bluetooth PAN",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", {}), ("garbage\n====", {}), ("Device: en0\n", {}), ("Hardware Port: Wi-Fi\n", {}),
     ("Hardware Port: Wi-Fi\r\nDevice: en1\r\n", {"en1": "Wi-Fi"}),
     ("Hardware Port: A\nDevice:\nHardware Port: B\nDevice: en7", {"en7": "B"}),
     (None, {}), (b"Hardware Port: A\nDevice: en0", {})],
)  # fmt: skip
def test_parse_hardware_ports_malformed(text, expected) -> None:
    assert parse_hardware_ports(text) == expected


@pytest.mark.parametrize(
    ("name", "port", "kind"),
    [("en0", "Ethernet", K.ETHERNET), ("en1", "Wi-Fi", K.WIFI), ("en1", "AirPort", K.WIFI),
     ("bridge0", "Thunderbolt Bridge", K.THUNDERBOLT), ("en2", "Thunderbolt 1", K.THUNDERBOLT),
     ("en8", "USB 10/100/1000 LAN", K.ETHERNET), ("en6", "Thunderbolt Ethernet Slot 1", K.ETHERNET),
     ("en9", "iPhone USB", K.OTHER), ("en10", "Bluetooth PAN", K.OTHER), ("utun3", None, K.VPN),
     ("ipsec0", None, K.VPN), ("bridge100", None, K.BRIDGE), ("lo0", None, K.LOOPBACK),
     ("awdl0", None, K.OTHER), ("llw0", None, K.OTHER), ("en7", None, K.OTHER),
     ("low0", None, K.OTHER)],
)  # fmt: skip
def test_macos_kind_from_port_name(name: str, port: str | None, kind: K) -> None:
    assert classify_macos_interface(name, port) == kind


@pytest.mark.parametrize(
    ("address", "netmask", "cidr"),
    [("192.168.100.2", "255.255.255.0", "192.168.100.2/24"), ("10.0.0.1", None, "10.0.0.1/32"),
     ("fe80::1%eth0", "ffff:ffff:ffff:ffff::", "fe80::1/64"), ("::1", "", "::1/128"),
     ("100.64.1.2", "bogus", "100.64.1.2/32"), ("52:54:00:ab:cd:ef", None, None)],
)  # fmt: skip
def test_address_to_cidr(address: str, netmask: str | None, cidr: str | None) -> None:
    assert address_to_cidr(address, netmask) == cidr


def test_local_interfaces_on_this_linux_machine_has_loopback() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the real Linux sysfs")
    found = {info.name: info for info in local_interfaces()}
    assert found["lo"].kind == K.LOOPBACK and "127.0.0.1/8" in found["lo"].addresses


def _snic(family: int, address: str, netmask: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(family=family, address=address, netmask=netmask)


def test_local_interfaces_on_macos_uses_networksetup(monkeypatch: pytest.MonkeyPatch) -> None:
    addrs = {
        "en2": [_snic(socket.AF_INET, "192.168.100.1", "255.255.255.0"),
                _snic(psutil.AF_LINK, "36:A1:8F:22:90:40")],
        "utun3": [_snic(socket.AF_INET, "100.101.1.2", "255.255.255.255")],
        "lo0": [_snic(socket.AF_INET6, "::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")],
    }  # fmt: skip
    stats = {"en2": SimpleNamespace(isup=True, speed=0), "lo0": SimpleNamespace(isup=True, speed=0)}
    monkeypatch.setattr("platform.system", lambda: "Darwin")
    monkeypatch.setattr("shoal.cluster.interfaces.run_tool", lambda argv, timeout=0: PORTS_TEXT)
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: addrs)
    monkeypatch.setattr(psutil, "net_if_stats", lambda: stats)
    found = {info.name: info for info in local_interfaces()}
    assert [found[n].kind for n in ("en2", "lo0", "utun3")] == [K.THUNDERBOLT, K.LOOPBACK, K.VPN]
    assert found["en2"].addresses == ("192.168.100.1/24",)
    assert (found["en2"].mac, found["en2"].up) == ("36:a1:8f:22:90:40", True)
    assert not found["utun3"].up  # psutil has no stats for it


def test_missing_tools_degrade_to_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.system", lambda: "Darwin")
    monkeypatch.setenv("PATH", "")  # no networksetup to run
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {"en0": []})
    monkeypatch.setattr(psutil, "net_if_stats", lambda: {})
    assert [(i.name, i.kind) for i in local_interfaces()] == [("en0", K.OTHER)]

    def psutil_fails() -> None:
        raise OSError("getifaddrs failed")

    monkeypatch.setattr(psutil, "net_if_addrs", psutil_fails)
    assert local_interfaces() == []


# Devices made for real in a throwaway namespace (links stay down: no traffic), and their kinds.
_SETUP = """link add vt0 type veth peer name vt1
link add br0 type bridge
link set vt1 master br0
tuntap add dev tun0 mode tun
tuntap add dev tap0 mode tap
"""
_REAL = {"lo": "loopback", "vt0": "veth", "vt1": "veth", "br0": "bridge", "tun0": "vpn",
         "tap0": "vpn"}  # fmt: skip
_PROBE = """import json, sys, pathlib
from shoal.cluster.interfaces import classify_linux_interface as kind
print(json.dumps({n: kind(pathlib.Path("/sys/class/net"), n) for n in sys.argv[1:]}))"""


def _ip(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_fake_trees_mirror_the_real_kernel() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    ns = f"shoal-ifc-{os.getpid()}"
    if _ip("netns", "add", ns).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        made = _ip("-n", ns, "-batch", "-", stdin=_SETUP)
        if made.returncode != 0:
            pytest.skip(f"kernel refused a device: {made.stderr.strip()}")
        out = _ip("netns", "exec", ns, sys.executable, "-c", _PROBE, *_REAL)
    finally:
        _ip("netns", "del", ns)
    assert json.loads(out.stdout) == _REAL, out.stderr
