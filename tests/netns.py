"""Test hosts in network namespaces: veth cables between them, nftables rules on them.

Only addresses inside namespaces a test creates are ever used. Everything is torn down at the
end of the `Lab` context, also when the test fails.
"""

from __future__ import annotations

import itertools
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

_counter = itertools.count()
TUNWIRE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tunwire.py")


def require_netns() -> None:
    """Skip (with the reason) where namespaces cannot be made; CI runs as root with iproute2."""
    if os.geteuid() != 0:
        pytest.skip("network namespace scenarios need root")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            pytest.skip(f"network namespace scenarios need `{tool}` (apt-get install {package})")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Namespace:
    name: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *args, check=check)

    def popen(self, args: Sequence[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
        log = open(log_path, "wb")  # noqa: SIM115 - closed with the process by the Lab
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def nft(self, script: str) -> None:
        """Apply an nftables script inside this namespace (rules vanish with it)."""
        subprocess.run(
            ["ip", "netns", "exec", self.name, "nft", "-f", "-"],
            input=script,
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )


def _is_up(ns: Namespace, ifname: str) -> bool:
    out = ns.run("ip", "-o", "link", "show", "dev", ifname, check=False)
    flags = out.stdout.partition("<")[2].partition(">")[0].split(",")
    return out.returncode == 0 and "UP" in flags


@dataclass
class Lab:
    """A set of namespaces for one test; use as a context manager."""

    prefix: str = field(default_factory=lambda: f"sh{os.getpid() % 100000}x{next(_counter)}")
    namespaces: list[Namespace] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def host(self, label: str) -> Namespace:
        ns = Namespace(f"{self.prefix}{label}")
        sh("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def cable(
        self, a: Namespace, a_if: str, a_cidr: str, b: Namespace, b_if: str, b_cidr: str
    ) -> None:
        """A veth pair from a to b with an address on each end."""
        # made in the root namespace under unique temporary names, renamed once moved
        n = next(_counter)
        tmp_a, tmp_b = f"shv{os.getpid() % 100000}x{n}a", f"shv{os.getpid() % 100000}x{n}b"
        sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        for ns, tmp, name, cidr in ((a, tmp_a, a_if, a_cidr), (b, tmp_b, b_if, b_cidr)):
            sh("ip", "link", "set", tmp, "netns", ns.name)
            ns.run("ip", "link", "set", tmp, "name", name)
            ns.run("ip", "addr", "add", cidr, "dev", name)
            ns.run("ip", "link", "set", name, "up")

    def slow_cable(
        self,
        a: Namespace,
        a_if: str,
        a_cidr: str,
        b: Namespace,
        b_if: str,
        b_cidr: str,
        rtt_ms: float = 40.0,
        mtu: int = 1500,
        timeout: float = 15.0,
    ) -> subprocess.Popen:
        """A delayed point-to-point link (no netem here): a tunwire.py process joins a TUN
        device in each namespace, each way rtt_ms/2. Give prefixes that hold both ends
        (e.g. /30). Returns once both ends are up; the wire stops with the Lab.
        """
        args = [
            sys.executable, TUNWIRE, "--a", a.name, "--a-if", a_if, "--a-cidr", a_cidr,
            "--b", b.name, "--b-if", b_if, "--b-cidr", b_cidr, "--rtt-ms", str(rtt_ms),
            "--mtu", str(mtu), "--parent", str(os.getpid()),
        ]  # fmt: skip
        err = tempfile.TemporaryFile()  # noqa: SIM115 - read only when the wire fails
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        self.processes.append(proc)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = bool(sel.select(timeout)) and proc.stdout.readline().strip() == b"ready"
        proc.stdout.close()  # the wire says nothing more
        deadline = time.monotonic() + timeout
        while ready and not all(_is_up(ns, name) for ns, name in ((a, a_if), (b, b_if))):
            if time.monotonic() > deadline or proc.poll() is not None:
                ready = False
            time.sleep(0.05)
        if not ready:
            proc.kill()
            proc.wait(timeout=5)
            err.seek(0)
            detail = err.read().decode(errors="replace").strip()
            raise RuntimeError(f"tun wire {a.name}/{a_if} <-> {b.name}/{b_if} not up: {detail}")
        err.close()
        return proc

    def start(
        self, ns: Namespace, args: Sequence[str], env: dict[str, str], log_path: str
    ) -> subprocess.Popen:
        proc = ns.popen(args, env, log_path)
        self.processes.append(proc)
        return proc

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns.name, check=False)
