"""The leader's tick as a pure function: scenarios in, the plan, events and memory out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shoal.placement.decide import (
    FAILED_SETTLE_S,
    LEADER_GRACE_S,
    LEADER_HEARD_GRACE_S,
    Config,
    Decision,
    Memory,
    PlaceAsk,
    decide,
    place,
)
from shoal.placement.review import COOLDOWN_S, RETRY_AFTER_S
from shoal.schema.reasons import Refusal, reason, render
from shoal.schema.report import (
    AutoPlace,
    ClusterPlan,
    HeldModel,
    InstanceSpec,
    InterfaceKind,
    NodeReport,
    PathStats,
    Resources,
    RunnerState,
)
from shoal.schema.thresholds import Thresholds

NOW = 10_000.0
GIB = 1024**3
CABLE = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}
VPN = {"a": "100.64.0.1", "b": "100.64.0.2", "c": "100.64.0.3"}
MODEL = HeldModel(model_id="m", num_layers=12, hidden_size=512, num_heads=8, num_kv_heads=2,
                  head_dim=64, weight_bytes=2 * GIB, context_length=1024)  # fmt: skip
WANT = AutoPlace(model_id="m", min_nodes=2)
EMPTY = ClusterPlan()
LEADER = Config(node_id="a", leader="a")  # started long ago


def link(peer: str, host: str, rtt: float, kind: InterfaceKind, failing: bool) -> PathStats:
    return PathStats(
        peer_node_id=peer, peer_addr=f"{host}:52415", rtt_ms_ewma=rtt, rtt_ms_p50=rtt,
        interface_kind=kind, last_success=NOW - (5 if failing else 0.5), last_attempt=NOW - 0.2,
    )  # fmt: skip


def node(
    name: str,
    peers: str = "ab",
    ram_gib: float = 16.0,
    holds: bool = True,
    cable: bool = True,
    cable_failing: bool = False,
) -> NodeReport:
    links = []
    for peer in (p for p in peers if p != name):
        links.append(link(peer, VPN[peer], 40.0, InterfaceKind.VPN, False))
        if cable:
            links.append(link(peer, CABLE[peer], 0.2, InterfaceKind.ETHERNET, cable_failing))
    return NodeReport(
        node_id=name, links=tuple(links), resources=Resources(ram_available=int(ram_gib * GIB)),
        models=(MODEL,) if holds else (), auto_place=(WANT,) if holds else (),
    )  # fmt: skip


def pair(**kw: object) -> list[NodeReport]:
    return [node("a", **kw), node("b", **kw)]  # type: ignore[arg-type]


def tick(
    reports: list[NodeReport],
    current: ClusterPlan = EMPTY,
    runners: dict[str, RunnerState] | None = None,
    now: float = NOW,
    config: Config = LEADER,
    memory: Memory | None = None,
) -> Decision:
    return decide(current, reports, runners or {}, {}, now, config, memory)


def placed(reports: list[NodeReport], age: float = 100.0) -> ClusterPlan:
    """The plan the leader writes for `m` on these reports, `age` seconds before NOW."""
    plan = tick(reports, now=NOW - age).plan
    assert plan is not None and len(plan.instances) == 1, plan
    return plan


def aged(plan: ClusterPlan | None, age: float) -> ClusterPlan:
    """The plan with its instances placed `age` seconds before NOW."""
    assert plan is not None
    older = tuple(i.model_copy(update={"created_at": NOW - age}) for i in plan.instances)
    return plan.model_copy(update={"instances": older})


def only(plan: ClusterPlan | None) -> InstanceSpec:
    assert plan is not None
    (instance,) = plan.instances
    return instance


def failed(instance: InstanceSpec, rank: int) -> dict[str, RunnerState]:
    rid = f"{instance.instance_id}-g{instance.generation}-r{rank}"
    return {rid: RunnerState(runner_id=rid, instance_id=instance.instance_id, status="failed",
                             reason="boom")}  # fmt: skip


def texts(decision: Decision) -> list[tuple[str, str]]:
    return [(n.kind, render(n.reason)) for n in decision.notes]


# ---- placing --min-nodes models ----------------------------------------------------------------


def test_the_leader_places_a_min_nodes_model_once_enough_nodes_hold_it() -> None:
    decision = tick(pair())
    instance = only(decision.plan)
    assert instance.nodes == ("a", "b") and instance.store_address.startswith("10.0.0.")
    assert decision.notes == ()  # good news is a log line, not an event
    assert [render(r) for r in decision.logs] == ["placed m on a, b (auto, --min-nodes 2)"]
    assert only(decision.plan).generation == 0


@pytest.mark.parametrize(
    ("name", "config", "now"),
    [
        ("a follower places nothing", Config(node_id="b", leader="a"), NOW),
        ("a leader that just started waits to hear its peers",
         Config(node_id="a", leader="a", started_at=NOW - LEADER_GRACE_S / 2), NOW),
    ],
)  # fmt: skip
def test_only_a_settled_leader_decides(name: str, config: Config, now: float) -> None:
    decision = tick(pair(), config=config, now=now)
    assert decision.plan is None and decision.notes == (), name


@pytest.mark.parametrize(
    ("name", "heard", "since", "leads"),
    [
        ("heard nobody yet: the full grace", False, LEADER_HEARD_GRACE_S, False),
        ("heard nobody: leads after the full grace", False, LEADER_GRACE_S, True),
        ("heard a peer (its plan adopted): leads sooner", True, LEADER_HEARD_GRACE_S, True),
        ("heard a peer, but just started", True, LEADER_HEARD_GRACE_S / 2, False),
    ],
)
def test_a_leader_that_heard_its_peers_leads_sooner(
    name: str, heard: bool, since: float, leads: bool
) -> None:
    config = Config(node_id="a", leader="a", started_at=NOW - since, heard_peers=heard)
    decision = tick(pair(), config=config)
    assert (decision.plan is not None) == leads, name


def test_a_follower_adopts_the_newest_plan_it_sees() -> None:
    theirs = placed(pair())
    reports = [r.model_copy(update={"plan": theirs}) if r.node_id == "a" else r for r in pair()]
    decision = tick(reports, config=Config(node_id="b", leader="a"))
    assert decision.plan == theirs


def test_a_refused_auto_place_is_noted_once_while_nothing_new_is_said() -> None:
    small = pair(ram_gib=1.0)  # neither node has room for 2 GiB of weights
    first = tick(small)
    assert first.plan is not None and first.plan.instances == ()  # led, nothing placed
    ((kind, text),) = texts(first)
    assert kind == "refused"
    assert text.startswith("waiting to place m (--min-nodes 2): [a, b] node a has 1.0 GiB")
    memory = first.memory
    for ram in (1.0, 1.2, 0.9):  # the measured numbers move every tick; the refusal does not
        again = tick(pair(ram_gib=ram), current=first.plan, memory=memory)
        assert again.notes == (), ram
        memory = again.memory
    other = tick([node("a", ram_gib=1.0), node("b", holds=False)], first.plan, memory=memory)
    assert [k for k, _ in texts(other)] == ["refused"]  # b lacks the model: something new
    assert "node b does not hold m" in texts(other)[0][1]
    done = tick(pair(), current=first.plan, memory=other.memory)
    assert only(done.plan).nodes == ("a", "b") and "m" not in done.memory.auto_refused


def test_a_blocked_card_refuses_unless_the_ask_allows_it() -> None:
    block = {"m": reason("blocked", model="m", status_note="drifts", source="")}
    decision = decide(ClusterPlan(), pair(), {}, block, NOW, LEADER)
    ((kind, text),) = texts(decision)
    assert kind == "refused" and "m is blocked by its model card (drifts)" in text
    anyway = (WANT.model_copy(update={"allow_blocked": True}),)
    allowed = [r.model_copy(update={"auto_place": anyway}) for r in pair()]
    assert only(decide(ClusterPlan(), allowed, {}, block, NOW, LEADER).plan).model_id == "m"


# ---- reviewing placed instances ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reports", "age", "moves", "reason_code", "says"),
    [
        ("healthy stays", pair(), 100.0, False, None, ""),
        ("a path down moves to the VPN", pair(cable_failing=True), 100.0, True, "path_down",
         "at 10.0.0.2 is down"),
        ("a node gone with nowhere to go is an alert", [node("a")], 100.0, False, "unmovable",
         "node b is gone; no other layout: "),
        ("a node gone moves to a third node", [node("a", "abc"), node("c", "abc")], 100.0, True,
         "node_gone", "node b is gone"),
    ],
)  # fmt: skip
def test_review_in_the_tick(name, reports, age, moves, reason_code, says) -> None:
    plan = placed(pair(), age)
    decision = tick(reports, current=plan)
    if moves:
        moved = only(decision.plan)
        assert moved.generation == 1 and says in moved.reason, (name, moved)
        ((kind, text),) = texts(decision)
        assert kind == "moved" and says in text, (name, text)
        assert decision.notes[0].reason.fact("cause").code == reason_code
    else:
        assert decision.plan is None or only(decision.plan).generation == 0, name
    if reason_code == "unmovable":
        (alert,) = decision.alerts.values()
        assert alert.code == "unmovable" and says in render(alert), name
        assert [k for k, _ in texts(decision)] == ["instance"]
        again = tick(reports, current=decision.plan or plan, memory=decision.memory)
        assert again.notes == () and again.alerts == decision.alerts, name  # said once
    elif not moves:
        assert decision.notes == () and decision.alerts == {}, name


def test_a_3x_slower_layout_is_replaced_only_after_the_cooldown() -> None:
    on_vpn = placed(pair(cable=False), age=COOLDOWN_S / 2)
    assert only(on_vpn).store_address.startswith("100.64.")
    early = tick(pair(), current=on_vpn)  # the cable is back, but the instance is new
    assert early.plan is None or only(early.plan).generation == 0
    later = tick(pair(), current=aged(on_vpn, COOLDOWN_S))
    moved = only(later.plan)
    assert moved.generation == 1 and moved.store_address.startswith("10.0.0.")
    assert "now takes 40.0 ms; a layout whose slowest path takes 0.2 ms" in moved.reason


def test_a_failed_runner_is_retried_after_its_backoff_and_not_before() -> None:
    plan = placed(pair(), age=RETRY_AFTER_S / 2)
    instance = only(plan)
    soon = tick(pair(), plan, failed(instance, 1), memory=settled(Memory(), failed(instance, 1)))
    assert soon.plan is None or only(soon.plan).generation == 0  # not before the backoff
    plan = aged(plan, RETRY_AFTER_S)
    retry = tick(pair(), plan, failed(instance, 1), memory=soon.memory)
    second = only(retry.plan)
    assert second.generation == 1 and "rank 1 failed: boom" in second.reason
    assert retry.memory.failures == {instance.instance_id: 1}
    # failed again: the wait doubles (a persistent failure backs off)
    runners = failed(second, 0)
    older = aged(retry.plan, 1.5 * RETRY_AFTER_S)
    waiting = tick(pair(), older, runners, memory=retry.memory)
    assert waiting.plan is None or only(waiting.plan).generation == 1
    older = aged(retry.plan, 2 * RETRY_AFTER_S)
    third = tick(pair(), older, runners, memory=settled(waiting.memory, runners))
    assert only(third.plan).generation == 2
    assert third.memory.failures == {instance.instance_id: 2}
    # once every rank serves, the count starts over
    g2 = only(third.plan)
    serving = {f"{g2.instance_id}-g2-r{r}": RunnerState(runner_id=f"{g2.instance_id}-g2-r{r}",
               instance_id=g2.instance_id, status="ready") for r in (0, 1)}  # fmt: skip
    healthy = tick(pair(), third.plan, serving, memory=third.memory)
    assert healthy.memory.failures == {}


def settled(memory: Memory, runners: dict[str, RunnerState]) -> Memory:
    """The memory of a leader that saw these runners fail long enough ago."""
    return replace(memory, failed_at={**memory.failed_at,
                                      **dict.fromkeys(runners, NOW - FAILED_SETTLE_S)})  # fmt: skip


def test_a_failed_runner_waits_for_a_dead_peer_to_show_and_never_moves_onto_it() -> None:
    plan = placed(pair(), age=100.0)
    instance = only(plan)
    runners = failed(instance, 0)  # b's rank 0 died with b
    first = tick(pair(), plan, runners)  # a moment after: b still looks alive
    assert first.plan is None and first.alerts == {}  # not yet: nothing placed on a dead node
    assert first.memory.failed_at == dict.fromkeys(runners, NOW)
    later = FAILED_SETTLE_S
    suspect = Config(node_id="a", leader="a", suspects=frozenset({"b"}))
    stuck = tick(pair(), plan, runners, NOW + later, suspect, first.memory)
    assert stuck.plan is None or only(stuck.plan).generation == 0  # b missed polls: not onto b
    (alert,) = stuck.alerts.values()
    assert alert.code == "unmovable" and alert.fact("cause").code == "rank_failed"
    back = tick(pair(), plan, runners, NOW + later + 5, LEADER, stuck.memory)  # b answers again
    assert only(back.plan).generation == 1  # a fresh layout, both nodes alive


def test_a_local_runner_failure_is_noted_once() -> None:
    rid = "i-g0-r0"
    state = RunnerState(runner_id=rid, instance_id="i", status="failed", reason="out of memory")
    config = Config(node_id="b", leader="a", local_runners=frozenset({rid}))
    first = tick(pair(), runners={rid: state}, config=config)
    assert texts(first) == [("runner_failed", "runner i-g0-r0 failed: out of memory")]
    assert dict(first.notes[0].tags) == {"instance": "i"}
    again = tick(pair(), runners={rid: state}, config=config, memory=first.memory)
    assert again.notes == ()
    elsewhere = tick(pair(), runners={rid: state}, config=Config(node_id="b", leader="a"))
    assert elsewhere.notes == ()  # another node's runner: its own history says it


# ---- the throughput floor (placement.throughput) -----------------------------------------------


def serving(instance: InstanceSpec, tokens: int, tok_s: float | None) -> dict[str, RunnerState]:
    """Both ranks up; rank 0 has generated `tokens` so far at `tok_s` (None: idle)."""
    states = {}
    for rank in range(len(instance.nodes)):
        rid = f"{instance.instance_id}-g{instance.generation}-r{rank}"
        status = "running" if tok_s is not None else "ready"
        head = {"tokens": tokens, "tok_s": tok_s} if rank == 0 else {}
        states[rid] = RunnerState(runner_id=rid, instance_id=instance.instance_id, rank=rank,
                                  status=status, **head)  # fmt: skip
    return states


def serve(plan: ClusterPlan, rates: list[float | None], start: float, memory: Memory | None = None):
    """A tick every 2 s from `start` with rank 0 at each rate (None: idle); the decisions."""
    decisions, tokens = [], 0
    for i, rate in enumerate(rates):
        tokens += 0 if rate is None else 10
        decision = tick(pair(), plan, serving(only(plan), tokens, rate), start + 2 * i,
                        memory=memory)  # fmt: skip
        memory, plan = decision.memory, decision.plan or plan
        decisions.append(decision)
    return decisions


@pytest.mark.parametrize(
    ("name", "rates", "moves_at"),
    [
        ("under the floor for 30 s of serving: moved", [24.0] * 3 + [2.5] * 20, 18),
        ("under it only briefly: stays", [24.0] * 3 + [2.5] * 5 + [24.0] * 15, None),
        ("idle: no samples, stays", [24.0] * 3 + [None] * 40, None),
        (
            "slow, idle for long, slow again: the serving seconds add up",
            [24.0] * 3 + [2.5] * 10 + [None] * 30 + [2.5] * 10,
            49,
        ),
    ],
)
def test_an_instance_under_its_throughput_floor_is_moved(name, rates, moves_at) -> None:
    plan = placed(pair(), age=1000.0)
    decisions = serve(plan, rates, NOW - 200)
    moved = [i for i, d in enumerate(decisions) if d.plan and only(d.plan).generation == 1]
    assert (moved[0] if moved else None) == moves_at, name
    if moves_at is not None:
        decision = decisions[moves_at]
        assert "decodes 2.5 tok/s, 10% of its baseline 24.0 tok/s (floor 50%)" in only(
            decision.plan).reason  # fmt: skip
        ((kind, text),) = texts(decision)
        cause = decision.notes[0].reason.fact("cause")
        assert kind == "moved" and cause.code == "throughput_low", text
        assert cause.number("baseline_tok_s") == 24.0 and cause.number("serving_s") >= 30.0


def test_after_the_move_the_new_baseline_is_used() -> None:
    plan = placed(pair(), age=1000.0)
    first = serve(plan, [24.0] * 3 + [2.5] * 16, NOW - 200)
    moved = first[-1]
    assert moved.plan is not None and only(moved.plan).generation == 1
    # the new generation runs at 2.5 tok/s from the start: its baseline, not a reason to move
    again = serve(aged(moved.plan, 500.0), [2.5] * 40, NOW - 100, moved.memory)
    assert all(d.plan is None or only(d.plan).generation == 1 for d in again)
    assert all(d.alerts == {} for d in again)


# ---- preflight's fallback: the next best path --------------------------------------------------


def slow_cable(cable_ms: float) -> list[NodeReport]:
    """pair() with the cable measured at cable_ms (past its ethernet bound when over 10 ms)."""
    out = []
    for r in pair():
        links = tuple(
            p.model_copy(update={"rtt_ms_ewma": cable_ms, "rtt_ms_p50": cable_ms})
            if p.interface_kind == InterfaceKind.ETHERNET
            else p
            for p in r.links
        )
        out.append(r.model_copy(update={"links": links}))  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("name", "cable_ms", "vpn_bound", "hosts"),
    [
        ("the cable within its bound: the cable", 0.2, 200.0, "10.0.0."),
        ("the cable past its bound: the VPN, within its own", 30.0, 200.0, "100.64.0."),
        ("both past their bounds: refused, naming the cable", 30.0, 20.0, None),
    ],
)
def test_a_path_preflight_refuses_gives_way_to_the_next(name, cable_ms, vpn_bound, hosts):
    bounds = {**Thresholds().kind_bound_ms, InterfaceKind.VPN: vpn_bound}
    config = Config(node_id="a", leader="a", thresholds=Thresholds(kind_bound_ms=bounds))
    result = place(PlaceAsk("m", min_nodes=2), slow_cable(cable_ms), {}, NOW, config, "i")
    if hosts is None:
        assert isinstance(result, Refusal), name
        assert "RTT 30.0 ms is over the ethernet bound 10 ms" in render(result), render(result)
    else:
        assert isinstance(result, InstanceSpec), (name, result)
        assert all(h.startswith(hosts) for h in (result.store_address, *result.rank_addresses))
