"""An MlxRingInstance across nodes on loopback, end to end: the nodes report the MLX engine and
the ring backend, placement previews the layout mlx-lm can run (SmolLM2 is a llama: tensor
shards, 9 heads over three nodes; no pipeline, and not two ways), POST /instance starts one
mlx runner per node over mx.distributed's ring at the placed addresses, and the openai client
gets "Paris" from every node, streaming and not; DELETE frees the runners."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psutil
import pytest
from openai import OpenAI

from test_instances import MODEL, Pair
from waiting import wait_for

pytest.importorskip("mlx.core", reason="mlx is not installed: make test installs shoal[mlx]")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed: make test installs shoal[mlx]")

pytestmark = pytest.mark.timeout(600)

HOSTS = {"a": "127.0.0.1", "b": "127.0.0.2", "c": "127.0.0.3"}
QUERY = f"model_id={MODEL}&instance_meta=MlxRingInstance&sharding=Tensor&min_nodes=3"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    nodes = Pair(tmp_path_factory.mktemp("trio"), port=52745, hosts=HOSTS)
    try:
        nodes.start_both(timeout=90)
        yield nodes
    finally:
        nodes.stop()


def test_nodes_report_the_engines_and_backends_they_can_run(trio: Pair) -> None:
    doc = trio.json("a", "/cluster/nodes")
    assert doc is not None
    for node in doc["nodes"]:
        assert "mlx:cpu" in node["engines"] and "ring" in node["backends"], node
        (held,) = [m for m in node["models"] if m["model_id"] == MODEL]
        assert held["arch"] == "llama" and held["mlx_layouts"] == ["tensor"], held


def test_a_llama_over_the_ring_takes_the_layout_mlx_lm_can_run(trio: Pair) -> None:
    query = f"model_id={MODEL}&instance_meta=MlxRingInstance&min_nodes=2"
    pipeline = trio.get("a", f"/instance/placement?{query}")
    assert pipeline.status_code == 400
    message = pipeline.json()["error"]["message"]
    assert "cannot run llama as pipeline; it can run as tensor" in message, message
    # at least two nodes as tensor shards: 9 heads do not split in two, so it takes three
    tensor = trio.get("a", f"/instance/placement?{query}&sharding=Tensor")
    assert tensor.status_code == 200, tensor.text
    (body,) = tensor.json().values()
    assert len(body["nodeToRunner"]) == 3


def test_a_ring_instance_serves_paris_from_every_node(trio: Pair) -> None:
    preview = trio.get("b", f"/instance/placement?{QUERY}")
    assert preview.status_code == 200, preview.text
    (meta,) = preview.json()
    assert meta == "MlxRingInstance"
    posted = httpx.post(trio.url("c", "/instance"), json={"instance": preview.json()}, timeout=30)
    assert posted.status_code == 200, posted.text

    def serving() -> bool:
        state = trio.json("a", "/state") or {}
        bodies = [b for entry in state.get("instances", {}).values() for b in entry.values()]
        statuses = [r["status"] for b in bodies for r in b["runnerStatus"].values()]
        assert "failed" not in statuses, trio.log()
        return len(statuses) == 3 and all(s in ("ready", "running") for s in statuses)

    wait_for("the ring instance serving", serving, timeout=400, every=2.0, detail=trio.log)
    # three ranks on two cores decode slowly: a short answer from each node, one streamed
    answers = []
    for name in HOSTS:
        client = OpenAI(base_url=trio.url(name, "/v1"), api_key="none", timeout=180)
        answer = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=12, temperature=0
        )
        answers.append(answer.choices[0].message.content or "")
        assert "Paris" in answers[-1], answer
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == answers[-1] == answers[0]

    state = trio.json("a", "/state")
    assert state is not None
    ((iid, entry),) = state["instances"].items()
    (body,) = entry.values()
    assert body["backend"] == "ring"
    pids = [r["pid"] for r in state["runners"].values()]
    deleted = httpx.delete(trio.url("a", f"/instance/{iid}"), timeout=10)
    assert deleted.status_code == 200, deleted.text
    wait_for("the runner processes to end", lambda: not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        for p in pids), timeout=30)  # fmt: skip
