"""A slow cable between two network namespaces: a userspace TUN "wire" with a fixed delay.

This kernel has no netem, so a delayed path is a process: it makes a TUN device in each
namespace (setns, then /dev/net/tun) and copies IP packets between them through a time-ordered
queue, each packet leaving rtt/2 after it arrived. Standalone and stdlib only, so it runs as its
own process (`python tunwire.py --help`); `netns.Lab.slow_cable` starts it and tears it down.

It exits on SIGTERM/SIGINT and when its parent dies; the TUN devices vanish with it.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import heapq
import itertools
import os
import select
import signal
import struct
import subprocess
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1
READ_SIZE = 65535
READY = "ready"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into namespace `name`; children inherit it."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {name}")
    finally:
        os.close(fd)


def open_tun(ifname: str) -> int:
    """A TUN device (raw IP packets, no packet-info header) in the current namespace.

    The fd stays bound to this namespace's device after the process moves elsewhere.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def configure(ifname: str, cidr: str, mtu: int) -> None:
    """Address and bring up the device; `ip` runs as a child, so in the current namespace.

    A long send queue: with the default (1000) bulk TCP overruns it and loses packets here.
    """
    for args in (
        ["ip", "link", "set", "dev", ifname, "mtu", str(mtu), "txqueuelen", "5000"],
        ["ip", "addr", "add", cidr, "dev", ifname],
        ["ip", "link", "set", "dev", ifname, "up"],
    ):
        subprocess.run(args, check=True, capture_output=True, timeout=10)


class DelayQueue:
    """Packets ordered by departure time; equal times keep arrival order (a FIFO wire).

    Bounded in bytes: past the cap a packet is dropped, as a full queue on a real link would.
    """

    def __init__(self, delay_s: float, max_bytes: int = 64 << 20) -> None:
        self.delay_s = delay_s
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.dropped = 0
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._seq = itertools.count()

    def push(self, now: float, out_fd: int, packet: bytes) -> None:
        if self.queued_bytes + len(packet) > self.max_bytes:
            self.dropped += 1
            return
        heapq.heappush(self._heap, (now + self.delay_s, next(self._seq), out_fd, packet))
        self.queued_bytes += len(packet)

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[int, bytes]]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, _, fd, packet = heapq.heappop(self._heap)
            self.queued_bytes -= len(packet)
            out.append((fd, packet))
        return out


def forward(fd_a: int, fd_b: int, queue: DelayQueue, parent: int) -> None:
    """Copy packets a<->b through the delay queue until the parent is gone."""
    peer = {fd_a: fd_b, fd_b: fd_a}
    while os.getppid() == parent:
        due = queue.next_due()
        timeout = 1.0 if due is None else min(1.0, max(0.0, due - time.monotonic()))
        readable, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            for _ in range(256):  # drain a burst, but keep delivering on time
                try:
                    packet = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                queue.push(now, peer[fd], packet)
        for fd, packet in queue.pop_due(time.monotonic()):
            try:
                os.write(fd, packet)
            except OSError as e:  # a full or downed device drops, like a wire would
                if e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EIO, errno.EINVAL):
                    raise


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="namespace name (as in /var/run/netns)")
    p.add_argument("--a-if", required=True, help="TUN device name in namespace a")
    p.add_argument("--a-cidr", required=True, help="address/prefix; the prefix holds both ends")
    p.add_argument("--b", required=True)
    p.add_argument("--b-if", required=True)
    p.add_argument("--b-cidr", required=True)
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round trip; each way is half")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--parent", type=int, default=None, help="exit when this pid is gone")
    args = p.parse_args(argv)

    parent = args.parent if args.parent is not None else os.getppid()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl")
    if os.getppid() != parent:  # died before prctl took effect
        return 0

    fds = []
    for ns, ifname, cidr in ((args.a, args.a_if, args.a_cidr), (args.b, args.b_if, args.b_cidr)):
        enter_netns(ns)
        fds.append(open_tun(ifname))
        configure(ifname, cidr, args.mtu)
    print(READY, flush=True)
    queue = DelayQueue(args.rtt_ms / 2000.0)
    try:
        forward(fds[0], fds[1], queue, parent)
    finally:
        for fd in fds:
            os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
