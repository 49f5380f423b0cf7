"""The worker's runner processes: a spare started ahead of need takes the next runner's spec
(its imports done), a new spare follows once nothing here is starting, and none outlives
stop_all."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shoal.models.local import describe
from shoal.placement.plan import solo_instance
from shoal.schema.report import ClusterPlan
from shoal.worker import Worker, WorkerSettings

from engine_helpers import bundled_gguf

pytestmark = pytest.mark.timeout(180)


def wait(what: str, check, limit: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen in {limit:.0f} s")


def test_a_spare_runner_takes_the_next_spec_and_is_replaced(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_TORCH_THREADS", "1")
    model = describe("smollm2", bundled_gguf())
    instance = solo_instance("n", model.held)
    cache = tmp_path / "tokenizers"
    settings = WorkerSettings(max_seq_len=256, max_batch=1, log_dir=tmp_path, spare=True,
                              tokenizer_cache=cache)  # fmt: skip
    worker = Worker("n", {"smollm2": model}, settings)
    try:
        worker.reconcile(ClusterPlan())  # nothing to run: a spare all the same
        spare = worker._spare
        assert spare is not None and spare.proc.poll() is None
        # while it waits it builds the GGUF's tokenizer cache, which a rank 0 needs first
        wait("the tokenizer cache built", lambda: any(cache.glob("*/shoal_tokenizer.json")), 150)
        worker.reconcile(ClusterPlan(instances=(instance,)))  # the plan wants a rank here
        (state,) = worker.states()
        assert state.pid == spare.proc.pid and worker._spare is None  # the spare took it
        assert (tmp_path / f"{state.runner_id}.log").exists()  # its log under its name
        wait("the runner ready", lambda: worker.states()[0].status == "ready")
        worker.reconcile(ClusterPlan(instances=(instance,)))
        assert worker._spare is not None and worker._spare.proc.pid != state.pid  # the next
        nxt = worker._spare
    finally:
        worker.stop_all()
    assert spare.proc.poll() is not None and nxt.proc.poll() is not None  # none left behind
    assert worker._spare is None
