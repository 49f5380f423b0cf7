"""Should a placed instance move? A pure judgement the leader makes every tick.

An instance moves (the leader writes a new generation of it) when:

1. one of its nodes is gone, or one of its runners failed: it cannot serve as it is;
2. a path it uses is failing (its prober's recent probes go unanswered);
3. its slowest used path got much slower than the best layout available now (more than
   SLOWER_FACTOR x and SLOWER_MARGIN_MS slower), which is how a cluster that came back over a
   VPN after a restart finds its cable again (seed 002). Loopback paths do not count: their
   RTT measures how busy the host is, which no other layout on the same host escapes;
4. its decode rate stayed under its throughput floor (placement.throughput, `slow`): it moves
   to the best layout there is now, even the same one (a new generation: fresh runners, and a
   new baseline, so a layout that is simply this slow is moved once, not again and again).

Each move needs a candidate layout; without one the instance stays and the reason becomes an
alert. Moves for slowness wait COOLDOWN_S after the last placement, so paths cannot flap it;
a failed runner's instance waits retry_after(failures in a row) after its last placement.
Verdicts carry their reason as data (schema.reasons).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shoal.placement.addressing import is_failing, outbound_to
from shoal.placement.plan import runner_of
from shoal.schema.reasons import PathRef, Reason, reason, render
from shoal.schema.report import InstanceSpec, InterfaceKind, NodeReport, PathStats, RunnerState

SLOWER_FACTOR = 3.0
SLOWER_MARGIN_MS = 2.0
COOLDOWN_S = 15.0
RETRY_AFTER_S = 5.0  # a failed runner is retried (a new generation) this long after placing,
MAX_RETRY_AFTER_S = 60.0  # growing with each generation so a persistent failure backs off


@dataclass(frozen=True)
class UsedPath:
    src: str
    dst: str
    host: str  # dst's address src dials


@dataclass(frozen=True)
class PathState:
    rtt_ms: float | None
    failing: bool


@dataclass(frozen=True)
class Verdict:
    move: bool
    why: Reason | None = None  # None when all is well

    @property
    def reason(self) -> str:
        """The verdict's sentence; empty when all is well."""
        return render(self.why) if self.why else ""


KEEP = Verdict(False)


def retry_after(failures: int) -> float:
    """How long a failed runner waits before its instance is placed again: RETRY_AFTER_S,
    doubling with each failed generation in a row up to MAX_RETRY_AFTER_S."""
    return min(RETRY_AFTER_S * 2 ** max(0, failures), MAX_RETRY_AFTER_S)


def used_paths(instance: InstanceSpec) -> list[UsedPath]:
    """Ring hops (rank i -> i+1, the last back to 0) and every rank's path to the rank-0 store."""
    nodes, n = instance.nodes, len(instance.nodes)
    if n < 2:
        return []
    ring = [
        UsedPath(nodes[i], nodes[(i + 1) % n], instance.rank_addresses[(i + 1) % n])
        for i in range(n)
    ]
    store = [UsedPath(x, nodes[0], instance.store_address) for x in nodes[1:]]
    return list(dict.fromkeys(ring + store))


def measured(reports: Mapping[str, NodeReport], path: UsedPath) -> PathStats | None:
    """The path's source's own outbound record of it, if any."""
    report = reports.get(path.src)
    return outbound_to(path.dst, report.links if report else ()).get(path.host)


def path_state(reports: Mapping[str, NodeReport], path: UsedPath) -> PathState:
    """What the path's source measured on it (its own outbound record)."""
    p = measured(reports, path)
    if p is None:  # unmeasured from this side: judged by placement, not here
        return PathState(None, False)
    return PathState(p.rtt_ms_ewma, is_failing(p))


def used_path_rows(
    instance: InstanceSpec, reports: Mapping[str, NodeReport]
) -> list[dict[str, str | None]]:
    """The paths the instance uses, for /state: each with the interface kind its source measured
    it on (None where the source has no outbound record of it)."""
    rows = []
    for path in used_paths(instance):
        p = measured(reports, path)
        kind = str(p.interface_kind) if p is not None else None
        rows.append({"src": path.src, "dst": path.dst, "host": path.host, "kind": kind})
    return rows


def slowest(
    reports: Mapping[str, NodeReport], instance: InstanceSpec
) -> tuple[float, UsedPath | None]:
    worst: tuple[float, UsedPath | None] = (0.0, None)
    for path in used_paths(instance):
        record = measured(reports, path)
        if record is None or record.interface_kind == InterfaceKind.LOOPBACK:
            continue
        rtt = record.rtt_ms_ewma
        if rtt is not None and rtt > worst[0]:
            worst = (rtt, path)
    return worst


def review(
    instance: InstanceSpec,
    candidate: InstanceSpec | None,
    reports: Sequence[NodeReport],
    runners: Mapping[str, RunnerState],
    now: float,
    retry_after_s: float = RETRY_AFTER_S,
    slow: Reason | None = None,
) -> Verdict:
    """retry_after_s: how long after placing a failed runner's instance may be placed again;
    slow: why its decode rate is under its floor (placement.throughput), if it is."""
    by_id = {r.node_id: r for r in reports}
    problem = _broken(instance, by_id, runners, now, retry_after_s)
    if problem:
        return Verdict(candidate is not None, problem)
    if now - instance.created_at < COOLDOWN_S:
        return KEEP
    if slow is not None:  # without a candidate: an alert that says so
        return Verdict(candidate is not None, slow)
    if candidate is None or _same_layout(instance, candidate):
        return KEEP
    current, path = slowest(by_id, instance)
    best, _ = slowest(by_id, candidate)
    if path is not None and current > SLOWER_FACTOR * best and current > best + SLOWER_MARGIN_MS:
        measured = {"current_ms": current, "best_ms": best}
        return Verdict(True, reason("path_slower", nodes=(path.src, path.dst),
                                    path=_ref(path), measured=measured))  # fmt: skip
    return KEEP


def _broken(
    instance: InstanceSpec,
    by_id: Mapping[str, NodeReport],
    runners: Mapping[str, RunnerState],
    now: float,
    retry_after_s: float,
) -> Reason | None:
    gone = [n for n in instance.nodes if n not in by_id]
    if gone:
        return reason("node_gone", nodes=gone)
    for rank in range(len(instance.nodes)):
        state = runners.get(runner_of(instance, rank))
        if (
            state is not None
            and state.status == "failed"
            and now - instance.created_at >= retry_after_s
        ):
            return reason("rank_failed", nodes=(instance.nodes[rank],), rank=rank,
                          detail=state.reason or "no reason given")  # fmt: skip
    for path in used_paths(instance):
        if path_state(by_id, path).failing:
            return reason("path_down", nodes=(path.src, path.dst), path=_ref(path))
    return None


def _ref(path: UsedPath) -> PathRef:
    return PathRef(path.src, path.dst, path.host)


def _same_layout(a: InstanceSpec, b: InstanceSpec) -> bool:
    return (a.nodes, a.layer_ranges, a.store_address, a.rank_addresses) == (
        b.nodes,
        b.layer_ranges,
        b.store_address,
        b.rank_addresses,
    )
