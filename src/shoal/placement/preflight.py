"""Preflight: every path an instance needs, checked against the thresholds for its kind.

Before an instance starts (and before the leader moves one), each path it will use must be
working, lose at most `max_loss` of its probes and stay under the RTT bound of its link kind
(schema.thresholds.Thresholds, configurable). RTT here is the median of the probe window: a busy
node (hashing a model, loading torch) answers a few probes late, which moves the EWMA past a
tight loopback or Thunderbolt bound for seconds but says nothing about the path.
A failing check names the path, its numbers and a better measured address of the same peer,
if one passes, as fields (schema.reasons renders them). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from shoal.placement.addressing import is_failing, outbound_to
from shoal.placement.review import used_paths
from shoal.schema.reasons import PathRef, Reason, reason, render
from shoal.schema.report import InstanceSpec, InterfaceKind, NodeReport, PathStats
from shoal.schema.thresholds import Thresholds


@dataclass(frozen=True)
class PathCheck:
    """One path an instance needs, against the thresholds for its kind: the numbers as fields,
    `reason` and `better` their sentences (rendered once, for documents and the CLI)."""

    src: str
    dst: str
    host: str
    kind: str
    rtt_ms: float | None
    loss: float
    ok: bool
    code: str = ""  # what misses: probes_unanswered | loss_over | rtt_over_bound | other_side_only
    bound_ms: float | None = None  # rtt_over_bound: the kind's bound
    max_loss: float | None = None  # loss_over: the threshold
    better_host: str = ""  # another measured address of dst that would pass, if any
    better_kind: str = ""
    better_rtt_ms: float | None = None
    reason: str = field(init=False)
    better: str = field(init=False)

    def __post_init__(self) -> None:
        problem, alternative = self.problem(), self.alternative()
        object.__setattr__(self, "reason", render(problem) if problem else "")
        object.__setattr__(self, "better", render(alternative) if alternative else "")

    @property
    def path(self) -> PathRef:
        return PathRef(self.src, self.dst, self.host)

    def problem(self) -> Reason | None:
        if not self.code:
            return None
        numbers = {"rtt_ms": self.rtt_ms, "loss": self.loss, "bound_ms": self.bound_ms,
                   "max_loss": self.max_loss}  # fmt: skip
        return reason(self.code, path=self.path, measured=numbers, kind=self.kind)

    def alternative(self) -> Reason | None:
        if not self.better_host:
            return None
        return reason("better_path", path=PathRef(self.src, self.dst, self.better_host),
                      measured={"rtt_ms": self.better_rtt_ms}, kind=self.better_kind)  # fmt: skip

    def as_reason(self) -> Reason:
        """The check as data: path, kind, numbers and what misses (describe() renders it)."""
        return reason("path_check", nodes=(self.src, self.dst), path=self.path,
                      measured={"rtt_ms": self.rtt_ms, "loss": self.loss},
                      kind=self.kind, problem=self.problem())  # fmt: skip

    def refusal_reason(self) -> Reason:
        """Why placement refuses a layout this check fails (with a better path, if measured)."""
        return reason("preflight", nodes=(self.src, self.dst), path=self.path,
                      check=self.as_reason(), better=self.alternative())  # fmt: skip

    def describe(self) -> str:
        return render(self.as_reason())


def check_path(
    src: str, dst: str, host: str, records: Iterable[PathStats], th: Thresholds
) -> PathCheck:
    """src's own outbound records to dst decide; a path seen only by dst's inbound record passes
    unmeasured (one way is all some paths need, and placement already required it recent)."""
    by_host = outbound_to(dst, records)

    def judge(h: str, p: PathStats | None) -> PathCheck:
        if p is None:
            return PathCheck(src, dst, h, InterfaceKind.OTHER, None, 0.0, True, "other_side_only")
        rtt, kind = typical_rtt(p), str(p.interface_kind)
        code = _problem(p, th)
        return PathCheck(src, dst, h, kind, rtt, p.loss, not code, code,
                         bound_ms=th.bound(kind) if code == "rtt_over_bound" else None,
                         max_loss=th.max_loss if code == "loss_over" else None)  # fmt: skip

    check = judge(host, by_host.get(host))
    if check.ok:
        return check
    passing = [judge(h, p) for h, p in sorted(by_host.items()) if h != host]
    passing = sorted((c for c in passing if c.ok and c.rtt_ms is not None), key=lambda c: c.rtt_ms)
    if passing:
        best = passing[0]
        return replace(check, better_host=best.host, better_kind=best.kind,
                       better_rtt_ms=best.rtt_ms)  # fmt: skip
    return check


def typical_rtt(p: PathStats) -> float | None:
    """The window's median, or the EWMA from a report that carries no median."""
    return p.rtt_ms_p50 if p.rtt_ms_p50 is not None else p.rtt_ms_ewma


def _problem(p: PathStats, th: Thresholds) -> str:
    """The code of what a measured path misses of the thresholds; empty when it meets them."""
    rtt, kind = typical_rtt(p), str(p.interface_kind)
    if is_failing(p):
        return "probes_unanswered"
    if p.loss > th.max_loss:
        return "loss_over"
    if rtt is not None and rtt > th.bound(kind):
        return "rtt_over_bound"
    return ""


def preflight(
    instance: InstanceSpec, reports: Mapping[str, NodeReport], th: Thresholds
) -> list[PathCheck]:
    checks = []
    for path in used_paths(instance):
        report = reports.get(path.src)
        checks.append(check_path(path.src, path.dst, path.host, report.links if report else (), th))
    return checks
