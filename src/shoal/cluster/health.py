"""Path health: per path a baseline and a current window, and a verdict ok / degraded / down.

Seed 002: after a restart a cluster ran over Tailscale (40-70 ms) instead of the cable (<1 ms)
and nothing noticed. Here every node keeps, for each path it probes, one sample per cluster tick
(the probe RTT's EWMA, or a miss), and judges:

- down: no probe reply for DOWN_AFTER_S while probes keep going out;
- degraded: the current window's median is past DEGRADE_FACTOR x the baseline (and at least
  MIN_DEGRADE_MS slower) or past the absolute bound for the path's kind, and has been for
  SUSTAIN_S: a single spike moves the median of a window by nothing, a sustained shift by all;
- ok otherwise. The baseline is the best window median seen in the bounded history, so a path
  that got slow stays "degraded" against what it was, not against its new normal.

`verdict` and `Thresholds` are pure; `PathHealthTracker` keeps the samples (times passed in).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.schema.report import PathHealth, PathStats
from shoal.schema.thresholds import Thresholds

OK, DEGRADED, DOWN = "ok", "degraded", "down"
DEFAULT_THRESHOLDS = Thresholds()

Sample = tuple[float, float | None]  # (time, rtt ms) or (time, None) for a tick with no reply


def window_median(samples: Iterable[Sample], start: float, end: float) -> float | None:
    rtts = [r for t, r in samples if start < t <= end and r is not None]
    return statistics.median(rtts) if rtts else None


def verdict(
    samples: list[Sample],
    baseline_ms: float | None,
    kind: str,
    now: float,
    last_success: float | None,
    probing: bool,
    th: Thresholds = DEFAULT_THRESHOLDS,
) -> tuple[str, str]:
    """(status, reason) of one path from its samples (oldest first) and baseline."""
    if probing and (last_success is None or now - last_success >= th.down_after_s):
        since = "ever" if last_success is None else f"for {now - last_success:.1f} s"
        return DOWN, f"no probe reply {since}"

    def slow(at: float) -> float | None:
        current = window_median(samples, at - th.window_s, at)
        if current is None:
            return None
        if current > th.bound(kind):
            return current
        if baseline_ms is not None and current > max(
            th.degrade_factor * baseline_ms, baseline_ms + th.min_degrade_ms
        ):
            return current
        return None

    # degraded only if slow at every sample time of the last sustain_s (and there are some)
    checks = [t for t, _ in samples if now - th.sustain_s <= t <= now]
    slow_at = [slow(t) for t in checks]
    if checks and checks[0] <= now - th.sustain_s + 1.0 and all(s is not None for s in slow_at):
        current = slow_at[-1]
        assert current is not None
        if current > th.bound(kind):
            return (
                DEGRADED,
                f"median RTT {current:.1f} ms is past the {kind} bound {th.bound(kind):g} ms",
            )
        return DEGRADED, (
            f"median RTT {current:.1f} ms is {current / baseline_ms:.1f}x its baseline "
            f"{baseline_ms:.2f} ms"
        )  # fmt: skip
    return OK, ""


@dataclass
class _Series:
    kind: str
    samples: deque[Sample]
    baseline_ms: float | None = None
    last_success: float | None = None  # the previous tick's, to tell a new reply from none
    status: str = OK
    reason: str = ""
    since: float = 0.0


class PathHealthTracker:
    """One node's outbound paths: a sample per tick, a baseline, a verdict, status changes."""

    def __init__(self, thresholds: Thresholds = DEFAULT_THRESHOLDS, history: int = 600) -> None:
        self.th = thresholds
        self.history = history
        self._paths: dict[tuple[str, str], _Series] = {}

    def observe(self, stats: Iterable[PathStats], now: float) -> list[PathHealth]:
        """Feed this tick's outbound path records; returns the paths whose status changed."""
        changed = []
        for p in stats:
            if p.direction != "outbound":
                continue
            key = (p.peer_node_id, p.peer_addr)
            s = self._paths.get(key)
            if s is None:
                s = self._paths[key] = _Series(p.interface_kind, deque(maxlen=self.history),
                                               since=now)  # fmt: skip
            replied = p.last_success is not None and p.last_success != s.last_success
            s.samples.append((now, p.rtt_ms_ewma if replied else None))
            s.last_success = p.last_success
            current = window_median(s.samples, now - self.th.window_s, now)
            if current is not None and (s.baseline_ms is None or current < s.baseline_ms):
                s.baseline_ms = current
            probing = p.last_attempt is not None and now - p.last_attempt < self.th.down_after_s
            status, reason = verdict(list(s.samples), s.baseline_ms, s.kind, now,
                                     p.last_success, probing, self.th)  # fmt: skip
            s.reason = reason
            if status != s.status:
                s.status, s.since = status, now
                changed.append(self._health(key, s, now))
        return changed

    def snapshot(self, now: float) -> tuple[PathHealth, ...]:
        return tuple(self._health(k, s, now) for k, s in sorted(self._paths.items()))

    def _health(self, key: tuple[str, str], s: _Series, now: float) -> PathHealth:
        return PathHealth(
            peer_node_id=key[0],
            peer_addr=key[1],
            interface_kind=s.kind,
            status=s.status,
            reason=s.reason,
            since=s.since,
            baseline_ms=s.baseline_ms,
            current_ms=window_median(s.samples, now - self.th.window_s, now),
        )
