"""Joining an instance's MLX group: mx.distributed's `ring` (TCP) or `jaccl` (RDMA over
Thunderbolt 5), from the addresses and devices placement chose, never from a first IP.

The ranks first meet on shoal's rendezvous (engine.distributed.join: rank 0's TCPStore at its
chosen address, retried with backoff), which then carries every step's header. On it each ring
rank publishes where it listens (its chosen address and a free port), so all ranks build the
same host list; JACCL's coordinator is rank 0's chosen address with a port rank 0 publishes.

mlx-lm's `pipeline` gives the FIRST layers to the HIGHEST mlx rank, so shoal's rank r is mlx
rank world-1-r (and the host list is reversed): shoal's rank 0, the scheduler, keeps the first
layers as placement planned.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from shoal.engine.distributed import FAILED_KEY, InitError, Peers, try_timeouts
from shoal.schema.address import join_host_port
from shoal.schema.report import MLX_BACKENDS

log = logging.getLogger(__name__)

LISTEN_KEY = "shoal/mlx/listen/{rank}"  # a ring rank's host:port, or rank 0's coordinator


def mlx_rank(rank: int, world: int) -> int:
    return world - 1 - rank


def ring_hosts(listen: Sequence[str]) -> list[list[str]]:
    """MLX_HOSTFILE's content from each shoal rank's host:port (in shoal rank order)."""
    return [[address] for address in reversed(listen)]


def jaccl_devices(devices: Sequence[Sequence[str | None]]) -> list[list[str | None]]:
    """MLX_IBV_DEVICES's content, in mlx rank order, from shoal's [i][j] device matrix."""
    n = len(devices)
    order = [mlx_rank(r, n) for r in range(n)]  # mlx rank m is shoal rank order[m]
    return [[devices[order[m]][order[k]] for k in range(n)] for m in range(n)]


def pipeline_split(start: int, end: int, num_layers: int, rank: int, world: int) -> list[int]:
    """A split for mlx-lm's `pipeline(group, split)` (layer counts per mlx rank) that gives this
    rank exactly layers [start, end). Only this rank's entry and the sums around it matter to
    it; the other entries are any positive counts that add up."""
    m = mlx_rank(rank, world)
    after, before = world - 1 - m, m  # mlx ranks holding earlier / later layers
    if end <= start or start < after or num_layers - end < before:
        raise ValueError(
            f"rank {rank} of {world} cannot hold layers [{start}, {end}) of {num_layers}: "
            "every rank holds at least one layer"
        )
    split = [1] * world
    split[m] = end - start
    if after:
        split[m + 1] = start - (after - 1)
    if before:
        split[0] = num_layers - end - (before - 1)
    return split


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def publish_and_gather(
    peers: Peers, mine: str | None, ranks: Sequence[int], timeout_s: float = 60.0
) -> list[str]:
    """Put this rank's address in rank 0's store, then read those of `ranks`; a rank that
    failed meanwhile (its reason in the store) ends the wait at once."""
    if mine is not None:
        peers.store.set(LISTEN_KEY.format(rank=peers.rank), mine)
    keys = [LISTEN_KEY.format(rank=r) for r in ranks]
    deadline = time.monotonic() + timeout_s
    while not peers.store.check(keys):
        if peers.store.check([FAILED_KEY]):
            raise InitError(peers.store.get(FAILED_KEY).decode())
        if time.monotonic() > deadline:
            raise InitError(f"rank {peers.rank}: the other ranks did not say where they listen")
        time.sleep(0.05)
    return [peers.store.get(k).decode() for k in keys]


def listen_address(host: str, rank: int, ifname: str | None) -> str:
    """host:port with a free port on the address placement chose for this rank."""
    try:
        return join_host_port(host, free_port(host))
    except OSError as exc:
        via = f"interface {ifname}" if ifname else "any interface"
        raise InitError(
            f"rank {rank} cannot listen on {host}, the address placed for it ({via}): "
            f"{exc.strerror or exc}"
        ) from None


def group_env(
    backend: str,
    rank: int,
    world: int,
    listen: Sequence[str],
    devices: Sequence[Sequence[str | None]],
    directory: str,
) -> dict[str, str]:
    """The environment mx.distributed.init reads, its files written to `directory`."""
    env = {"MLX_RANK": str(mlx_rank(rank, world))}
    if backend == "ring":
        content, name = ring_hosts(listen), "MLX_HOSTFILE"
    else:
        content, name = jaccl_devices(devices), "MLX_IBV_DEVICES"
        env["MLX_JACCL_COORDINATOR"] = listen[0]
    path = os.path.join(directory, f"{name.lower()}.json")
    with open(path, "w") as f:
        json.dump(content, f)
    env[name] = path
    return env


def join_group(
    peers: Peers,
    backend: str,
    hosts: Sequence[str],
    devices: Sequence[Sequence[str | None]] = (),
    attempts: int = 4,
    window_s: float = 30.0,
    ifname: str | None = None,
) -> Any:
    """This rank's mx.distributed group; InitError names the addresses and the backend."""
    import mlx.core as mx

    rank, world = peers.rank, peers.world_size
    if backend not in MLX_BACKENDS:
        raise InitError(f"the MLX engine runs over ring or jaccl, not {backend!r}")
    if len(hosts) != world:
        raise InitError(f"rank {rank}: {len(hosts)} rank addresses for {world} ranks")
    if backend == "jaccl" and (len(devices) != world or any(len(r) != world for r in devices)):
        raise InitError(f"rank {rank}: jaccl needs a {world}x{world} RDMA device matrix")
    host = hosts[rank]
    if backend == "ring":
        listen = publish_and_gather(peers, listen_address(host, rank, ifname), range(world))
    else:
        coordinator = listen_address(host, rank, ifname) if rank == 0 else None
        listen = publish_and_gather(peers, coordinator, [0])
    what = ", ".join(listen)
    last_error = "no try was made"
    with tempfile.TemporaryDirectory(prefix="shoal-mlx-") as directory:
        os.environ.update(group_env(backend, rank, world, listen, devices, directory))
        for number, wait_s in enumerate(try_timeouts(attempts, window_s), start=1):
            started = time.monotonic()
            try:
                group = mx.distributed.init(strict=True, backend=backend)
                if group.size() != world:
                    raise RuntimeError(f"the group has {group.size()} ranks, not {world}")
                # the first collective: every rank is connected before any weights are read
                mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
                log.info("rank %d joined the %s group over %s", rank, backend, what)
                return group
            except Exception as exc:  # a peer not listening yet, a port taken: try again
                last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                log.info("rank %d: %s try %d failed: %s", rank, backend, number, last_error)
            if number < attempts:  # after the last try, say so at once
                time.sleep(max(0.0, wait_s - (time.monotonic() - started)))
    raise InitError(
        f"rank {rank} of {world} could not join the mlx {backend} group over {what} "
        f"(listening on {host} via {f'interface {ifname}' if ifname else 'its route'}): "
        f"{attempts} tries over {window_s:.0f} s; last error: {last_error}"
    )
