"""Re-place on a throughput floor: seed 002's watchdog ("24.0 -> 2.5 tok/s, ratio 10%") as a
decision the leader acts on, not a line someone reads hours later.

The leader follows each instance's decode rate as its rank 0 reports it while generating
(RunnerState.tok_s: tokens over the seconds between two token counts, about every
TOKENS_EVERY_S; a count that follows an idle stretch carries no rate). Each new count with a
rate is one sample. Per generation of the instance (a move starts afresh):

- baseline: the best of its first `baseline_samples` samples; a move to a slower layout that
  was the best left is the new normal, not a reason to move again;
- under the floor: a sample under `ratio` x baseline. Serving seconds between two samples in a
  row that are both under it add up; an idle stretch (samples more than `gap_s` apart) adds
  nothing and resets nothing; one sample at or above the floor starts the count again;
- once `window_s` serving seconds under it have added up, `watch` returns the reason
  (code `throughput_low`, the measured numbers as fields) and review moves the instance like
  a degraded path (placement.review), once its cooldown has passed.

The rate is rank 0's aggregate over its batch: a baseline taken under load, judged against a
single client later, reads lower. The floor is a ratio well under 1 (default 0.5) for that.
`watch` is pure: times come in, nothing is read from a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shoal.schema.reasons import Reason, reason
from shoal.schema.report import InstanceSpec, RunnerState

TOKENS_EVERY_S = 2.0  # as shoal.runner.spec: rank 0 reports its token count this often
SERVING = ("ready", "running")


@dataclass(frozen=True)
class Floor:
    ratio: float = 0.5  # --min-throughput-ratio; 0 turns the floor off
    window_s: float = 30.0  # serving seconds under the floor before the instance moves
    baseline_samples: int = 3  # the baseline is the best of this many first samples
    gap_s: float = 3 * TOKENS_EVERY_S  # samples further apart had idle time between them


@dataclass(frozen=True)
class RateWatch:
    """One instance's rate as the leader followed it; RateWatch(generation) when placed."""

    generation: int
    tokens: int = 0  # rank 0's token count at the last sample: a new count is a new sample
    samples: int = 0  # samples taken (the first baseline_samples make the baseline)
    baseline: float | None = None  # tok/s
    rate: float | None = None  # the last sample's tok/s
    last_at: float | None = None  # when it came
    under: bool = False  # whether it was under the floor
    under_s: float = 0.0  # serving seconds under the floor, added up


def watch(
    previous: RateWatch | None,
    instance: InstanceSpec,
    head: RunnerState | None,
    now: float,
    floor: Floor = Floor(),
) -> tuple[RateWatch, Reason | None]:
    """The instance's watch after this tick's look at its rank 0 (head), and the reason to
    move it while its rate has stayed under the floor for the window (None otherwise)."""
    w = sample(previous, instance, head, now, floor)
    if floor.ratio <= 0 or not w.under or w.under_s < floor.window_s:
        return w, None
    assert w.baseline is not None and w.rate is not None
    measured = {"tok_s": w.rate, "baseline_tok_s": w.baseline, "share": w.rate / w.baseline,
                "serving_s": w.under_s}  # fmt: skip
    return w, reason("throughput_low", nodes=(instance.nodes[0],), measured=measured,
                     floor=floor.ratio)  # fmt: skip


def sample(
    previous: RateWatch | None,
    instance: InstanceSpec,
    head: RunnerState | None,
    now: float,
    floor: Floor,
) -> RateWatch:
    """The watch with this tick's sample in it, if rank 0 reported a new count with a rate."""
    w = previous
    if w is None or w.generation != instance.generation:
        w = RateWatch(instance.generation)  # placed anew: a new baseline
    if head is None or head.status not in SERVING or head.tok_s is None or head.tokens == w.tokens:
        return w  # no new sample: idle, loading, or the count we saw last tick
    rate = head.tok_s
    in_a_row = w.under and w.last_at is not None and now - w.last_at <= floor.gap_s
    added = now - w.last_at if in_a_row and w.last_at is not None else 0.0
    w = replace(w, tokens=head.tokens, samples=w.samples + 1, rate=rate, last_at=now)
    if w.baseline is None or w.samples <= floor.baseline_samples:  # measuring this layout
        return replace(w, baseline=rate if w.baseline is None else max(w.baseline, rate))
    under = rate < floor.ratio * w.baseline
    return replace(w, under=under, under_s=w.under_s + added if under else 0.0)
