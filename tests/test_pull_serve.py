"""A node pulls a model from a (fake, local) Hugging Face endpoint into its store, reports the
download, holds the model once complete, and serves it once placed: store to chat, for real."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from shoal.models.bundled import bundled_model_path

from fake_hf import FakeHub
from waiting import wait_for

pytestmark = pytest.mark.timeout(240)

PORT = 52745
BASE = f"http://127.0.0.1:{PORT}"
REPO = "test-org/smol-gguf"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    files = {"SmolLM2.Q4_1.gguf": bundled_model_path().read_bytes(), "README.md": b"# smol\n"}
    with FakeHub({REPO: files}) as hub:
        yield hub


@pytest.fixture(scope="module")
def node(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("pull-node")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "HF_"))},
        "SHOAL_HOME": str(home),
        "SHOAL_TORCH_THREADS": "1",
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    log = open(home / "node.log", "ab")  # noqa: SIM115 - lives as long as the node
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "run", "--host", "127.0.0.1", "--api-port", str(PORT),
         "--model", "none", "--discovery-interfaces", "none"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for("the node's API", lambda: _get("/health") is not None, timeout=60)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get(path: str) -> Any:
    try:
        response = httpx.get(BASE + path, timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def shoal(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_a_node_pulls_reports_holds_and_serves_a_model(node: dict[str, str]) -> None:
    pulled = shoal(node, "models", "pull", REPO, "--api", BASE)
    assert pulled.returncode == 0, pulled.stderr
    assert f"{REPO}: pulled on {BASE} (2 files)" in pulled.stdout

    def me() -> dict[str, Any]:  # the node's report refreshes once a tick
        return next(n for n in _get("/state")["nodes"] if n["is_self"])

    def held() -> bool:
        return REPO in [m["model_id"] for m in me()["models"]]

    wait_for("/state to show the model held", held, timeout=10)
    (download,) = me()["store"]["downloads"]
    assert download["status"] == "done" and download["bytes_done"] == download["bytes_total"]
    assert me()["store"]["disk_free"] > 0
    downloaded = [m["id"] for m in _get("/v1/models?status=downloaded")["data"]]
    assert REPO in downloaded  # held from its store dir, no restart

    listed = shoal(node, "models", "list")
    assert REPO in listed.stdout and " ok" in listed.stdout

    placement = httpx.get(f"{BASE}/instance/placement", params={"model_id": REPO}).json()
    created = httpx.post(f"{BASE}/instance", json={"instance": placement}, timeout=30)
    assert created.status_code == 200, created.text
    client = OpenAI(base_url=f"{BASE}/v1", api_key="unused", timeout=120)
    answer = client.chat.completions.create(
        model=REPO,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in (answer.choices[0].message.content or "")


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "../../etc"}, 400, "not a model id"),
        ({"model": REPO, "unknown": 1}, 400, "unknown"),
        ({}, 400, "model"),
    ],
)
def test_bad_pull_requests_are_4xx(node: dict[str, str], body: dict, status: int, says: str):
    response = httpx.post(f"{BASE}/models/pull", json=body, timeout=10)
    assert response.status_code == status
    assert says in response.json()["error"]["message"] + str(response.json()["error"]["param"])


def test_a_failed_pull_shows_its_reason(node: dict[str, str]) -> None:
    started = httpx.post(f"{BASE}/models/pull", json={"model": "test-org/absent"}, timeout=10)
    assert started.status_code == 202

    def ended() -> bool:
        rows = _get("/models")["store"]["downloads"]
        return any(d["model_id"] == "test-org/absent" and d["status"] == "failed" for d in rows)

    wait_for("the pull to fail", ended, timeout=30)
    rows = _get("/models")["store"]["downloads"]
    (row,) = [d for d in rows if d["model_id"] == "test-org/absent"]
    assert "no such model" in row["error"]
    manifest = httpx.get(f"{BASE}/models/test-org/absent/manifest", timeout=10)
    assert manifest.status_code == 404 and "shoal models pull" in manifest.text
