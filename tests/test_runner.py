"""Runner processes as the worker starts them: status lines, serving through rank 0, stopping,
and meeting (or failing to meet) the other ranks."""

from __future__ import annotations

import signal
import time

import openai
import pytest
from runner_procs import free_port

from shoal.engine.sharding import even_layer_ranges
from shoal.runner.spec import RunnerSpec

from engine_helpers import bundled_gguf

pytestmark = pytest.mark.timeout(240)

SMOLLM_LAYERS = 30


def pipeline_specs(name: str, world: int = 2, **overrides: object) -> list[RunnerSpec]:
    store_port = free_port()
    return [
        RunnerSpec(
            instance_id=name,
            model_id="smollm2",
            model_path=str(bundled_gguf()),
            rank=rank,
            world_size=world,
            layer_range=layers,
            store_host="127.0.0.1",
            store_port=store_port,
            ifname="lo",
            max_batch=2,
            max_seq_len=512,
            **overrides,
        )
        for rank, layers in enumerate(even_layer_ranges(SMOLLM_LAYERS, world))
    ]


def test_two_rank_pipeline_answers_through_rank_zero_and_stops_on_sigterm(launch):
    rank0, rank1 = (launch(spec) for spec in pipeline_specs("answers"))
    port = rank0.wait_status("ready", 120)["port"]
    rank1.wait_status("ready", 10)  # the warm-up generation passed through rank 1
    for runner in (rank0, rank1):
        assert runner.statuses[:4] == ["connecting", "loading", "warming", "ready"]

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60)
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=40,
    )
    assert "Paris" in reply.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    # busy while the request ran, idle (ready, with the port) again after it
    deadline = time.monotonic() + 10
    while rank0.statuses[-1] != "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rank0.statuses[4:] == ["running", "ready"] and rank0.lines[-1]["port"] == port

    for runner in (rank0, rank1):  # as a worker stopping the instance does
        runner.signal(signal.SIGTERM)
    for runner in (rank0, rank1):
        assert runner.wait_exit(30) == 0
        assert runner.statuses[-1] == "stopped"


def test_a_rank_started_ten_seconds_late_still_joins_and_rank_zero_stops_it(launch):
    specs = pipeline_specs("late")
    rank0 = launch(specs[0])
    rank0.wait_status("connecting", 30)
    time.sleep(10)
    assert rank0.proc.poll() is None and rank0.statuses == ["connecting"]
    rank1 = launch(specs[1])
    rank0.wait_status("ready", 120)
    rank1.wait_status("ready", 10)

    rank0.signal(signal.SIGTERM)  # only rank 0: it tells rank 1 to stop
    for runner in (rank0, rank1):
        assert runner.wait_exit(30) == 0
        assert runner.statuses[-1] == "stopped"


def test_a_wrong_store_address_fails_naming_the_address_and_interface(launch):
    spec = pipeline_specs("nobody", init_attempts=3, init_window_s=3.0)[1]  # rank 0 never runs
    started = time.monotonic()
    runner = launch(spec)
    failed = runner.wait_status("failed", 60)
    assert runner.wait_exit(10) == 1
    assert time.monotonic() - started < 45  # the init window, not a hang
    reason = failed["reason"]
    assert f"127.0.0.1:{spec.store_port}" in reason and "interface lo" in reason
    assert "tries over 3 s" in reason


def test_followers_fail_with_a_reason_when_rank_zero_vanishes(launch):
    rank0, rank1 = (launch(spec) for spec in pipeline_specs("vanish", heartbeat_s=1.0))
    rank0.wait_status("ready", 120)
    rank1.wait_status("ready", 10)
    rank0.kill()
    failed = rank1.wait_status("failed", 30)
    assert "rank 0" in failed["reason"]
    assert rank1.wait_exit(10) == 1
