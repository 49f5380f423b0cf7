"""Reasons as data (one renderer, dedup by code and fields) and the controller's thin loop."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from shoal.cluster.events import EventLog
from shoal.control import Controller
from shoal.schema.reasons import PathRef, Refusal, parts, reason, refusal, render
from shoal.schema.report import ClusterPlan, NodeReport, RunnerState
from shoal.schema.thresholds import Thresholds


def check(rtt: float, loss: float, host: str = "10.0.0.2"):
    path = PathRef("a", "b", host)
    problem = reason("rtt_over_bound", path=path, measured={"rtt_ms": rtt, "bound_ms": 5.0},
                     kind="ethernet")  # fmt: skip
    return reason("preflight", nodes=("a", "b"), path=path, check=reason(
        "path_check", nodes=("a", "b"), path=path, measured={"rtt_ms": rtt, "loss": loss},
        kind="ethernet", problem=problem))  # fmt: skip


def memory(have: float):
    numbers = dict(have_gib=have, need_gib=3.0, weights_gib=2.0, kv_gib=0.5, headroom_gib=0.5)
    return reason("memory", nodes=("a",), measured=numbers)


# two refusals with one key are noted once: measured numbers move every tick, the rest does not
SAME = {
    "rtt_moves": (check(5.3, 0.0), check(6.1, 0.1)),
    "memory_moves": (memory(1.2), memory(1.4)),
}
DIFFERENT = {
    "another_address": (check(5.3, 0.0), check(5.3, 0.0, host="10.0.0.3")),
    "another_count": (reason("too_few_nodes", needed=2, alive=1),
                      reason("too_few_nodes", needed=3, alive=1)),
    "another_reason": (reason("not_held", model="m"),
                       reason("blocked", model="m", status_note="", source="")),
}  # fmt: skip


@pytest.mark.parametrize(("a", "b"), SAME.values(), ids=SAME)
def test_reasons_that_differ_only_in_measurements_share_a_key(a, b) -> None:
    assert a.key() == b.key() and a != b
    assert refusal(a).key() == refusal(b).key()


@pytest.mark.parametrize(("a", "b"), DIFFERENT.values(), ids=DIFFERENT)
def test_reasons_that_say_something_new_do_not(a, b) -> None:
    assert a.key() != b.key()


@pytest.mark.parametrize(
    ("why", "text"),
    [
        (check(5.3, 0.0), "preflight: a -> b at 10.0.0.2 (ethernet, RTT 5.3 ms, loss 0%): "
                          "RTT 5.3 ms is over the ethernet bound 5 ms"),
        (memory(1.2), "node a has 1.2 GiB available, needs 3.0 GiB "
                      "(weights 2.0 + KV 0.5 + headroom 0.5)"),
        (reason("too_few_nodes", nodes=("a",), needed=2, alive=1, cuda=True),
         "needs >= 2 nodes, 1 alive with a CUDA GPU"),
        (reason("no_path", nodes=("b", "a"), path=PathRef("b", "a"), measured={"losses": (1.0,)},
                hosts=("10.0.0.1",)), "no working path b -> a (measured: 10.0.0.1 loss 100%)"),
        (reason("no_common_address", nodes=("a", "b", "c")),
         "no single address of a is reachable from all of ['b', 'c']"),
        (reason("not_held", model="m", held_models=()), "no alive node holds m; held models: none"),
        (reason("node_gone", nodes=("0123456789ab", "fedcba987654")),
         "node 01234567, fedcba98 is gone"),
        (reason("unknown_code_from_a_newer_peer"), "unknown_code_from_a_newer_peer"),
    ],
)  # fmt: skip
def test_one_renderer_writes_the_sentences(why, text) -> None:
    assert render(why) == text


def test_a_refusal_prefixes_each_reason_with_its_node_set() -> None:
    text = Refusal().text()
    assert text == "no candidate node set"
    both = refusal(reason("node_not_alive", nodes=("z",)), nodes=("a", "z"))
    assert both.text() == "[a, z] node z is not alive"


def test_parts_mark_the_nodes_a_sentence_names() -> None:
    moved = reason("moved", nodes=("0123456789ab",), instance="i", model="m", store="10.0.0.1",
                   cause=reason("node_gone", nodes=("fedcba987654",)))  # fmt: skip
    assert render(moved, {"0123456789ab": "node-a"}) == (
        "instance i (m) re-placed on node-a at 10.0.0.1: node fedcba98 is gone"
    )
    a, b = {"node": "0123456789ab"}, {"node": "fedcba987654"}
    assert parts(moved) == ["instance i (m) re-placed on ", a, " at 10.0.0.1: node ", b, " is gone"]
    joined = reason("member_joined", nodes=("0123456789ab",))
    assert render(joined, {"0123456789ab": "b"}) == "node b (01234567) joined"
    assert parts(joined) == ["node ", {"node": "0123456789ab"}, " joined"]  # one name, no id


# ---- the loop: read, decide, reconcile, publish -----------------------------------------------


class FakeWorker:
    def __init__(self) -> None:
        self.models: dict = {}
        self.reconciled: list[ClusterPlan] = []
        self.runners: tuple[RunnerState, ...] = ()

    def states(self) -> tuple[RunnerState, ...]:
        return self.runners

    def reconcile(self, plan: ClusterPlan) -> None:
        self.reconciled.append(plan)


def fake_service(reports: list[NodeReport], events: EventLog) -> SimpleNamespace:
    view = SimpleNamespace(
        leader=lambda own: reports[0].node_id,
        alive_reports=lambda own: reports,
        report_of=lambda n: next((r for r in reports if r.node_id == n), None),
        suspects=lambda: [],
    )
    return SimpleNamespace(
        identity=SimpleNamespace(node_id=reports[0].node_id), view=view, report=reports[0],
        events=events, settings=SimpleNamespace(thresholds=Thresholds()),
        refresh_report=lambda: None,
    )  # fmt: skip


def test_the_controller_ticks_through_decide_and_records_its_events(tmp_path: Path) -> None:
    rid = "i-g0-r0"
    reports = [NodeReport(node_id="0123456789ab", name="a")]
    events = EventLog(tmp_path, "boot")
    worker = FakeWorker()
    worker.runners = (RunnerState(runner_id=rid, instance_id="i", status="failed", reason="oom"),)
    controller = Controller(fake_service(reports, events), worker)  # type: ignore[arg-type]
    controller.tick()
    controller.tick()
    (event,) = events.recent()
    assert (event["kind"], event["message"], event["instance"]) == (
        "runner_failed",
        "runner i-g0-r0 failed: oom",
        "i",
    )
    assert event["code"] == "runner_failed" and event["facts"]["runner"] == rid
    assert event["parts"] == ["runner i-g0-r0 failed: oom"]
    assert worker.reconciled and controller.alerts == {}
    controller.note("refused", "POST /instance of m: no", model="m")  # the API's plain notes
    assert events.recent()[-1]["message"] == "POST /instance of m: no"
