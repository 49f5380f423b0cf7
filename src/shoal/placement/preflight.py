"""Preflight: every path an instance needs, checked against the thresholds for its kind.

Before an instance starts (and before the leader moves one), each path it will use must be
working, lose at most `max_loss` of its probes and stay under the RTT bound of its link kind
(schema.thresholds.Thresholds, configurable). RTT here is the median of the probe window: a busy
node (hashing a model, loading torch) answers a few probes late, which moves the EWMA past a
tight loopback or Thunderbolt bound for seconds but says nothing about the path.
A failing check names the path, its numbers and a better measured address of the same peer,
if one passes. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shoal.placement.addressing import is_failing, outbound_to
from shoal.placement.review import used_paths
from shoal.schema.report import InstanceSpec, InterfaceKind, NodeReport, PathStats
from shoal.schema.thresholds import Thresholds


@dataclass(frozen=True)
class PathCheck:
    """One path an instance needs, against the thresholds for its kind."""

    src: str
    dst: str
    host: str
    kind: str
    rtt_ms: float | None
    loss: float
    ok: bool
    reason: str
    better: str = ""  # another measured address of dst that would pass, if any

    def describe(self) -> str:
        rtt = "unmeasured" if self.rtt_ms is None else f"RTT {self.rtt_ms:.1f} ms"
        loss = f"loss {self.loss:.0%}"
        text = f"{self.src[:8]} -> {self.dst[:8]} at {self.host} ({self.kind}, {rtt}, {loss})"
        return text + (f": {self.reason}" if self.reason else "")


def check_path(
    src: str, dst: str, host: str, records: Iterable[PathStats], th: Thresholds
) -> PathCheck:
    """src's own outbound records to dst decide; a path seen only by dst's inbound record passes
    unmeasured (one way is all some paths need, and placement already required it recent)."""
    by_host = outbound_to(dst, records)

    def judge(h: str, p: PathStats | None) -> PathCheck:
        if p is None:
            return PathCheck(src, dst, h, InterfaceKind.OTHER, None, 0.0, True,
                             "measured from the other side only")  # fmt: skip
        problem = _problem(p, th)
        return PathCheck(src, dst, h, str(p.interface_kind), typical_rtt(p), p.loss,
                         not problem, problem)  # fmt: skip

    check = judge(host, by_host.get(host))
    if check.ok:
        return check
    passing = [judge(h, p) for h, p in sorted(by_host.items()) if h != host]
    passing = sorted((c for c in passing if c.ok and c.rtt_ms is not None), key=lambda c: c.rtt_ms)
    if passing:
        best = passing[0]
        return PathCheck(
            **{**check.__dict__, "better": f"{best.host} ({best.kind}, RTT {best.rtt_ms:.1f} ms)"}
        )
    return check


def typical_rtt(p: PathStats) -> float | None:
    """The window's median, or the EWMA from a report that carries no median."""
    return p.rtt_ms_p50 if p.rtt_ms_p50 is not None else p.rtt_ms_ewma


def _problem(p: PathStats, th: Thresholds) -> str:
    """Why a measured path misses the thresholds; empty when it meets them."""
    rtt, kind = typical_rtt(p), str(p.interface_kind)
    if is_failing(p):
        return "probes go unanswered"
    if p.loss > th.max_loss:
        return f"loss {p.loss:.0%} is over {th.max_loss:.0%}"
    if rtt is not None and rtt > th.bound(kind):
        return f"RTT {rtt:.1f} ms is over the {kind} bound {th.bound(kind):g} ms"
    return ""


def preflight(
    instance: InstanceSpec, reports: Mapping[str, NodeReport], th: Thresholds
) -> list[PathCheck]:
    checks = []
    for path in used_paths(instance):
        report = reports.get(path.src)
        checks.append(check_path(path.src, path.dst, path.host, report.links if report else (), th))
    return checks
