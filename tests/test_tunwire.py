"""The slow cable (tests/tunwire.py) is a harness other scenarios rely on: it must really delay,
carry TCP in bulk without stalling, and never outlive its test.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns import TUNWIRE, Lab, Namespace, require_netns
from tunwire import DelayQueue
from waiting import wait_for

A_FAST, B_FAST = "10.240.8.1", "10.240.8.2"  # veth
A_SLOW, B_SLOW = "10.240.9.1", "10.240.9.2"  # tun wire
HTTP_PORT = 8731


def test_delay_queue_keeps_order_holds_until_due_and_is_bounded():
    q = DelayQueue(0.02, max_bytes=10)
    q.push(1.0, 7, b"aaaa")
    q.push(1.0, 8, b"bbbb")
    q.push(1.0, 7, b"cccc")  # over the byte cap: dropped
    assert q.dropped == 1
    assert q.pop_due(1.019) == []
    assert q.next_due() == pytest.approx(1.02)
    assert q.pop_due(1.02) == [(7, b"aaaa"), (8, b"bbbb")]
    assert q.next_due() is None and q.queued_bytes == 0


def avg_rtt_ms(ns: Namespace, addr: str) -> float:
    out = ns.run("ping", "-c", "5", "-i", "0.2", "-W", "2", addr).stdout
    match = re.search(r"= [\d.]+/([\d.]+)/", out)
    assert match, out
    return float(match.group(1))


@pytest.mark.timeout(120)
def test_slow_cable_delays_carries_bulk_tcp_and_stops_with_the_lab(tmp_path: Path):
    require_netns()
    served = tmp_path / "www"
    served.mkdir()
    blob = os.urandom(4 << 20)  # a gloo-sized message
    (served / "blob").write_bytes(blob)
    (served / "ok").write_text("ok")
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.cable(a, "eth1", f"{A_FAST}/24", b, "eth1", f"{B_FAST}/24")
        wire = lab.slow_cable(a, "slow0", f"{A_SLOW}/30", b, "slow0", f"{B_SLOW}/30", rtt_ms=40)

        slow, fast = avg_rtt_ms(a, B_SLOW), avg_rtt_ms(a, B_FAST)
        print(f"avg RTT: slow cable {slow:.2f} ms, veth {fast:.3f} ms")
        assert slow >= 30, slow
        assert fast < 10, fast

        args = [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", B_SLOW,
                "--directory", str(served)]  # fmt: skip
        lab.start(b, args, dict(os.environ), str(tmp_path / "http.log"))
        url = f"http://{B_SLOW}:{HTTP_PORT}"
        wait_for("http.server over the slow cable", lambda: fetch(a, f"{url}/ok") == "ok", 20)
        got = tmp_path / "got"
        start = time.monotonic()
        # a stall (under 100 kB/s for 5 s) aborts; a total bound besides
        a.run("curl", "-sf", "--max-time", "25", "-Y", "100000", "-y", "5", "-o", str(got),
              f"{url}/blob")  # fmt: skip
        print(f"4 MiB over the slow cable in {time.monotonic() - start:.2f} s")
        assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(blob).digest()
    assert wire.returncode == 0  # stopped by the Lab's SIGTERM, cleanly


@pytest.mark.timeout(60)
def test_wire_exits_when_its_parent_dies():
    require_netns()
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        # a parent that starts the wire, reports its pid, then is killed
        starter = (
            "import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, *sys.argv[1:], '--parent', str(os.getpid())],\n"
            "                     stdout=subprocess.DEVNULL)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n"
        )
        args = [sys.executable, "-c", starter, TUNWIRE, "--a", a.name, "--a-if", "slow0",
                "--a-cidr", f"{A_SLOW}/30", "--b", b.name, "--b-if", "slow0",
                "--b-cidr", f"{B_SLOW}/30"]  # fmt: skip
        parent = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        lab.processes.append(parent)
        assert parent.stdout is not None
        wire_pid = int(parent.stdout.readline())
        parent.stdout.close()
        wait_for("the wire's device", lambda: has_link(a, "slow0"), 15)
        parent.kill()
        parent.wait(timeout=5)
        wait_for("the orphaned wire to exit", lambda: gone(wire_pid), 15)
        wait_for("its device to vanish", lambda: not has_link(a, "slow0"), 15)


def fetch(ns: Namespace, url: str) -> str:
    return ns.run("curl", "-sf", "--max-time", "2", url, check=False).stdout


def has_link(ns: Namespace, ifname: str) -> bool:
    return ns.run("ip", "link", "show", "dev", ifname, check=False).returncode == 0


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its new parent to reap it counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
