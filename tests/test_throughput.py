"""The throughput floor (placement.throughput) as tables: rank 0's rates in, the watch out."""

from __future__ import annotations

import pytest

from shoal.placement.throughput import Floor, RateWatch, watch
from shoal.schema.reasons import render
from shoal.schema.report import InstanceSpec, RunnerState

T0 = 10_000.0
FLOOR = Floor(ratio=0.5, window_s=30.0, baseline_samples=3, gap_s=6.0)


def spec(generation: int = 0) -> InstanceSpec:
    return InstanceSpec(instance_id="i", model_id="m", nodes=("a", "b"), generation=generation)


def head(tokens: int, tok_s: float | None, status: str = "running") -> RunnerState:
    return RunnerState(runner_id="i-g0-r0", instance_id="i", status=status, tokens=tokens,
                       tok_s=tok_s)  # fmt: skip


def run(samples: str, floor: Floor = FLOOR) -> list[tuple[RateWatch, object]]:
    """Steps 'seconds:rate' ('-': idle, no new count); each a tick with a new token count."""
    w, tokens, out = None, 0, []
    for step in samples.split():
        at, _, rate = step.partition(":")
        state = None
        if rate != "-":
            tokens += 10
            state = head(tokens, float(rate))
        w, why = watch(w, spec(), state, T0 + float(at), floor)
        out.append((w, why))
    return out


def fast(start: float, end: float, rate: float = 20.0, every: float = 2.0) -> str:
    """Samples every `every` s from start to end (inclusive) at `rate`."""
    n = int((end - start) / every) + 1
    return " ".join(f"{start + i * every:g}:{rate:g}" for i in range(n))


@pytest.mark.parametrize(
    ("name", "samples", "moves_at"),
    [
        ("steady at the baseline: never", fast(0, 80), None),
        ("under the floor for 30 s of serving: at 30 s", fast(0, 4) + " " + fast(6, 60, 5.0), 36),
        ("under it, but only briefly: never", fast(0, 4) + " " + fast(6, 20, 5.0) + " "
         + fast(22, 80), None),
        ("just above the floor (0.5 x 20 = 10): never", fast(0, 4) + " " + fast(6, 80, 10.0),
         None),
        ("idle stretches neither count nor reset", fast(0, 4) + " " + fast(6, 20, 5.0)
         + " 40:- 100:- " + fast(200, 240, 5.0), 216),
        ("one sample at the baseline starts the count again", fast(0, 4) + " " + fast(6, 30, 5.0)
         + " 32:20 " + fast(34, 80, 5.0), 64),
        ("the baseline is the best of the first three", "0:5 2:20 4:5 " + fast(6, 60, 9.0), 36),
    ],
)  # fmt: skip
def test_the_floor(name: str, samples: str, moves_at: float | None) -> None:
    results = run(samples)
    times = [float(s.partition(":")[0]) for s in samples.split()]
    first = next((t for t, (_, why) in zip(times, results, strict=True) if why), None)
    assert first == moves_at, (
        name,
        [(t, w.under_s) for t, (w, _) in zip(times, results, strict=True)],
    )


def test_the_reason_carries_the_numbers() -> None:
    _, why = run(fast(0, 4) + " " + fast(6, 40, 5.0))[-1]
    assert why is not None and why.code == "throughput_low" and why.nodes == ("a",)
    assert why.number("tok_s") == 5.0 and why.number("baseline_tok_s") == 20.0
    assert why.number("share") == 0.25 and why.number("serving_s") >= 30.0
    assert why.fact("floor") == 0.5
    assert render(why) == (
        "rank 0 on a decodes 5.0 tok/s, 25% of its baseline 20.0 tok/s (floor 50%), "
        f"for {why.number('serving_s'):.0f} s of serving"
    )


@pytest.mark.parametrize(
    ("name", "state"),
    [
        ("idle (ready, the same count)", head(0, 20.0, "ready")),
        ("a count with no rate (after an idle stretch)", head(10, None)),
        ("loading", head(10, 20.0, "loading")),
        ("no rank 0 reported", None),
    ],
)
def test_no_sample(name: str, state: RunnerState | None) -> None:
    w, why = watch(RateWatch(0), spec(), state, T0, FLOOR)
    assert w.samples == 0 and why is None, name


def test_a_new_generation_starts_a_new_baseline() -> None:
    slow = run(fast(0, 4) + " " + fast(6, 40, 5.0))[-1][0]
    assert slow.baseline == 20.0 and slow.under
    w, why = watch(slow, spec(generation=1), head(slow.tokens + 10, 5.0), T0 + 42, FLOOR)
    assert w == RateWatch(1, tokens=w.tokens, samples=1, baseline=5.0, rate=5.0, last_at=T0 + 42)
    assert why is None  # the moved instance's 5 tok/s is its new normal


def test_a_ratio_of_zero_turns_it_off() -> None:
    off = Floor(ratio=0.0, window_s=30.0)
    assert all(why is None for _, why in run(fast(0, 4) + " " + fast(6, 80, 0.5), off))
