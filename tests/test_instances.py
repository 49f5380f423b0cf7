"""Two real nodes on loopback place the bundled model across both and serve it from either.

Node a listens on 127.0.0.1 (the runbook's snippets talk to 127.0.0.1), node b on 127.0.0.2.
The instance's ranks are real runner subprocesses meeting over gloo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from documents import undeclared
from openai import OpenAI

from shoal.schema.documents import StateDocument

from waiting import wait_for

pytestmark = pytest.mark.timeout(300)

PORT = 52715
HOSTS = {"a": "127.0.0.1", "b": "127.0.0.2"}
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
RUNBOOK = Path(__file__).parent / "fixtures" / "runbook"
BLOCKED = "org/risky"


class Pair:
    def __init__(
        self,
        root: Path,
        port: int = PORT,
        extra: tuple[str, ...] = (),
        env: dict | None = None,
        hosts: dict[str, str] | None = None,
    ) -> None:
        self.hosts = hosts or HOSTS
        self.root = root
        self.port = port
        self.extra = extra
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        host = self.hosts[name]
        peers = ",".join(f"{h}:{self.port}" for n, h in self.hosts.items() if n != name)
        env = {**os.environ, "SHOAL_HOME": str(self.root / name), "SHOAL_TORCH_THREADS": "1",
               **self.env}  # fmt: skip
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the node
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "run", "--host", host,
             "--api-port", str(self.port), "--peers", peers, "--discovery-interfaces", "none",
             "--node-name", name, "--suspect-after", "1.5", "--gone-after", "3",
             *(self.extra or ("--model", "none"))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def start_both(self, timeout: float) -> None:
        """Both nodes, alive in each other's view with the paths between them measured: a
        2-node placement answers on each."""
        for name in self.hosts:
            self.start(name)
        query = f"/instance/placement?model_id={MODEL}&min_nodes={len(self.hosts)}"
        wait_for(
            f"a {len(self.hosts)}-node placement on every node",
            lambda: all(self.json(n, query) is not None for n in self.hosts),
            timeout=timeout,
            detail=self.log,
        )

    def url(self, name: str, path: str) -> str:
        return f"http://{self.hosts[name]}:{self.port}{path}"

    def get(self, name: str, path: str) -> httpx.Response:
        return httpx.get(self.url(name, path), timeout=5)

    def json(self, name: str, path: str) -> dict[str, Any] | None:
        try:
            response = self.get(name, path)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def log(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = Pair(tmp_path_factory.mktemp("pair"))
    cards = p.root / "a" / "config" / "cards"  # node a's card blocks a model (b has none)
    cards.mkdir(parents=True)
    (cards / "risky.toml").write_text(
        f'model_id = "{BLOCKED}"\nstatus = "blocked"\nstatus_note = "drifts between nodes"\n'
    )
    try:
        p.start_both(timeout=60)
        yield p
    finally:
        p.stop()


def runner_statuses(pair: Pair, name: str) -> dict[str, str]:
    state = pair.json(name, "/state") or {}
    return {rid: r["status"] for rid, r in state.get("runners", {}).items()}


def test_nodes_report_the_engines_and_backends_they_can_run(pair: Pair) -> None:
    doc = pair.json("a", "/cluster/nodes")
    assert doc is not None and len(doc["nodes"]) == 2
    mlx = importlib.util.find_spec("mlx") is not None
    for node in doc["nodes"]:
        assert "torch:cpu" in node["engines"] and "gloo" in node["backends"], node
        assert ("mlx:cpu" in node["engines"] and "ring" in node["backends"]) == mlx, node
        (held,) = [m for m in node["models"] if m["model_id"] == MODEL]
        assert held["arch"] == "llama" and held["backends"] == node["backends"], held
        assert held["mlx_layouts"] == (["pipeline", "tensor"] if mlx else []), held


def test_models_downloaded_lists_what_this_node_holds(pair: Pair) -> None:
    doc = pair.json("b", "/v1/models?status=downloaded")
    assert doc is not None and MODEL in [m["id"] for m in doc["data"]]
    bad = pair.get("b", "/v1/models?status=everything")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("model_id=nobody/holds-this&min_nodes=2", "no alive node holds nobody/holds-this"),
        (f"model_id={MODEL}&min_nodes=3", "needs >= 3 nodes"),
        # SmolLM2 has 9 heads and 3 kv heads: two-way tensor parallel cannot split them
        (f"model_id={MODEL}&min_nodes=2&sharding=Tensor", "not divisible by 2"),
        (f"model_id={MODEL}&instance_meta=MlxIbvInstance", "unknown instance_meta"),
        (f"model_id={MODEL}&sharding=Expert", "unknown sharding"),
    ],
)
def test_no_placement_says_why(pair: Pair, query: str, reason: str) -> None:
    response = pair.get("b", f"/instance/placement?{query}")
    assert response.status_code == 400
    assert reason in response.json()["error"]["message"]


def test_a_blocked_model_is_placed_only_with_the_override(pair: Pair) -> None:
    query = f"/instance/placement?model_id={BLOCKED}&min_nodes=1"
    refused = pair.get("a", query).json()["error"]["message"]
    assert "blocked by its model card (drifts between nodes)" in refused
    assert "allow_blocked=true" in refused
    # with the override the gate opens; nobody holds it, which is the next reason
    overridden = pair.get("a", query + "&allow_blocked=true").json()["error"]["message"]
    assert "blocked" not in overridden and f"no alive node holds {BLOCKED}" in overridden


def audit_cli(pair: Pair, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", "audit", *args, "--api", pair.url("b", "")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_audit_collects_every_nodes_manifest_through_the_api(pair: Pair) -> None:
    ok = audit_cli(pair, MODEL, "--hash")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS  parity (path, size, sha256): 1 files match on 2 node(s)" in ok.stdout
    assert ok.stdout.rstrip().endswith("RING_INPUT_READY")
    assert "\n  a " in ok.stdout and "\n  b " in ok.stdout

    # node a has the whole model in its store; node b's download stopped half way
    tiny = "org/tiny"
    for name, partial in (("a", False), ("b", True)):
        model_dir = pair.root / name / "data" / "models" / "org--tiny"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "tiny.gguf").write_bytes(b"GGUF" * (4 if partial else 8))
        if partial:
            (model_dir / "tiny.gguf.part").write_bytes(b"")
    bad = audit_cli(pair, tiny, "--expect-shards", "1")
    assert bad.returncode == 1
    assert "FAIL  no partial downloads: b: tiny.gguf.part" in bad.stdout
    assert "FAIL  parity (path, size): b: tiny.gguf is 16 bytes, others 32" in bad.stdout
    assert "RING_INPUT_READY" not in bad.stdout

    nowhere = audit_cli(pair, "org/absent", "--json")
    result = json.loads(nowhere.stdout)
    assert nowhere.returncode == 1 and not result["ready"]
    assert "a: model not on this node" in result["checks"][0]["detail"]


def test_audit_endpoint_runs_the_checks_over_every_nodes_manifest(pair: Pair) -> None:
    doc = pair.json("a", f"/cluster/audit/{MODEL}")  # sizes only: the CLI test hashes
    assert doc is not None and doc["model_id"] == MODEL and doc["ready"] is True, doc
    checks = {c["name"]: (c["ok"], c["detail"]) for c in doc["checks"]}
    assert checks["manifests from every node"] == (True, "2 node(s)")
    assert checks["parity (path, size)"] == (True, "1 files match on 2 node(s)")
    assert all(set(c) == {"name", "ok", "detail"} for c in doc["checks"])

    absent = pair.json("b", "/cluster/audit/org/absent")
    assert absent is not None and absent["ready"] is False and absent["model_id"] == "org/absent"
    (reachable,) = absent["checks"]  # no manifest anywhere: nothing else to check
    assert not reachable["ok"] and "a: model not on this node" in reachable["detail"]


def test_state_carries_models_paths_hints_and_membership(pair: Pair) -> None:
    state = pair.json("a", "/state")
    assert state is not None
    assert undeclared(StateDocument.model_validate(state)) == []  # its type declares it all
    ids = {n["name"]: n["node_id"] for n in state["nodes"]}
    assert state["hints"] == []  # no Thunderbolt on loopback
    assert isinstance(state["instance_paths"], dict)
    (row,) = [m for m in state["models"] if m["model_id"] == MODEL]
    assert set(row["holders"]) == set(ids.values()) and row["differ"] == []
    assert row["card"]["status"] == "active" and row["downloads"] == []
    joined = [e for e in state["events"] if e["kind"] == "node_joined"]
    assert any(e["node"] == ids["b"] and "node b (" in e["message"] for e in joined), joined
    assert sorted(state["topology"]["nodes"]) == sorted(ids.values())  # exo's: node ids
    for node in state["topology"]["nodes"]:  # the machine's label, in exo's nodeIdentities
        assert state["nodeIdentities"][node]["modelId"] not in ("", "unknown")


def test_a_refused_post_is_an_event_on_the_leader_and_a_preview_is_not(pair: Pair) -> None:
    response = pair.get("b", f"/instance/placement?model_id={MODEL}&min_nodes=2")
    assert response.status_code == 200, response.text
    ((meta, body),) = response.json().items()
    absent = "nobody/holds-this-either"
    assert pair.get("b", f"/instance/placement?model_id={absent}").status_code == 400
    posted = httpx.post(  # b forwards to the leader, whose answer comes back
        pair.url("b", "/instance"),
        json={"instance": {meta: {**body, "modelId": absent}}},
        timeout=30,
    )
    assert posted.status_code == 409, posted.text
    state = pair.json("b", "/state")
    assert state is not None
    leader = next(n["name"] for n in state["nodes"] if n["is_leader"])
    events = (pair.json(leader, "/state") or {}).get("events", [])
    refused = [e for e in events if e["kind"] == "refused" and e.get("model") == absent]
    assert len(refused) == 1, events  # the POST only, not the placement query
    assert "no longer fits the cluster" in refused[0]["message"]


def test_a_node_checks_reachability_only_of_cluster_addresses(pair: Pair) -> None:
    there = pair.json("a", f"/cluster/reach?host={HOSTS['b']}&port={pair.port}")
    assert there is not None and there["ok"] is True
    closed = pair.json("a", f"/cluster/reach?host={HOSTS['b']}&port=9")
    assert closed is not None and closed["ok"] is False and closed["error"]
    outside = pair.get("a", "/cluster/reach?host=192.0.2.1&port=80")
    assert outside.status_code == 400 and "not an address of a node" in outside.text


def test_history_merges_the_events_of_every_node(pair: Pair) -> None:
    a, b = pair.json("a", "/node_id"), pair.json("b", "/node_id")
    doc = pair.json("b", "/cluster/history")
    assert doc is not None and doc["unreachable"] == []
    joined = {(e["recorded_by"], e["node"]) for e in doc["events"] if e["kind"] == "node_joined"}
    assert {(a, b), (b, a)} <= joined, doc["events"]  # each saw the other join
    assert [e["at"] for e in doc["events"]] == sorted(e["at"] for e in doc["events"])
    bad = pair.get("a", "/cluster/history?limit=0")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "query.limit"


def test_previews_cover_every_choice_with_a_layout_or_a_reason(pair: Pair) -> None:
    doc = pair.json("a", f"/instance/previews?model_id={MODEL}")
    assert doc is not None
    previews = doc["previews"]
    assert len(previews) == 2 * 4 * 2  # sharding x meta x min_nodes 1..2
    for p in previews:
        assert (p["instance"] is None) != (p["error"] is None)
    two = {p["instance_meta"]: p for p in previews
           if p["min_nodes"] == 2 and p["sharding"] == "Pipeline"}  # fmt: skip
    assert two["GlooInstance"]["instance"]
    # these loopback nodes have no CUDA GPU: NCCL is refused, and says why
    assert "no CUDA GPU (the nccl backend needs one per rank)" in two["NcclInstance"]["error"]
    # the MLX engine's ring: SmolLM2 (a llama) as pipeline stages, not as 2 tensor shards
    assert two["MlxRingInstance"]["instance"], two["MlxRingInstance"]["error"]
    tensor = [p for p in previews if p["min_nodes"] == 2 and p["sharding"] == "Tensor"
              and p["instance_meta"] == "MlxRingInstance"]  # fmt: skip
    assert "not divisible by 2" in tensor[0]["error"]
    assert "JACCL (RDMA over Thunderbolt 5) runs on Macs" in two["MlxJacclInstance"]["error"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/instance", {"instance": {"Nope": {}}}, 400),
        ("POST", "/instance", {"instance": []}, 400),
        ("POST", "/instance", {"not_instance": 1}, 400),
        ("GET", "/instance/no-such-instance", None, 404),
        ("DELETE", "/instance/no-such-instance", None, 404),  # forwarded to the leader by b
    ],
)
def test_bad_instance_requests_are_4xx(
    pair: Pair, method: str, path: str, body: Any, status: int
) -> None:
    for name in HOSTS:
        response = httpx.request(method, pair.url(name, path), json=body, timeout=10)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["message"]


def test_runbook_places_and_chats_then_delete_frees_the_runners(pair: Pair) -> None:
    env = {**os.environ, "EXO_API_PORT": str(PORT), "MODEL_ID": MODEL}

    def phase(script: str, timeout: float) -> str:
        done = subprocess.run(["bash", str(RUNBOOK / script)], env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:  # the script's urllib hides the error body: ask again
            now = pair.get("a", f"/instance/placement?model_id={MODEL}&min_nodes=2").text
            pytest.fail(f"{done.stdout}{done.stderr}\nplacement now: {now}\n{pair.log()}")
        return done.stdout

    placed = phase("phase5_placement.sh", 120)
    assert "create_status 200" in placed and "PLACEMENT_READY" in placed, placed
    chatted = phase("phase7_first_chat.sh", 150)
    assert "status 200" in chatted and '"choices"' in chatted, chatted + pair.log()

    # every node serves the placed model, streaming or not, with the real openai client
    for name in HOSTS:
        client = OpenAI(base_url=pair.url(name, "/v1"), api_key="none", timeout=120)
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in (answer.choices[0].message.content or ""), answer
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == answer.choices[0].message.content
        assert MODEL in [m.id for m in client.models.list().data]

    state = pair.json("b", "/state")
    assert state is not None
    ((iid, entry),) = state["instances"].items()
    ((meta, body),) = entry.items()
    assert len(body["nodeToRunner"]) == 2
    # the runbook asks for exo's MlxRingInstance: the MLX engine over mx.distributed's ring
    assert (meta, body["backend"]) == ("MlxRingInstance", "ring"), (meta, body)
    names = {n["node_id"]: n["name"] for n in state["nodes"]}
    paths = state["instance_paths"][iid]  # the ring both ways: each to the other's host
    hops = sorted((names[p["src"]], names[p["dst"]], p["host"]) for p in paths)
    assert hops == [("a", "b", HOSTS["b"]), ("b", "a", HOSTS["a"])], paths
    assert all(p["kind"] in ("loopback", None) for p in paths), paths
    pids = [r["pid"] for r in state["runners"].values()]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)

    deleted = httpx.delete(pair.url("b", f"/instance/{iid}"), timeout=10)  # b forwards
    assert deleted.status_code == 200, deleted.text
    wait_for("the runner processes to end", lambda: not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        for p in pids), timeout=30)  # fmt: skip
    wait_for("the instance to leave every node's state", lambda: all(
        (pair.json(n, "/state") or {"instances": {1: 1}})["instances"] == {}
        for n in HOSTS), timeout=15)  # fmt: skip
    gone = httpx.post(pair.url("a", "/v1/chat/completions"), timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_min_nodes_places_the_model_once_enough_nodes_hold_it(tmp_path: Path) -> None:
    # with a cluster secret (the runbook test covers a cluster without one): reports, the
    # plan and the token relay to rank 0 all signed
    auto = Pair(tmp_path, port=PORT + 1, extra=("--model", "bundled", "--min-nodes", "2"),
                env={"SHOAL_CLUSTER_SECRET": "pair-secret"})  # fmt: skip
    try:
        auto.start("a")
        wait_for("a up", lambda: auto.json("a", "/state") is not None, timeout=60)
        time.sleep(3)  # a few plan ticks alone: one node is not enough
        assert auto.json("a", "/state")["instances"] == {}
        assert "waiting to place" in auto.log()

        auto.start("b")

        def serving() -> bool:
            instances = (auto.json("b", "/state") or {}).get("instances", {})
            bodies = [body for entry in instances.values() for body in entry.values()]
            statuses = [r["status"] for b in bodies for r in b["runnerStatus"].values()]
            assert "failed" not in statuses, auto.log()
            return len(statuses) == 2 and all(s in ("ready", "running") for s in statuses)

        wait_for("the auto-placed instance serving", serving, timeout=150, every=1.0)
        client = OpenAI(base_url=auto.url("b", "/v1"), api_key="none", timeout=120)
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0,
        )  # fmt: skip
        assert "Paris" in (answer.choices[0].message.content or "")
        # rank 0's endpoint answers signed calls only: the nodes' relays, not anyone else
        port = next(r["port"] for r in auto.json("b", "/state")["runners"].values() if r["port"])
        refused = []
        for host in HOSTS.values():
            try:
                refused.append(httpx.get(f"http://{host}:{port}/v1/models", timeout=5))
            except httpx.ConnectError:
                continue
        assert refused and all(r.status_code == 401 for r in refused), refused

        # A 2-core host pegged by loading and decoding starves the probes for a while (a
        # loopback "degraded" or even "down" is then true); once idle, no alert stands.
        wait_for(
            "no standing path alert",
            lambda: auto.get("a", "/cluster/alerts").json()["alerts"] == [],
            timeout=60, every=1.0,
        )  # fmt: skip
        metrics = auto.get("a", "/metrics").text
        assert 'shoal_instance_ready{instance="' in metrics and "} 1.0" in metrics, metrics
        assert "shoal_path_rtt_ms{" in metrics and 'shoal_alerts{kind="path"} 0.0' in metrics

        # a graceful stop leaves no runner process and no listening port behind
        runners = auto.json("a", "/state")["runners"].values()
        pids = [r["pid"] for r in runners]
        procs = [psutil.Process(p) for p in pids]
        ports = {c.laddr.port for p in procs for c in p.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}  # fmt: skip
        assert len(pids) == 2 and ports
    finally:
        auto.stop()
    gone = psutil.wait_procs(procs, timeout=20)[1] == []
    assert gone, [p.pid for p in procs if p.is_running()]
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    assert not ports & listening, ports & listening
    assert not (tmp_path / "a" / "data" / "running.json").exists()  # a clean stop, not a crash
