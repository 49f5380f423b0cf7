"""An MlxRingInstance on real paths: a veth cable and a 40 ms TUN wire between two hosts.

The ring's host list is placement's: with both paths up the instance's ranks listen and dial
on the veth addresses only; cutting the cable moves the instance to the slow path, restoring
it moves it back, and the same greedy answer comes each time. The model is a tiny random
qwen2 (mlx-lm can pipeline it) with SmolLM2's tokenizer, in each node's store.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_netns_healing import CUT, FAST, SLOW, instance, serving_on, start

from netns import Lab, Namespace
from test_netns_instances import A_FAST, B_FAST, curl, fast_and_slow, logs
from waiting import wait_for

pytest.importorskip("mlx.core", reason="mlx is not installed: make test installs shoal[mlx]")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed: make test installs shoal[mlx]")

from test_mlx_ring import tiny_dir  # noqa: E402

from shoal.engine.tokenizer import Tokenizer  # noqa: E402

from engine_helpers import bundled_gguf  # noqa: E402

pytestmark = pytest.mark.timeout(480)

MODEL = "shoal-test/tiny-qwen2"
ASK = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, Namespace, Namespace, Path]]:
    tokenizer = Tokenizer.from_gguf(bundled_gguf(), tmp_path / "tokenizers")
    model = tiny_dir(tmp_path / "built", "qwen2", None, tokenizer)
    for name in ("A", "B"):  # the same files on both nodes: their digests agree
        shutil.copytree(model, tmp_path / name / "data" / "models" / MODEL.replace("/", "--"))
    with fast_and_slow() as (lab, a, b):
        yield lab, a, b, tmp_path


def ask(ns: Namespace, timeout: float = 60) -> tuple[int, str]:
    code, answer = curl(ns, "/v1/completions", ASK, "POST", timeout=timeout)
    return code, (answer["choices"][0]["text"] if code == 200 else str(answer))


def test_the_ring_uses_the_cable_and_follows_it_through_a_cut(lab):
    lab, a, b, home = lab
    start(lab, a, "A", home)
    start(lab, b, "B", home)
    query = f"/instance/placement?model_id={MODEL}&instance_meta=MlxRingInstance&min_nodes=2"

    def created() -> bool:
        code, placement = curl(a, query)
        if code == 200 and curl(b, query)[0] == 200:
            return curl(a, "/instance", {"instance": placement}, "POST", timeout=30)[0] == 200
        return False

    wait_for("a ring instance placed on 2 nodes", created, 90, 0.5, detail=lambda: logs(home))
    wait_for("the ring serving on the cable", lambda: serving_on(b, FAST), 150, 1.0,
             detail=lambda: logs(home))  # fmt: skip
    body = instance(a)
    assert body["backend"] == "ring"
    ring_hosts = {ip["ip"] for ips in body["hostsByNode"].values() for ip in ips}
    assert ring_hosts == {A_FAST, B_FAST}, body  # every rank listens on its veth address
    code, first = ask(a)
    assert code == 200 and first, first

    a.nft(CUT.format(B_FAST))
    b.nft(CUT.format(A_FAST))
    wait_for("the ring serving on the slow path", lambda: serving_on(a, SLOW) and ask(a)[0] == 200,
             180, 1.0, detail=lambda: logs(home))  # fmt: skip
    assert ask(b) == (200, first)  # the same greedy text over the other path
    assert "down" in instance(a)["placedBecause"]

    a.run("nft", "delete", "table", "inet", "shoalcut")
    b.run("nft", "delete", "table", "inet", "shoalcut")
    wait_for("the ring back on the cable", lambda: serving_on(a, FAST), 180, 1.0,
             detail=lambda: logs(home))  # fmt: skip
    assert ask(a) == (200, first)
