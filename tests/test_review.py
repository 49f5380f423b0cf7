"""When the leader moves an instance (placement.review) and what preflight refuses."""

from __future__ import annotations

import pytest

from shoal.placement.preflight import check_path, preflight
from shoal.placement.review import COOLDOWN_S, UsedPath, review, used_path_rows, used_paths
from shoal.schema.reasons import reason as reason_of
from shoal.schema.report import InstanceSpec, InterfaceKind, NodeReport, PathStats, RunnerState
from shoal.schema.thresholds import Thresholds

NOW = 10_000.0
CABLE, VPN = ("10.0.0.1", "10.0.0.2"), ("100.64.0.1", "100.64.0.2")


def spec(hosts: tuple[str, str] = CABLE, generation: int = 0, age: float = 100.0) -> InstanceSpec:
    return InstanceSpec(
        instance_id="i", model_id="m", nodes=("a", "b"), layer_ranges=((0, 15), (15, 30)),
        store_address=hosts[0], store_port=41000, rank_addresses=hosts,
        created_at=NOW - age, generation=generation,
    )  # fmt: skip


def link(peer: str, host: str, rtt: float | None, failing: bool = False,
         kind: InterfaceKind = InterfaceKind.ETHERNET, loss: float = 0.0,
         p50: float | None = None) -> PathStats:  # fmt: skip
    return PathStats(
        peer_node_id=peer, peer_addr=f"{host}:52415", rtt_ms_ewma=rtt, rtt_ms_p50=p50,
        interface_kind=kind,
        last_success=NOW - (5 if failing else 0.5), last_attempt=NOW - 0.2, loss=loss,
    )  # fmt: skip


def reports(cable_ms: float | None = 0.2, vpn_ms: float = 40.0, cable_failing: bool = False):
    a_links = [link("b", VPN[1], vpn_ms, kind=InterfaceKind.VPN)]
    b_links = [link("a", VPN[0], vpn_ms, kind=InterfaceKind.VPN)]
    if cable_ms is not None:
        a_links.append(link("b", CABLE[1], cable_ms, cable_failing))
        b_links.append(link("a", CABLE[0], cable_ms, cable_failing))
    return [NodeReport(node_id="a", links=tuple(a_links)),
            NodeReport(node_id="b", links=tuple(b_links))]  # fmt: skip


LOOP = ("127.0.0.1", "127.0.0.2")


def loopback(loop_ms: float) -> list[NodeReport]:
    """reports() plus loopback paths between the two (nodes sharing one host, as in tests)."""
    loop = [link("b", LOOP[1], loop_ms, kind=InterfaceKind.LOOPBACK),
            link("a", LOOP[0], loop_ms, kind=InterfaceKind.LOOPBACK)]  # fmt: skip
    both = zip(reports(), loop, strict=True)
    return [r.model_copy(update={"links": (*r.links, x)}) for r, x in both]


def failed(rank: int, generation: int = 0) -> dict[str, RunnerState]:
    rid = f"i-g{generation}-r{rank}"
    return {rid: RunnerState(runner_id=rid, instance_id="i", status="failed", reason="boom")}


def test_used_paths_are_the_ring_and_the_store_paths():
    assert used_paths(spec()) == [UsedPath("a", "b", "10.0.0.2"), UsedPath("b", "a", "10.0.0.1")]
    assert used_paths(spec().model_copy(update={"nodes": ("a",)})) == []


@pytest.mark.parametrize(
    ("instance", "state", "kinds"),
    [
        (spec(CABLE), reports(), ["ethernet", "ethernet"]),
        (spec(VPN), reports(), ["vpn", "vpn"]),
        (spec(CABLE), reports(cable_ms=None), [None, None]),  # nobody measured the cable
        (spec(CABLE), reports()[:1], ["ethernet", None]),  # b's report is gone
    ],
    ids=["cable", "vpn", "unmeasured", "source_report_missing"],
)
def test_used_path_rows_carry_the_kind_the_source_measured(
    instance: InstanceSpec, state: list[NodeReport], kinds: list[str | None]
) -> None:
    rows = used_path_rows(instance, {r.node_id: r for r in state})
    hosts = instance.rank_addresses
    assert rows == [
        {"src": "a", "dst": "b", "host": hosts[1], "kind": kinds[0]},
        {"src": "b", "dst": "a", "host": hosts[0], "kind": kinds[1]},
    ]


@pytest.mark.parametrize(
    ("name", "current", "candidate", "state", "runners", "move", "reason"),
    [
        ("healthy cable stays", spec(), spec(CABLE, 1), reports(), {}, False, ""),
        ("same layout stays", spec(), spec(CABLE, 1), reports(), {}, False, ""),
        ("node gone, no candidate: alert", spec(), None, reports()[:1], {}, False,
         "node b is gone"),
        ("node gone, candidate: move", spec(), spec(VPN, 1), reports()[:1], {}, True,
         "node b is gone"),
        ("failed runner restarts even on the same layout", spec(), spec(CABLE, 1), reports(),
         failed(1), True, "rank 1 failed: boom"),
        ("failed runner waits a little after placing", spec(age=1.0), spec(CABLE, 1), reports(),
         failed(1), False, ""),
        ("cable down -> VPN", spec(), spec(VPN, 1), reports(cable_failing=True), {}, True,
         "at 10.0.0.2 is down"),
        ("cable down, no candidate: alert", spec(), None, reports(cable_failing=True), {}, False,
         "is down"),
        ("back on the cable from the VPN", spec(VPN), spec(CABLE, 1), reports(), {}, True,
         "now takes 40.0 ms; a layout whose slowest path takes 0.2 ms"),
        ("not within the cooldown", spec(VPN, age=COOLDOWN_S / 2), spec(CABLE, 1), reports(), {},
         False, ""),
        ("a small gain is not worth a move", spec(VPN), spec(CABLE, 1),
         reports(cable_ms=20.0, vpn_ms=40.0), {}, False, ""),
        ("a path measured from neither side is not judged", spec(("10.9.9.1", "10.9.9.2")),
         spec(CABLE, 1), reports(), {}, False, ""),
        ("a busy host's slow loopback is no reason to move", spec(LOOP), spec(CABLE, 1),
         loopback(40.0), {}, False, ""),
    ],
)  # fmt: skip
def test_review(name, current, candidate, state, runners, move, reason):
    verdict = review(current, candidate, state, runners, NOW)
    assert verdict.move == move, (name, verdict)
    assert reason in verdict.reason and bool(verdict.reason) == bool(reason), (name, verdict)


SLOW = reason_of("throughput_low", nodes=("a",), floor=0.5,
                 measured={"tok_s": 2.5, "baseline_tok_s": 24.0, "share": 2.5 / 24.0,
                           "serving_s": 30.0})  # fmt: skip


@pytest.mark.parametrize(
    ("name", "current", "candidate", "state", "move", "reason"),
    [
        ("under its floor: moves to the best layout", spec(VPN), spec(CABLE, 1), reports(), True,
         "decodes 2.5 tok/s, 10% of its baseline 24.0 tok/s"),
        ("under its floor on the best layout: a new generation of it", spec(), spec(CABLE, 1),
         reports(), True, "of its baseline 24.0"),
        ("under its floor, nowhere to go: an alert", spec(), None, reports(), False,
         "decodes 2.5 tok/s"),
        ("under its floor within the cooldown: stays", spec(age=COOLDOWN_S / 2), spec(CABLE, 1),
         reports(), False, ""),
        ("a node gone says so first", spec(), spec(VPN, 1), reports()[:1], True,
         "node b is gone"),
    ],
)  # fmt: skip
def test_review_of_a_slow_instance(name, current, candidate, state, move, reason):
    verdict = review(current, candidate, state, {}, NOW, slow=SLOW)
    assert verdict.move == move, (name, verdict)
    assert reason in verdict.reason and bool(verdict.reason) == bool(reason), (name, verdict)


BOUNDS = Thresholds(kind_bound_ms={**Thresholds().kind_bound_ms, InterfaceKind.VPN: 20.0})


@pytest.mark.parametrize(
    ("name", "host", "records", "ok", "message", "better"),
    [
        ("cable passes", "10.0.0.2", [link("b", "10.0.0.2", 0.2)], True, "", ""),
        ("vpn over its bound", "100.64.0.2",
         [link("b", "100.64.0.2", 41.0, kind=InterfaceKind.VPN), link("b", "10.0.0.2", 0.3)],
         False, "RTT 41.0 ms is over the vpn bound 20 ms", "10.0.0.2 (ethernet, RTT 0.3 ms)"),
        ("lossy", "10.0.0.2", [link("b", "10.0.0.2", 0.2, loss=0.8)], False, "loss 80% is over 50%",
         ""),
        ("failing", "10.0.0.2", [link("b", "10.0.0.2", 0.2, failing=True)], False,
         "probes go unanswered", ""),
        ("seen by the other side only", "10.0.0.2", [], True, "measured from the other side", ""),
        # a busy node answered a few probes late: the EWMA jumped, the path did not
        ("late replies, fast path", "10.0.0.2", [link("b", "10.0.0.2", 14.0, p50=0.2)], True, "",
         ""),
        ("slow most of the window", "10.0.0.2", [link("b", "10.0.0.2", 0.2, p50=14.0)], False,
         "RTT 14.0 ms is over the ethernet bound 10 ms", ""),
    ],
)  # fmt: skip
def test_check_path(name, host, records, ok, message, better):
    check = check_path("a", "b", host, records, BOUNDS)
    assert check.ok == ok, (name, check)
    assert message in check.describe(), (name, check.describe())
    assert check.better == better, name


def test_preflight_checks_every_used_path():
    checks = preflight(spec(VPN), {r.node_id: r for r in reports()}, BOUNDS)
    assert [(c.src, c.dst, c.host, c.ok) for c in checks] == [
        ("a", "b", "100.64.0.2", False), ("b", "a", "100.64.0.1", False)]  # fmt: skip
    assert all(c.better.startswith("10.0.0.") for c in checks)
    assert all(c.ok for c in preflight(spec(), {r.node_id: r for r in reports()}, BOUNDS))


@pytest.mark.parametrize(
    ("direction", "last_success", "last_attempt", "failing"),
    [
        ("outbound", NOW - 0.5, NOW - 0.2, False),  # answering
        ("outbound", NOW - 5.0, NOW - 0.2, True),  # answered, then silence while probing
        ("outbound", None, NOW - 0.2, False),  # never answered: unmeasured from this side
        ("outbound", NOW - 5.0, NOW - 4.9, False),  # nobody probes it now: not judged
        ("inbound", NOW - 5.0, NOW - 0.2, False),  # the receiver cannot know
    ],
)
def test_is_failing(direction, last_success, last_attempt, failing):
    from shoal.placement.addressing import is_failing

    p = PathStats(peer_node_id="b", peer_addr="10.0.0.2:1", direction=direction,
                  last_success=last_success, last_attempt=last_attempt)  # fmt: skip
    assert is_failing(p) == failing
