"""Meeting the other ranks of an instance, and the few calls the lockstep protocol makes.

`join` opens rank 0's TCPStore (rank 0 hosts it) and runs `init_process_group`, retrying with
growing waits so that ranks whose machines boot out of order still meet; its final error names
the store address and the interface it used. The ranks then step on a group of their own whose
timeout is the step timeout, so a peer that vanishes fails a step instead of hanging it (gloo
closes the connection after a timeout: the group is unusable from then on).

Rank 0's store listens only on the store address placement chose (a socket bound there and
handed to the TCPStore), not on every interface; it is unauthenticated, so the cluster's
network is what keeps strangers off it (README, Security). Collectives move tensors only:
nothing here or in the lockstep protocol pickles.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Rank 0 holds the store, so it always outlives the calls below; keys live for one instance.
LOADED_KEY = "shoal/loaded/{rank}"
FAILED_KEY = "shoal/failed"
MIN_MEETING_S = 5.0  # a rank that reached the store on the last try still gets this long


class InitError(RuntimeError):
    """This rank could not meet the others."""


class PeerLostError(RuntimeError):
    """A peer went away or stopped answering; the instance's group is unusable."""


@dataclass(frozen=True)
class Rendezvous:
    """How this rank meets the others (the transport part of a RunnerSpec)."""

    rank: int
    world_size: int
    store_host: str
    store_port: int
    backend: str = "gloo"
    ifname: str | None = None
    attempts: int = 8
    window_s: float = 30.0
    step_timeout_s: float = 30.0

    @property
    def store_address(self) -> str:
        host = f"[{self.store_host}]" if ":" in self.store_host else self.store_host
        return f"{host}:{self.store_port}"

    @property
    def interface(self) -> str:
        return f"interface {self.ifname}" if self.ifname else "the default interface"


def try_timeouts(attempts: int, window_s: float, growth: float = 1.5) -> list[float]:
    """How long each try waits: each half again as long as the one before, summing to the
    window (8 tries over 30 s: 0.6 s, 0.9 s, 1.4 s, ... 10.4 s)."""
    if attempts < 1 or window_s <= 0:
        raise ValueError("need at least one try and a positive window")
    first = window_s * (growth - 1) / (growth**attempts - 1)
    return [first * growth**i for i in range(attempts)]


def join(rv: Rendezvous) -> Peers:
    """Meet the other ranks; raises InitError naming the store address and interface."""
    if dist.is_initialized():  # one instance per process: its group is the default group
        raise InitError("this process already belongs to a process group")
    with _socket_interface(rv.ifname):
        return _join(rv)


@contextlib.contextmanager
def _socket_interface(ifname: str | None) -> Iterator[None]:
    """gloo and NCCL read their interface from the environment when a group is created; set
    it for that, and leave the process's environment (and its children's) as it was."""
    names = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    saved = {name: os.environ.get(name) for name in names}
    if ifname:
        os.environ.update(dict.fromkeys(names, ifname))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _join(rv: Rendezvous) -> Peers:
    deadline = time.monotonic() + rv.window_s
    tries = try_timeouts(rv.attempts, rv.window_s)
    last_error, number, reached_store = "no try was made", 0, False
    for number, wait_s in enumerate(tries, start=1):
        started = time.monotonic()
        wait_s = min(wait_s, max(deadline - started, 0.1))
        store = None
        try:
            store = _open_store(rv, wait_s)
            reached_store = True
            meeting_s = max(deadline - time.monotonic(), MIN_MEETING_S)
            store.set_timeout(timedelta(seconds=meeting_s))
            dist.init_process_group(
                rv.backend,
                store=store,
                rank=rv.rank,
                world_size=rv.world_size,
                timeout=timedelta(seconds=meeting_s),
            )
            group = dist.new_group(
                list(range(rv.world_size)), timeout=timedelta(seconds=rv.step_timeout_s)
            )
            store.set_timeout(timedelta(seconds=rv.step_timeout_s))
            return Peers(rv, store, group)
        except Exception as exc:  # connection refused, timeouts, address in use: try again
            last_error = _short(exc)
            log.info("rank %d: try %d of %d failed: %s", rv.rank, number, len(tries), last_error)
            if dist.is_initialized():
                dist.destroy_process_group()
            del store  # rank 0: close the listening store before binding it again
        if time.monotonic() >= deadline:
            break
        time.sleep(max(0.0, wait_s - (time.monotonic() - started)))
    if reached_store:
        what = f"did not meet the other ranks at the store {rv.store_address}"
    elif rv.rank == 0:
        what = f"could not host the store at {rv.store_address}"
    else:
        what = f"could not reach rank 0's store at {rv.store_address}"
    tries_made = f"{number} {'try' if number == 1 else 'tries'}"
    raise InitError(
        f"rank {rv.rank} of {rv.world_size} {what} via {rv.interface}: {tries_made} over "
        f"{rv.window_s:.0f} s; last error: {last_error}"
    )


def _open_store(rv: Rendezvous, wait_s: float) -> dist.TCPStore:
    listen_fd = _listen(rv.store_host, rv.store_port) if rv.rank == 0 else None
    try:
        return dist.TCPStore(
            rv.store_host,
            rv.store_port,
            rv.world_size,
            is_master=rv.rank == 0,
            timeout=timedelta(seconds=wait_s),
            wait_for_workers=False,
            master_listen_fd=listen_fd,
        )
    except Exception:
        if listen_fd is not None:  # the store owns the socket once made; not if it failed
            with contextlib.suppress(OSError):
                os.close(listen_fd)
        raise


def _listen(host: str, port: int) -> int | None:
    """A socket listening on the store address only (TCPStore alone listens on every
    interface), as a file descriptor the store takes over; None where the address is not this
    machine's (behind NAT): then the store listens everywhere, as torch does by default."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRNOTAVAIL:
            raise  # e.g. the port in use: this try fails, the next may not
        log.warning("store address %s is not on this machine: its store listens on all", host)
        return None
    return sock.detach()


def _short(exc: BaseException) -> str:
    """The first line of a torch/gloo error without its source-location prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0]


class Peers:
    """This rank's view of its instance: rank-addressed calls that fail with PeerLostError."""

    def __init__(self, rv: Rendezvous, store: dist.TCPStore, group: dist.ProcessGroup) -> None:
        self.rendezvous = rv
        self.rank, self.world_size = rv.rank, rv.world_size
        self.store = store
        self.group = group
        # gloo moves CPU tensors; NCCL moves tensors on this rank's current GPU.
        self.device = torch.device("cpu")
        if rv.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        try:
            dist.send(tensor, dst, group=self.group)
        except RuntimeError as exc:
            raise PeerLostError(f"sending to rank {dst} failed: {_short(exc)}") from exc

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        try:
            dist.recv(tensor, src, group=self.group)
        except RuntimeError as exc:
            raise PeerLostError(f"receiving from rank {src} failed: {_short(exc)}") from exc

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        try:
            dist.broadcast(tensor, src, group=self.group)
        except RuntimeError as exc:
            raise PeerLostError(f"broadcast from rank {src} failed: {_short(exc)}") from exc

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """In-place sum over the ranks (the tensor-parallel reduce hook)."""
        try:
            dist.all_reduce(tensor, group=self.group)
        except RuntimeError as exc:
            raise PeerLostError(f"all-reduce failed: {_short(exc)}") from exc

    # -- the loading barrier, through rank 0's store ------------------------------------------

    def wait_until_all_loaded(self, timeout_s: float) -> None:
        """Announce that this rank holds its shard and wait until every rank does, or one
        reports a failure. Loading can take minutes, longer than a step may."""
        keys = [LOADED_KEY.format(rank=r) for r in range(self.world_size)]
        deadline = time.monotonic() + timeout_s
        try:
            self.store.set(keys[self.rank], "1")
            while not self.store.check(keys):
                if self.store.check([FAILED_KEY]):
                    raise PeerLostError(self.store.get(FAILED_KEY).decode())
                if time.monotonic() > deadline:
                    missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
                    raise PeerLostError(
                        f"rank(s) {missing} did not finish loading within {timeout_s:.0f} s"
                    )
                time.sleep(0.1)
        except PeerLostError:
            raise
        except Exception as exc:  # the store is rank 0's: rank 0 is gone
            raise PeerLostError(
                f"lost rank 0's store at {self.rendezvous.store_address}: {_short(exc)}"
            ) from exc

    def report_failure(self, reason: str) -> None:
        """Tell the other ranks (waiting in wait_until_all_loaded) why this one gave up."""
        try:
            self.store.set(FAILED_KEY, f"rank {self.rank} failed: {reason}")
        except Exception:  # the store is gone too: the others find out on their own
            pass

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
