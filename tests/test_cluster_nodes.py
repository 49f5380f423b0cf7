"""Several real nodes on 127.0.0.x loopback addresses: one view, one leader, failures seen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

PORT = 52515
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, host: str, *extra: str) -> None:
        peers = ",".join(f"{h}:{PORT}" for h in HOSTS if h != host)
        env = {**os.environ, "SHOAL_HOME": str(self.root / host)}
        log = open(self.root / f"{host}.log", "ab")  # noqa: SIM115 - lives as long as the node
        self.procs[host] = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "run", "--model", "none", "--host", host,
             "--api-port", str(PORT), "--peers", peers, "--discovery-interfaces", "none",
             "--node-name", host, "--suspect-after", "1.5", "--gone-after", "3", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def kill(self, host: str) -> None:
        self.procs[host].send_signal(signal.SIGKILL)
        self.procs[host].wait(timeout=10)

    def nodes(self, host: str) -> dict[str, Any] | None:
        try:
            return httpx.get(f"http://{host}:{PORT}/cluster/nodes", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until check() holds; fails the test with `what` after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout} s")


def statuses(doc: dict[str, Any] | None) -> dict[str, str]:
    return {n["name"]: n["status"] for n in doc["nodes"]} if doc else {}


def agree(cluster: Cluster, hosts: list[str], expect_alive: set[str]) -> bool:
    docs = [cluster.nodes(h) for h in hosts]
    if any(d is None for d in docs):
        return False
    views = [{name for name, st in statuses(d).items() if st == "alive"} for d in docs]
    leaders = {d["leader"] for d in docs}
    return all(v == expect_alive for v in views) and len(leaders) == 1


def test_three_nodes_agree_then_see_a_kill_and_a_rejoin(cluster: Cluster):
    for host in HOSTS:
        cluster.start(host)
    # each node is up (its API answers) before the 5 s convergence clock starts
    wait_for("all nodes answering", lambda: all(cluster.nodes(h) for h in HOSTS), 60)
    wait_for("a converged view and leader", lambda: agree(cluster, HOSTS, set(HOSTS)), 5)
    ids = {n["name"]: n["node_id"] for n in cluster.nodes(HOSTS[0])["nodes"]}

    victim, survivors = HOSTS[2], HOSTS[:2]
    cluster.kill(victim)
    wait_for(
        "the killed node marked gone",
        lambda: all(statuses(cluster.nodes(h)).get(victim) == "gone" for h in survivors),
        5,
    )
    assert agree(cluster, survivors, set(survivors))

    cluster.start(victim)  # same SHOAL_HOME: same node id
    wait_for("the restarted node rejoining", lambda: agree(cluster, HOSTS, set(HOSTS)), 30)
    after = {n["name"]: n["node_id"] for n in cluster.nodes(HOSTS[0])["nodes"]}
    assert after == ids


def test_leader_is_the_pinned_node_and_graceful_stop_is_seen_at_once(cluster: Cluster):
    cluster.start(HOSTS[0])
    cluster.start(HOSTS[1], "--leader")
    wait_for("two nodes answering", lambda: all(cluster.nodes(h) for h in HOSTS[:2]), 60)
    wait_for("a converged view", lambda: agree(cluster, HOSTS[:2], set(HOSTS[:2])), 5)
    doc = cluster.nodes(HOSTS[0])
    pinned = next(n["node_id"] for n in doc["nodes"] if n["name"] == HOSTS[1])
    assert doc["leader"] == pinned

    cluster.procs[HOSTS[1]].send_signal(signal.SIGTERM)  # goodbye, not silence
    seconds = wait_for(
        "the stopped node marked gone",
        lambda: statuses(cluster.nodes(HOSTS[0])).get(HOSTS[1]) == "gone",
        5,
    )
    assert seconds < 2.5  # well before --gone-after 3 s of silence could have done it
    assert cluster.procs[HOSTS[1]].wait(timeout=15) == 0


def test_node_of_another_namespace_never_joins(cluster: Cluster):
    cluster.start(HOSTS[0])
    cluster.start(HOSTS[1], "--namespace", "other")
    wait_for("two nodes answering", lambda: all(cluster.nodes(h) for h in HOSTS[:2]), 60)
    time.sleep(3)  # several poll rounds
    for host in HOSTS[:2]:
        assert set(statuses(cluster.nodes(host))) == {host}
    state = httpx.get(f"http://{HOSTS[0]}:{PORT}/state", timeout=2).json()
    assert any("namespace" in r["reason"] for r in state["refused"])
