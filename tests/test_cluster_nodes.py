"""Several real nodes on 127.0.0.x loopback addresses: one view, one leader, failures seen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from waiting import wait_for

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
            response = httpx.get(f"http://{host}:{PORT}/cluster/nodes", timeout=2)
        except httpx.HTTPError:
            return None
        # 503 while a starting node's cluster service is not up yet
        return response.json() if response.status_code == 200 else None

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

    def paths_measured() -> bool:
        doc = httpx.get(f"http://{HOSTS[0]}:{PORT}/cluster/links", timeout=2).json()
        return sum(r["recent"] for r in doc["links"]) >= 2

    wait_for("both paths probed", paths_measured, 10)
    doctor = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "doctor", "--api", f"{HOSTS[0]}:{PORT}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert doctor.returncode == 0, doctor.stderr
    assert f"nodes (2), leader {HOSTS[1]}" in doctor.stdout
    assert "loopback" in doctor.stdout and "drift: none" in doctor.stdout

    cluster.procs[HOSTS[1]].send_signal(signal.SIGTERM)  # goodbye, not silence
    wait_for(
        "the stopped node marked gone",
        lambda: statuses(cluster.nodes(HOSTS[0])).get(HOSTS[1]) == "gone",
        5,
    )
    gone = next(n for n in cluster.nodes(HOSTS[0])["nodes"] if n["name"] == HOSTS[1])
    assert gone["gone_reason"] in ("said goodbye", "shutting down")  # not timed out by silence
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


class _BadPeer(BaseHTTPRequestHandler):
    """A 'peer' whose reports are garbage, oversized, or of the wrong shape."""

    bodies = [b"{not json", b"x" * 2_000_000, b'{"node_id": 5, "seq": "many"}']
    served = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = self.bodies[_BadPeer.served % len(self.bodies)]
        _BadPeer.served += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_malformed_and_oversized_reports_are_dropped_and_logged(cluster: Cluster):
    bad = ThreadingHTTPServer(("127.0.0.5", PORT), _BadPeer)
    threading.Thread(target=bad.serve_forever, daemon=True).start()
    try:
        cluster.start(HOSTS[0], "--peers", f"127.0.0.5:{PORT}")
        wait_for("the node answering", lambda: cluster.nodes(HOSTS[0]) is not None, 60)
        wait_for("every bad body tried", lambda: _BadPeer.served >= 6, 15)
        assert set(statuses(cluster.nodes(HOSTS[0]))) == {HOSTS[0]}  # still up, still alone
        log = (cluster.root / f"{HOSTS[0]}.log").read_text()
        assert "dropped a malformed report" in log and "dropped an oversized report" in log
    finally:
        bad.shutdown()
        bad.server_close()


def test_unchanged_report_polls_as_not_modified(cluster: Cluster):
    cluster.start(HOSTS[0])
    wait_for("the node answering", lambda: cluster.nodes(HOSTS[0]) is not None, 60)
    url = f"http://{HOSTS[0]}:{PORT}/cluster/report"
    first = httpx.get(url, timeout=2)
    report = first.json()
    assert report["node_id"] == httpx.get(f"http://{HOSTS[0]}:{PORT}/node_id").json()
    assert first.headers["etag"] == f'"{report["boot_id"]}-{report["seq"]}"'
    assert httpx.get(url, headers={"If-None-Match": '"stale-0"'}, timeout=2).status_code == 200
    again = httpx.get(url, headers={"If-None-Match": first.headers["etag"]}, timeout=2)
    # the report changes only when its content does: 304 now, or 200 with a higher seq
    assert again.status_code == 304 or again.json()["seq"] > report["seq"]


SECRET = "loopback-cluster-secret"


def _refusals(host: str) -> list[dict[str, Any]]:
    return httpx.get(f"http://{host}:{PORT}/state", timeout=2).json()["refused"]


def _refused(host: str, name: str, words: str) -> bool:
    return any(name in r["name"] and words in r["reason"] for r in _refusals(host))


def test_nodes_with_the_secret_meet_and_refuse_the_others(cluster: Cluster, tmp_path: Path):
    from shoal.web.signing import sign_request  # the test holds the secret: it signs as a peer

    secret_file = tmp_path / "secret"
    secret_file.write_text(f"  {SECRET}\n")  # stripped
    a, b, c = HOSTS
    cluster.start(a, "--cluster-secret", SECRET)
    cluster.start(b, "--cluster-secret-file", str(secret_file))
    cluster.start(c, "--cluster-secret", "another-secret")
    wait_for("three nodes answering", lambda: all(cluster.nodes(h) for h in HOSTS), 60)
    wait_for("A and B meet", lambda: agree(cluster, [a, b], {a, b}), 10)
    wait_for("C refused by A", lambda: _refused(a, c, "refused our poll with HTTP 401"), 10)
    assert any("bad signature" in r["reason"] for r in _refusals(a))
    wait_for("A refused by C", lambda: _refused(c, a, "refused our poll"), 10)
    assert set(statuses(cluster.nodes(a))) == {a, b} and set(statuses(cluster.nodes(c))) == {c}

    # a report poll signed with the secret is answered once; its replay is refused
    url = f"http://{a}:{PORT}/cluster/report"
    headers = sign_request(SECRET.encode(), "GET", "/cluster/report", b"", "test", time.time())
    assert httpx.get(url, headers=headers, timeout=2).status_code == 200
    replayed = httpx.get(url, headers=headers, timeout=2)
    assert replayed.status_code == 401
    assert replayed.json()["error"]["code"] == "peer_replayed"
    unsigned = httpx.get(url, timeout=2)
    assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "peer_unsigned"

    # a plan change at the follower is forwarded, signed, and the leader's signed answer passes
    doc = cluster.nodes(a)
    follower = next(n["name"] for n in doc["nodes"] if n["node_id"] != doc["leader"])
    forwarded = httpx.delete(f"http://{follower}:{PORT}/instance/no-such", timeout=10)
    assert forwarded.status_code == 404, forwarded.text
    assert forwarded.json()["error"]["code"] == "instance_not_found"

    # fan-out answers are signed and checked: B's history and manifest arrive
    history = httpx.get(f"http://{a}:{PORT}/cluster/history", timeout=10).json()
    assert history["unreachable"] == [], history
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bundled model: every node holds it
    manifests = httpx.get(f"http://{a}:{PORT}/cluster/manifests/{model}", timeout=30).json()
    assert {e["name"] for e in manifests["nodes"] if e.get("manifest")} == {a, b}, manifests

    # C again without any secret: its unsigned report never merges, and says why
    cluster.procs[c].terminate()
    cluster.procs[c].wait(timeout=15)
    cluster.start(c)
    wait_for("C answering again", lambda: cluster.nodes(c) is not None, 60)
    wait_for("C refused as unsigned", lambda: _refused(a, c, "not signed"), 10)
    time.sleep(1.5)  # more poll rounds: still refused, never merged
    assert set(statuses(cluster.nodes(a))) == {a, b}
    assert set(statuses(cluster.nodes(b))) == {a, b}

    # the secret is nowhere: not in the documents, not in any node's log
    for host in (a, b):
        for path in ("/state", "/cluster/nodes", "/cluster/links"):
            assert SECRET not in httpx.get(f"http://{host}:{PORT}{path}", timeout=2).text
    for host in HOSTS:
        assert SECRET not in (cluster.root / f"{host}.log").read_text(errors="replace")
