"""The dashboard in a real browser (Debian's chromium, driven by playwright) against two real
nodes on loopback: topology with both nodes and their measured paths, an instance launched from
the UI that reaches ready, a streamed chat answer, models with an audit, and a node killed
mid-test shown as gone. A screenshot of every view lands in test-artifacts/dashboard/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shoal.models.bundled import bundled_model_path

from fake_hf import FakeHub
from test_instances import MODEL, Pair
from waiting import wait_for

pytestmark = pytest.mark.timeout(420)

PORT = 52765
PULLED = "test-org/smol-gguf"  # served by a local fake Hugging Face endpoint
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    files = {"SmolLM2.gguf": bundled_model_path().read_bytes(), "README.md": b"# smol\n"}
    with FakeHub({PULLED: files}) as hub:
        yield hub


@pytest.fixture(scope="module")
def pair(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("dash")
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    p = Pair(root, port=PORT, env=env)
    try:
        p.start_both(timeout=90)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def page(pair: Pair) -> Iterator[object]:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    errors: list[str] = []
    with sync_api.sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )  # fmt: skip
        tab = context.new_page()
        tab.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
        tab.on("console", lambda m: errors.append(m.text) if "view " in m.text else None)
        tab.set_default_timeout(30_000)
        tab.goto(pair.url("a", "/#topology"))
        yield tab
        context.close()
    assert not errors, errors


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def node_id(pair: Pair, name: str) -> str:
    return httpx.get(pair.url(name, "/node_id"), timeout=5).json()


def test_topology_shows_both_nodes_and_their_paths_with_rtt(pair: Pair, page) -> None:
    a, b = node_id(pair, "a"), node_id(pair, "b")
    page.wait_for_selector(f'.card.node[data-node-id="{a}"][data-status="alive"]')
    page.wait_for_selector(f'.card.node[data-node-id="{b}"][data-status="alive"]')
    for src, dst in ((a, b), (b, a)):  # each direction has its own row and line, with an RTT
        row = page.locator(f'#paths tr[data-from="{src}"][data-to="{dst}"]').first
        row.wait_for()
        page.wait_for_function(
            "([s, d]) => /\\d\\.\\d+ ms/.test(document.querySelector("
            "`#paths tr[data-from='${s}'][data-to='${d}'] td.rtt`)?.textContent || '')",
            arg=[src, dst],
        )
        assert "loopback" in row.inner_text()
        line = page.locator(f'#topology-graph line[data-from="{src}"][data-to="{dst}"]')
        # loaded by chromium starting, a loopback path may read degraded; never down
        assert line.get_attribute("data-status") in ("ok", "degraded")
    labels = page.locator("#topology-graph text.path-label").all_text_contents()
    assert any(re.search(r"a→b loopback (degraded )?\d+\.\d+ ms", t) for t in labels), labels
    assert page.locator(".card.node.leader").count() == 1
    assert "live" in page.inner_text("#status")
    shot(page, "topology")


def test_an_instance_launched_from_the_ui_reaches_ready(pair: Pair, page) -> None:
    page.click('nav a[data-view="instances"]')
    page.wait_for_selector(f'#model-picker option[value="{MODEL}"]', state="attached")
    page.select_option("#model-picker", MODEL)
    # previews: the possible layouts, and why the others are impossible
    page.wait_for_selector(".preview.refused .reason")
    reasons = " ".join(page.locator(".preview.refused .reason").all_inner_texts())
    assert "not divisible by 2" in reasons, reasons  # SmolLM2's 9 heads: no 2-way tensor split
    two_nodes = page.locator(
        '.preview[data-sharding="Pipeline"][data-meta="GlooInstance"][data-nodes="2"]'
    )

    def two_node_layout() -> bool:  # a loaded machine can push a path past preflight a while
        if two_nodes.count():
            return True
        page.click("#preview-button")
        page.wait_for_selector("#previews .preview")
        return two_nodes.count() == 1

    wait_for("a 2-node pipeline previewed", two_node_layout, 60, 1.0,
             detail=lambda: page.inner_text("#previews"))  # fmt: skip
    assert "rank 1:" in two_nodes.inner_text()
    shot(page, "instances-previews")

    def launched() -> bool:  # 409 while the leader's copy of a peer's report lags a poll
        two_nodes.locator("button.launch").click()
        page.wait_for_function(
            "() => document.querySelector('#instance-message').textContent !== ''"
        )
        return page.inner_text("#instance-message").startswith("Launched")

    wait_for("the instance launched", launched, 30, 1.0, detail=lambda: page.inner_text("main"))
    page.wait_for_selector('.instance[data-status="ready"]', timeout=180_000)
    card = page.locator(".instance").first
    text = card.inner_text()
    assert MODEL in text and "Pipeline parallel" in text and "gloo" in text.lower(), text
    assert card.locator("tr.rank").count() == 2 and "lo" in text
    assert "of 30" in text  # layer ranges of SmolLM2's 30 layers
    shot(page, "instances")
    # the paths the instance uses are highlighted in the topology
    page.click('nav a[data-view="topology"]')
    page.wait_for_selector("#topology-graph line.path.used", state="attached")
    assert page.locator("#paths tr.used").count() >= 1
    shot(page, "topology-instance")


def test_chat_streams_an_answer_with_ttft_and_speed(page) -> None:
    page.click('nav a[data-view="chat"]')
    page.wait_for_selector(f'#chat-model option[value="{MODEL}"]', state="attached")
    page.fill("#chat-temperature", "0")  # greedy: the answer is the model's best, every run
    page.fill("#chat-input", "What is the capital of France?")
    # count how often the answer's text changes while it streams
    page.evaluate(
        """() => { window.updates = 0; new MutationObserver(() => window.updates++)
           .observe(document.querySelector('#chat-log'),
                    {subtree: true, childList: true, characterData: true}); }"""
    )
    page.click("#chat-send")
    page.wait_for_selector(".turn.assistant.done", timeout=120_000)
    answer = page.inner_text(".turn.assistant .text")
    stats = page.inner_text(".turn.assistant .stats")
    assert "Paris" in answer, answer
    assert re.search(r"TTFT \d+ ms · \d+\.\d tok/s · \d+ tokens", stats), stats
    assert page.evaluate("window.updates") > 5  # token by token, not one final write
    shot(page, "chat")
    page.click('nav a[data-view="instances"]')
    page.wait_for_function(
        "() => /tok\\/s|idle/.test(document.querySelector('.instance .tok-s')?.textContent)"
    )


def test_models_view_shows_holders_and_runs_an_audit(pair: Pair, page) -> None:
    page.click('nav a[data-view="models"]')
    row = page.locator(f'#models-table tr[data-model="{MODEL}"]')
    row.wait_for()
    assert row.inner_text().count("✓ held") == 2, row.inner_text()
    row.locator("button.audit").click()
    page.wait_for_selector(f'#models-table tr[data-model="{MODEL}"] .checks', timeout=60_000)
    assert "RING_INPUT_READY" in row.inner_text(), row.inner_text()
    # a download into this node's store: progress under Stores, then the model is held here
    page.fill("#pull-model", PULLED)
    page.click("#pull-button")
    page.wait_for_function("() => document.querySelector('#pull-message').textContent !== ''")
    assert page.inner_text("#pull-message").startswith("Downloading"), page.inner_text("main")
    page.wait_for_selector(f'#stores .download[data-model="{PULLED}"][data-status="done"]')
    pulled = page.locator(f'#models-table tr[data-model="{PULLED}"]')
    page.wait_for_function(
        "(m) => document.querySelector(`#models-table tr[data-model='${m}']`)"
        "?.textContent.includes('held')",
        arg=PULLED,
    )
    assert pulled.inner_text().count("✓ held") == 1, pulled.inner_text()  # on a, not on b
    page.fill("#pull-model", "no-such/model")
    page.click("#pull-button")
    page.wait_for_selector('#stores .download[data-model="no-such/model"][data-status="failed"]')
    shot(page, "models")


def test_delete_from_the_ui_stops_the_runners(pair: Pair, page) -> None:
    page.click('nav a[data-view="instances"]')
    page.locator(".instance button.delete").first.click()
    page.wait_for_function(
        "() => document.querySelector('#instance-list').textContent.includes('No instance')"
    )
    assert page.inner_text("#instance-message").startswith("Deleted")

    def stopped() -> bool:
        runners = (pair.json("a", "/state") or {"runners": {"?": {}}})["runners"]
        return all(r.get("status") == "stopped" for r in runners.values())

    wait_for("every runner stopped", stopped, 60)


def test_a_killed_node_shows_as_gone(pair: Pair, page) -> None:
    b = node_id(pair, "b")
    os.killpg(pair.procs["b"].pid, signal.SIGKILL)
    pair.procs["b"].wait(timeout=10)
    page.click('nav a[data-view="topology"]')
    page.wait_for_selector(f'.card.node[data-node-id="{b}"][data-status="gone"]', timeout=30_000)
    assert "gone" in page.locator(f'.card.node[data-node-id="{b}"]').inner_text()
    shot(page, "topology-node-gone")
    page.click('nav a[data-view="alerts"]')
    page.wait_for_selector('#history tr[data-kind="node_gone"]', timeout=30_000)
    shot(page, "alerts")


# ---- with an API key: the page asks for it once and keeps it for the tab ----------------------

KEY = "dashboard-test-key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """One node started with --api-key (env SHOAL_API_KEY), on its own address and port."""
    p = Pair(tmp_path_factory.mktemp("keyed"), port=PORT + 1, env={"SHOAL_API_KEY": KEY},
             hosts={"k": "127.0.0.3"})  # fmt: skip
    p.start("k")
    try:  # /health needs no key; everything the page reads does
        wait_for("the keyed node up", lambda: p.json("k", "/health") is not None, 90, detail=p.log)
        yield p
    finally:
        p.stop()


def test_a_keyed_dashboard_asks_for_the_key_then_shows_the_cluster(keyed: Pair, page) -> None:
    assert keyed.get("k", "/state").status_code == 401
    me = httpx.get(keyed.url("k", "/node_id"), headers={"x-api-key": KEY}, timeout=5).json()
    tab = page.context.new_page()  # another origin: its own sessionStorage
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    tab.set_default_timeout(30_000)
    tab.goto(keyed.url("k", "/#topology"))  # the page itself loads without the key
    tab.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in tab.inner_text("#key-why")
    assert "needs its key" in tab.inner_text("#banner")
    shot(tab, "keyed-asks")
    tab.fill("#key-input", "wrong-key")  # refused: asked again, saying so
    tab.click("#key-submit")
    tab.wait_for_function("() => /refused/.test(document.querySelector('#key-why').textContent)")
    tab.fill("#key-input", KEY)
    tab.click("#key-submit")
    tab.wait_for_selector(f'.card.node[data-node-id="{me}"][data-status="alive"]')
    assert tab.is_hidden("#key-form") and "live · 1 node" in tab.inner_text("#status")
    assert tab.evaluate("() => sessionStorage.getItem('shoal.apiKey')") == KEY
    shot(tab, "keyed-topology")
    tab.reload()  # the tab keeps the key: no second prompt
    tab.wait_for_selector(f'.card.node[data-node-id="{me}"][data-status="alive"]')
    assert tab.is_hidden("#key-form")
    tab.close()
    assert not errors, errors
