"""Test hosts in network namespaces: veth cables between them, nftables rules on them.

Only addresses inside namespaces a test creates are ever used. Everything is torn down at the
end of the `Lab` context, also when the test fails.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

_counter = itertools.count()


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
