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
    lab: Lab, ns: Namespace, name: str, home: Path, namespace: str, port: int = PORT
) -> None:
    env = {**os.environ, "SHOAL_HOME": str(home / name)}
    args = [
        sys.executable, "-m", "shoal.cli", "run", "--model", "none", "--api-port", str(port),
        "--discovery-interfaces", "eth1,eth2", "--namespace", namespace, "--node-name", name,
        "--suspect-after", "1.5", "--gone-after", "3",
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
