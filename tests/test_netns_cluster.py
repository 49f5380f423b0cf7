"""Two hosts in network namespaces, joined by two cables on different subnets.

Proves on real network paths: mDNS restricted to the cables finds the peer; both paths are
measured in both directions; a path cut in one direction shows as one-way on both sides, not
as missing; a node of another namespace never merges.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netns import Lab, Namespace, require_netns
from waiting import wait_for

pytestmark = pytest.mark.timeout(180)

PORT = 52415
A1, B1 = "10.231.1.1", "10.231.1.2"  # cable 1
A2, B2 = "10.231.2.1", "10.231.2.2"  # cable 2


def get(ns: Namespace, path: str, port: int = PORT) -> dict[str, Any] | None:
    """GET a node's API from inside its namespace (the test process lives outside)."""
    out = ns.run("curl", "-sf", "--max-time", "2", f"http://127.0.0.1:{port}{path}", check=False)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, Namespace, Namespace, Path]]:
    require_netns()
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.cable(a, "eth1", f"{A1}/24", b, "eth1", f"{B1}/24")
        lab.cable(a, "eth2", f"{A2}/24", b, "eth2", f"{B2}/24")
        yield lab, a, b, tmp_path


def start_node(
    lab: Lab, ns: Namespace, name: str, home: Path, namespace: str, port: int = PORT, *extra: str
) -> None:
    env = {**os.environ, "SHOAL_HOME": str(home / name)}
    args = [
        sys.executable, "-m", "shoal.cli", "run", "--model", "none", "--api-port", str(port),
        "--discovery-interfaces", "eth1,eth2", "--namespace", namespace, "--node-name", name,
        "--suspect-after", "1.5", "--gone-after", "3", *extra,
    ]  # fmt: skip
    lab.start(ns, args, env, str(home / f"{name}.log"))


def names(doc: dict[str, Any] | None) -> dict[str, str]:
    return {n["name"]: n["status"] for n in doc["nodes"]} if doc else {}


def both_alive(ns: Namespace) -> bool:
    return names(get(ns, "/cluster/nodes")) == {"A": "alive", "B": "alive"}


def links(ns: Namespace) -> list[dict[str, Any]]:
    doc = get(ns, "/cluster/links")
    return doc["links"] if doc else []


def measured(rows: list[dict[str, Any]], src: str, dst: str) -> bool:
    """An outbound record of the path src -> dst with a recent RTT."""
    return any(
        r["direction"] == "outbound" and r["recent"] and r["rtt_ms_ewma"] is not None
        and (r["from_addr"] or "").split(":")[0] == src and r["to_addr"].split(":")[0] == dst
        for r in rows
    )  # fmt: skip


def one_way(rows: list[dict[str, Any]], x: str, y: str) -> bool:
    """Every record of the address pair x <-> y says one-way, and at least one exists."""
    pair = [r for r in rows if {(r["from_addr"] or "").split(":")[0], r["to_addr"].split(":")[0]}
            == {x, y}]  # fmt: skip
    return bool(pair) and all(r["one_way"] for r in pair)


def test_mdns_finds_peer_measures_both_paths_and_shows_one_way_cut(lab):
    lab, a, b, home = lab
    namespace = f"lab-{uuid.uuid4().hex[:8]}"
    start_node(lab, a, "A", home, namespace)
    start_node(lab, b, "B", home, namespace)

    # discovery alone (no --peers): each sees the other alive
    wait_for("mDNS discovery", lambda: both_alive(a) and both_alive(b), 60)

    # both cables measured, in both directions, and each side holds both records
    def all_paths_measured() -> bool:
        return all(
            measured(rows, src, dst)
            for rows in (links(a), links(b))
            for src, dst in ((A1, B1), (A2, B2), (B1, A1), (B2, A2))
        )

    wait_for("both paths measured both ways", all_paths_measured, 20)
    assert not one_way(links(a), A1, B1)

    # cut cable 1 in one direction: B drops what A sends on it
    b.nft(
        f"table inet shoaltest {{\n chain input {{\n  type filter hook input priority 0;\n"
        f"  ip saddr {A1} drop\n }}\n}}\n"
    )
    wait_for("the cut path shown one-way on A", lambda: one_way(links(a), A1, B1), 30)
    wait_for("the cut path shown one-way on B", lambda: one_way(links(b), A1, B1), 30)
    # the other cable is untouched, and the nodes still see each other through it
    assert not one_way(links(a), A2, B2)
    assert both_alive(a)


def test_node_of_another_namespace_never_merges(lab):
    lab, a, b, home = lab
    namespace = f"lab-{uuid.uuid4().hex[:8]}"
    start_node(lab, a, "A", home, namespace)
    start_node(lab, b, "B", home, namespace)
    start_node(lab, b, "C", home, f"other-{namespace}", port=PORT + 1)
    wait_for("A and B meet", lambda: both_alive(a), 60)
    wait_for("C is up", lambda: get(b, "/cluster/nodes", PORT + 1) is not None, 60)
    time.sleep(4)  # several announcement and poll rounds
    assert set(names(get(a, "/cluster/nodes"))) == {"A", "B"}
    assert set(names(get(b, "/cluster/nodes", PORT + 1))) == {"C"}


def test_only_nodes_with_the_cluster_secret_merge(lab):
    lab, a, b, home = lab
    namespace, secret = f"lab-{uuid.uuid4().hex[:8]}", f"secret-{uuid.uuid4().hex}"
    start_node(lab, a, "A", home, namespace, PORT, "--cluster-secret", secret)
    start_node(lab, b, "B", home, namespace, PORT, "--cluster-secret", secret)
    start_node(lab, b, "C", home, namespace, PORT + 1, "--cluster-secret", "another")
    start_node(lab, b, "D", home, namespace, PORT + 2)  # no secret at all
    wait_for("A and B meet", lambda: both_alive(a) and both_alive(b), 60)

    def refused_on_a() -> dict[str, str]:
        rows = (get(a, "/state") or {}).get("refused", [])
        return {r["name"]: r["reason"] for r in rows}

    def c_and_d_refused() -> bool:
        reasons = " | ".join(refused_on_a().values())
        return "bad signature" in reasons and "not signed" in reasons

    wait_for("C and D refused on A", c_and_d_refused, 20, detail=refused_on_a)
    assert set(names(get(a, "/cluster/nodes"))) == {"A", "B"}
    assert set(names(get(b, "/cluster/nodes"))) == {"A", "B"}
    assert set(names(get(b, "/cluster/nodes", PORT + 1))) == {"C"}
    assert secret not in json.dumps(get(a, "/state")) + json.dumps(get(b, "/cluster/nodes"))
