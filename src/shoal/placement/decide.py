"""The leader's tick as a pure function: state in, a decision out.

`decide(plan, reports, runners, cards, now, config, memory)` adopts the newest plan any node
publishes; on the leader (once it had the time to hear its peers) it also places `--min-nodes`
models that have no instance yet, and moves instances that cannot serve as placed or whose paths
got much slower (placement.review). Whatever the tick remembers between ticks (the last refusal
it noted per model, each runner's last status, a failing instance's failures in a row, the
current alerts) comes in as `Memory` and goes out in the `Decision`; the events to record and
the lines to log come out as data (schema.reasons). The Controller reads, calls this, reconciles
its worker and publishes; nothing here does I/O or reads a clock.

`place` is the placement the API asks for too: a fresh layout for an ask, or every reason there
is none (the card's block, who holds the model, the planner's refusal, preflight).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shoal.placement.addressing import host_of
from shoal.placement.plan import (
    META_NAME,
    files_agree,
    holders,
    instance_from_placement,
    lead,
    model_spec,
    newest_plan,
    pending_auto_places,
    runner_of,
    with_instance,
)
from shoal.placement.planner import Placement, PlacementRequest, plan
from shoal.placement.preflight import preflight
from shoal.placement.review import retry_after, review
from shoal.placement.throughput import Floor, RateWatch, watch
from shoal.schema.reasons import CandidateReason, Reason, Refusal, reason
from shoal.schema.report import (
    AutoPlace,
    ClusterPlan,
    InstanceSpec,
    NodeReport,
    PathStats,
    RunnerState,
)
from shoal.schema.thresholds import Thresholds

FAILED_SETTLE_S = 1.5  # a failed runner's instance moves this long after the leader saw it
# fail: when a peer's node died (the usual cause), it is suspect by then (--suspect-after) and
# the move leaves it out instead of placing the instance on a dead node and again later
LEADER_GRACE_S = 3.0  # a starting node hears its peers' plans before it may lead...
LEADER_HEARD_GRACE_S = 1.0  # ...or this long once a peer's report (and plan) reached it: a
# restarted leader takes its instances back a poll or two after it is up, not 3 s later
SERVING = ("ready", "running")


@dataclass(frozen=True)
class PlaceAsk:
    """What a caller asks placement for (GET /instance/placement, POST /instance, auto)."""

    model_id: str
    sharding: str = "pipeline"
    backend: str = "gloo"
    meta: str = "GlooInstance"
    min_nodes: int = 1
    max_nodes: int | None = None
    nodes: frozenset[str] | None = None  # only these nodes
    allow_blocked: bool = False  # place a model whose card says blocked


@dataclass(frozen=True)
class Config:
    node_id: str  # this node
    leader: str | None  # the leader the view elects now
    started_at: float = 0.0  # when this node's controller started (LEADER_GRACE_S from it)
    heard_peers: bool = False  # a peer's report reached this node since it started
    thresholds: Thresholds = field(default_factory=Thresholds)
    context_tokens: int | None = None  # the KV budget asked for (None: the model's window)
    local_runners: frozenset[str] = frozenset()  # runner ids this node runs (their failures
    # are noted in this node's history)
    floor: Floor = field(default_factory=Floor)  # the throughput floor (--min-throughput-ratio)
    suspects: frozenset[str] = frozenset()  # alive nodes that missed polls: no move onto them


@dataclass(frozen=True)
class Memory:
    """What the tick keeps between ticks; Memory() on a fresh node."""

    auto_refused: Mapping[str, tuple[object, ...]] = field(default_factory=dict)  # model -> key
    runner_status: Mapping[str, str] = field(default_factory=dict)  # runner id -> last status
    failures: Mapping[str, int] = field(default_factory=dict)  # instance -> failures in a row
    alerts: Mapping[str, Reason] = field(default_factory=dict)  # instance -> why it is stuck
    rates: Mapping[str, RateWatch] = field(default_factory=dict)  # instance -> its decode rate
    failed_at: Mapping[str, float] = field(default_factory=dict)  # runner -> first seen failed


@dataclass(frozen=True)
class Note:
    """An event for this node's history: its kind, what it says, and tags to find it by."""

    kind: str
    reason: Reason
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Decision:
    plan: ClusterPlan | None  # the plan to adopt; None when it did not change
    notes: tuple[Note, ...]  # events to record
    logs: tuple[Reason, ...]  # lines to log (good news that is no event)
    memory: Memory  # pass back in on the next tick

    @property
    def alerts(self) -> Mapping[str, Reason]:
        return self.memory.alerts


def decide(
    current: ClusterPlan,
    reports: Sequence[NodeReport],
    runners: Mapping[str, RunnerState],
    cards: Mapping[str, Reason],
    now: float,
    config: Config,
    memory: Memory | None = None,
) -> Decision:
    """One tick. reports: the alive nodes' (ours included); runners: every runner the cluster
    reports, by id; cards: the refusal of each model whose card blocks it."""
    memory = memory or Memory()
    notes: list[Note] = []
    logs: list[Reason] = []
    adopted = newest_plan(current, reports)
    refused = dict(memory.auto_refused)
    failures = dict(memory.failures)
    rates = dict(memory.rates)
    failed_at = {rid: memory.failed_at.get(rid, now) for rid, s in runners.items()
                 if s.status == "failed"}  # fmt: skip
    alerts: dict[str, Reason] = {}
    grace = LEADER_HEARD_GRACE_S if config.heard_peers else LEADER_GRACE_S
    leading = config.leader == config.node_id and now - config.started_at >= grace
    if leading:
        adopted = lead(adopted, config.node_id)
        for want in pending_auto_places(reports, adopted):
            ask = PlaceAsk(want.model_id, want.sharding, want.backend, META_NAME[want.backend],
                           min_nodes=want.min_nodes, allow_blocked=want.allow_blocked)  # fmt: skip
            iid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"shoal:{want.model_id}:{adopted.term}:{now}"))
            result = place(ask, reports, cards, now, config, instance_id=iid)
            if isinstance(result, InstanceSpec):
                logs.append(_auto_placed(want, result))
                refused.pop(want.model_id, None)
                adopted = with_instance(adopted, result)
            elif refused.get(want.model_id) != result.key():  # only what says something new
                refused[want.model_id] = result.key()
                notes.append(
                    Note("refused", _auto_refused(want, result), (("model", want.model_id),))
                )
        adopted = _review_all(
            adopted,
            reports,
            runners,
            cards,
            now,
            config,
            failures,
            alerts,
            notes,
            rates,
            failed_at,
        )
        for iid, why in alerts.items():
            before = memory.alerts.get(iid)
            if before is None or before.key() != why.key():
                notes.append(Note("instance", reason("instance_alert", instance=iid, cause=why),
                                  (("instance", iid),)))  # fmt: skip
    statuses = dict(memory.runner_status)
    for rid, state in sorted(runners.items()):
        if rid not in config.local_runners or statuses.get(rid) == state.status:
            continue
        statuses[rid] = state.status
        if state.status == "failed":
            why = reason("runner_failed", runner=rid, detail=state.reason)
            notes.append(Note("runner_failed", why, (("instance", state.instance_id),)))
    statuses = {rid: s for rid, s in statuses.items() if rid in runners}
    placed = {i.instance_id for i in adopted.instances}
    kept = Memory(
        auto_refused=refused,
        runner_status=statuses,
        failures={iid: n for iid, n in failures.items() if iid in placed},
        alerts=alerts,
        rates={iid: w for iid, w in rates.items() if iid in placed},
        failed_at=failed_at,
    )
    return Decision(adopted if adopted != current else None, tuple(notes), tuple(logs), kept)


def _review_all(
    current: ClusterPlan,
    reports: Sequence[NodeReport],
    runners: Mapping[str, RunnerState],
    cards: Mapping[str, Reason],
    now: float,
    config: Config,
    failures: dict[str, int],
    alerts: dict[str, Reason],
    notes: list[Note],
    rates: dict[str, RateWatch],
    failed_at: Mapping[str, float],
) -> ClusterPlan:
    """Move instances that cannot serve as placed, whose paths got much slower, or whose
    decode rate stays under its floor; one that should move and has nowhere to go becomes an
    alert."""
    for instance in current.instances:
        iid = instance.instance_id
        head = runners.get(runner_of(instance, 0))
        rates[iid], slow = watch(rates.get(iid), instance, head, now, config.floor)
        ranks = [runner_of(instance, rank) for rank in range(len(instance.nodes))]
        if any(now - failed_at.get(rid, -math.inf) < FAILED_SETTLE_S for rid in ranks):
            continue  # just failed: let a dead peer show as suspect first
        if _serving(instance, runners):
            failures.pop(iid, None)
        ask = PlaceAsk(
            instance.model_id,
            instance.sharding,
            instance.backend,
            instance.meta,
            min_nodes=len(instance.nodes),
            max_nodes=len(instance.nodes),
            allow_blocked=True,  # placed once already: moving it is not a new decision
            nodes=frozenset(r.node_id for r in reports) - config.suspects or None,
        )
        result = place(ask, reports, cards, now, config, iid, generation=instance.generation + 1)
        candidate = result if isinstance(result, InstanceSpec) else None
        wait = retry_after(failures.get(iid, 0))
        verdict = review(instance, candidate, reports, runners, now, retry_after_s=wait, slow=slow)
        if verdict.move and candidate is not None and verdict.why is not None:
            moved = candidate.model_copy(update={"reason": verdict.reason})
            current = with_instance(current, moved)
            if verdict.why.code == "rank_failed":
                failures[iid] = failures.get(iid, 0) + 1
            why = reason("moved", nodes=moved.nodes, instance=iid, model=instance.model_id,
                         store=moved.store_address, cause=verdict.why)  # fmt: skip
            notes.append(Note("moved", why, (("instance", iid),)))
        elif verdict.why is not None:
            stuck = isinstance(result, Refusal)
            alerts[iid] = (reason("unmovable", cause=verdict.why, refusal=result)
                           if stuck else verdict.why)  # fmt: skip
    return current


def _serving(instance: InstanceSpec, runners: Mapping[str, RunnerState]) -> bool:
    states = [runners.get(runner_of(instance, rank)) for rank in range(len(instance.nodes))]
    return all(s is not None and s.status in SERVING for s in states)


def _auto_placed(want: AutoPlace, instance: InstanceSpec) -> Reason:
    return reason("auto_placed", nodes=instance.nodes, model=want.model_id,
                  min_nodes=want.min_nodes)  # fmt: skip


def _auto_refused(want: AutoPlace, refusal: Refusal) -> Reason:
    return reason("auto_refused", model=want.model_id, min_nodes=want.min_nodes, refusal=refusal)


def place(
    ask: PlaceAsk,
    reports: Sequence[NodeReport],
    cards: Mapping[str, Reason],
    now: float,
    config: Config,
    instance_id: str,
    generation: int = 0,
    preflight_checks: bool = True,
    fallback: bool = True,
) -> InstanceSpec | Refusal:
    """A fresh layout for the ask from the view, or every reason there is none.

    With preflight_checks, a layout whose paths miss the thresholds is refused with the
    measured numbers (and a better path where one was measured), unless (fallback) the layout
    planned without those paths passes: the next best path, e.g. the VPN when the cable's RTT
    is past its kind's bound."""
    blocked = cards.get(ask.model_id)
    if blocked is not None and not ask.allow_blocked:
        return Refusal((CandidateReason((), blocked),))
    held = holders(reports, ask.model_id)
    if not held:
        known = sorted({m.model_id for r in reports for m in r.models})
        why = reason("not_held", model=ask.model_id, held_models=tuple(known))
        return Refusal((CandidateReason((), why),))
    allowed, differ = files_agree(held)
    extra = list(differ)
    for r in reports:
        if r.node_id not in held and (ask.nodes is None or r.node_id in ask.nodes):
            why = reason("lacks_model", nodes=(r.node_id,), model=ask.model_id)
            extra.append(CandidateReason((r.node_id,), why))
    first = held[next(iter(allowed))]
    window = first.context_length or 4096
    context = min(config.context_tokens or window, window)  # the KV budget per rank
    request = PlacementRequest(
        model=model_spec(first, ask.backend),
        sharding=ask.sharding,  # type: ignore[arg-type]
        backend=ask.backend,  # type: ignore[arg-type]
        min_nodes=ask.min_nodes,
        max_nodes=ask.max_nodes,
        node_filter=frozenset(allowed & ask.nodes if ask.nodes is not None else allowed),
        context_tokens=context,
    )
    result = plan(request, reports, now)
    if isinstance(result, Refusal):
        return Refusal((*extra, *result.reasons))
    assert isinstance(result, Placement)
    by_id = {r.node_id: r for r in reports}
    instance = instance_from_placement(
        result,
        request,
        instance_id=instance_id,
        meta=ask.meta,
        reports=by_id,
        now=now,
        generation=generation,
    )
    if preflight_checks:
        failed = [c for c in preflight(instance, by_id, config.thresholds) if not c.ok]
        if failed:
            refused = Refusal(tuple(CandidateReason(instance.nodes, c.refusal_reason())
                                    for c in failed))  # fmt: skip
            pruned = without_paths(reports, {(c.src, c.dst, c.host) for c in failed})
            if not fallback or pruned == list(reports):
                return refused
            again = place(ask, pruned, cards, now, config, instance_id, generation,
                          preflight_checks, fallback=False)  # fmt: skip
            return again if isinstance(again, InstanceSpec) else refused
    return instance


def without_paths(
    reports: Sequence[NodeReport], paths: set[tuple[str, str, str]]
) -> list[NodeReport]:
    """The reports without any record of these paths (src, dst, the host src dials), from
    either end: placement then plans as if they were not there."""

    def kept(r: NodeReport, p: PathStats) -> bool:
        if p.direction == "inbound":
            return (p.peer_node_id, r.node_id, host_of(p.local_addr or "")) not in paths
        return (r.node_id, p.peer_node_id, host_of(p.peer_addr)) not in paths

    out = []
    for r in reports:
        links = tuple(p for p in r.links if kept(r, p))
        out.append(r if len(links) == len(r.links) else r.model_copy(update={"links": links}))
    return out
