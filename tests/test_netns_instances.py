"""Two hosts with a fast cable (veth) and a slow one (40 ms RTT through the TUN wire).

Seed 002 in a lab: both paths work, only measurement tells them apart. Placement must put the
store and the pipeline's ranks on the fast path, the instance must serve, and `shoal doctor`
must say which path each hop uses and what else was measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netns import Lab, Namespace, require_netns
from waiting import wait_for

pytestmark = pytest.mark.timeout(300)

PORT = 52415
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
A_FAST, B_FAST = "10.232.1.1", "10.232.1.2"  # veth
A_SLOW, B_SLOW = "10.240.9.1", "10.240.9.2"  # TUN wire, 40 ms RTT


def curl(
    ns: Namespace, path: str, body: Any = None, method: str = "GET", timeout: float = 5
) -> tuple[int, Any]:
    """The node's API from inside its namespace (the test process lives outside)."""
    args = [
        "curl",
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--max-time",
        str(timeout),
        "-X",
        method,
        f"http://127.0.0.1:{PORT}{path}",
    ]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = ns.run(*args, check=False)
    text, _, code = out.stdout.rpartition("\n")
    try:
        return int(code or 0), json.loads(text) if text else None
    except ValueError:
        return int(code or 0), text


@contextlib.contextmanager
def fast_and_slow() -> Iterator[tuple[Lab, Namespace, Namespace]]:
    """Hosts a and b joined by a veth cable (fast) and a TUN wire with 40 ms RTT (slow)."""
    require_netns()
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.cable(a, "eth1", f"{A_FAST}/24", b, "eth1", f"{B_FAST}/24")
        lab.slow_cable(a, "slow0", f"{A_SLOW}/30", b, "slow0", f"{B_SLOW}/30", rtt_ms=40.0)
        yield lab, a, b


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, Namespace, Namespace, Path]]:
    with fast_and_slow() as (lab, a, b):
        yield lab, a, b, tmp_path


def start_node(
    lab: Lab, ns: Namespace, name: str, home: Path, peers: list[str], *extra: str
) -> subprocess.Popen:
    env = {**os.environ, "SHOAL_HOME": str(home / name), "SHOAL_TORCH_THREADS": "1"}
    args = [
        sys.executable, "-m", "shoal.cli", "run", "--model", "none", "--api-port", str(PORT),
        "--discovery-interfaces", "none", "--peers", ",".join(f"{p}:{PORT}" for p in peers),
        "--node-name", name, "--suspect-after", "1.5", "--gone-after", "3", *extra,
    ]  # fmt: skip
    return lab.start(ns, args, env, str(home / f"{name}.log"))


def measured_both(ns: Namespace) -> bool:
    """Both cables measured from this node, so placement compares facts, not guesses."""
    code, doc = curl(ns, "/cluster/links")
    if code != 200:
        return False
    hosts = {
        r["to_addr"].split(":")[0]
        for r in doc["links"]
        if r["direction"] == "outbound" and r["recent"] and r["rtt_ms_ewma"] is not None
    }
    return bool(hosts & {A_FAST, B_FAST}) and bool(hosts & {A_SLOW, B_SLOW})


def logs(home: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(home.glob("*.log"))
    )


def test_placement_takes_the_fast_path_and_doctor_says_why(lab):
    lab, a, b, home = lab
    # each node is told both addresses of the other: both paths are candidates
    start_node(lab, a, "A", home, [B_SLOW, B_FAST])
    start_node(lab, b, "B", home, [A_SLOW, A_FAST])
    wait_for(
        "both cables measured from both nodes", lambda: measured_both(a) and measured_both(b), 60
    )

    query = f"/instance/placement?model_id={MODEL}&min_nodes=2&sharding=Pipeline"
    asked: list[tuple[int, Any]] = []

    def placeable() -> bool:  # the first probes of a node still starting up can answer late
        asked.append(curl(b, query))
        return asked[-1][0] == 200

    wait_for("a 2-node placement", placeable, 30, 0.5, detail=lambda: asked[-1])
    placement = asked[-1][1]
    ((meta, body),) = placement.items()
    ips = {ip["ip"] for hosts in body["hostsByNode"].values() for ip in hosts}
    assert ips <= {A_FAST, B_FAST}, body  # never the 40 ms path
    assert body["storeAddress"].split(":")[0] in (A_FAST, B_FAST)
    assert set(body["rankInterfaces"].values()) == {"eth1"}

    posted: list[tuple[int, Any]] = []

    def create() -> bool:  # 409 while the leader's copy of its peer's report lags a poll behind
        posted.append(curl(b, "/instance", {"instance": placement}, "POST", timeout=30))
        return posted[-1][0] == 200

    wait_for("the instance created", create, 30, 0.5)
    assert all(code in (200, 409) for code, _ in posted), posted
    iid = posted[-1][1]["instance_id"]

    def serving() -> bool:
        code, doc = curl(a, f"/instance/{iid}")
        statuses = [r["status"] for r in doc[meta]["runnerStatus"].values()] if code == 200 else []
        assert "failed" not in statuses, (doc, logs(home))
        return len(statuses) == 2 and all(s in ("ready", "running") for s in statuses)

    wait_for("both runners ready", serving, 180, every=1.0)

    chat = {
        "model": MODEL,
        "max_tokens": 16,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    for ns in (a, b):
        code, answer = curl(ns, "/v1/chat/completions", chat, "POST", timeout=120)
        assert code == 200, (answer, logs(home))
        assert "Paris" in answer["choices"][0]["message"]["content"]

    doctor = a.run(
        sys.executable,
        "-m",
        "shoal.cli",
        "doctor",
        "--api",
        f"http://127.0.0.1:{PORT}",
        check=False,
    )
    assert doctor.returncode == 0, doctor.stderr
    text = doctor.stdout
    assert "instances (1)" in text, text
    assert f"uses {B_FAST} (veth" in text or f"uses {A_FAST} (veth" in text, text
    assert f"measured and not chosen: {B_SLOW} (vpn" in text or (
        f"measured and not chosen: {A_SLOW} (vpn" in text
    ), text
