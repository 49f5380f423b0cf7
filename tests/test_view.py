"""The cluster view: merge rule, liveness timelines on a fake clock, leader, drift, /state."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from documents import undeclared
from pydantic import BaseModel

from shoal.cluster.view import (
    ClusterView,
    PeerStatus,
    Timing,
    choose_leader,
    drift_warnings,
    is_newer,
    links_document,
    membership_changes,
    nodes_document,
    state_document,
)
from shoal.schema.documents import LinksDocument, NodesDocument, StateDocument
from shoal.schema.report import InterfaceInfo, InterfaceKind, NodeReport, PathStats, Resources

NS = "ns-ours"
T0 = 1000.0  # the fake clock starts here


def report(
    node_id: str, *, boot: str = "boot1", started: float = 100.0, seq: int = 1, **kw: Any
) -> NodeReport:
    kw.setdefault("name", node_id)
    kw.setdefault("namespace_hash", NS)
    return NodeReport(node_id=node_id, boot_id=boot, boot_started=started, seq=seq, **kw)


def path(peer: str, peer_addr: str | None, local_addr: str | None, **kw: Any) -> PathStats:
    kw.setdefault("last_success", T0 - 0.5)
    kw.setdefault("rtt_ms_ewma", 0.4)
    kw.setdefault("interface_kind", InterfaceKind.ETHERNET)
    return PathStats(peer_node_id=peer, peer_addr=peer_addr, local_addr=local_addr, **kw)


def view_of(*peers: NodeReport, now: float = T0, **kw: Any) -> ClusterView:
    view = ClusterView("a", NS, self_boot_id="boot-a", **kw)
    for peer in peers:
        assert view.accept(peer, now)
    return view


ME = report("a", boot="boot-a", joined_at=10.0)


# --- merge rule --------------------------------------------------------------------------------


# (boot_id, boot_started, seq) of the candidate and of the report held
NEWER_CASES = {
    "first_report": (("boot1", 100, 1), None, True),
    "older_seq_same_boot": (("boot1", 100, 4), ("boot1", 100, 5), False),
    "same_seq": (("boot1", 100, 5), ("boot1", 100, 5), False),
    "newer_seq_same_boot": (("boot1", 100, 6), ("boot1", 100, 5), True),
    "new_boot_smaller_seq": (("boot2", 200, 1), ("boot1", 100, 90), True),
    "older_boot_larger_seq": (("boot1", 100, 90), ("boot2", 200, 1), False),
}


@pytest.mark.parametrize(("candidate", "held", "newer"), NEWER_CASES.values(), ids=NEWER_CASES)
def test_is_newer(candidate: tuple, held: tuple | None, newer: bool) -> None:
    def make(boot: str, started: float, seq: int) -> NodeReport:
        return report("b", boot=boot, started=started, seq=seq)

    assert is_newer(make(*candidate), make(*held) if held else None) is newer


def test_older_report_never_overwrites_the_held_one() -> None:
    view = view_of(report("b", seq=5))
    assert not view.accept(report("b", seq=4, version="old"), T0 + 0.1)
    assert view.peers["b"].report.seq == 5


# --- liveness timelines -----------------------------------------------------------------------


# Peer b as this node sees it, steps of "seconds-after-T0 event status-afterwards".
# poll: b answers with the report we hold; newer: b's seq moved; restart: a new boot of b;
# miss: a failed poll; tick: only the clock moves; goodbye / old_goodbye: of the current / 1st boot
TIMELINES = {
    "silent_peer_goes_suspect_then_gone": "0.5 miss alive, 1.5 miss suspect, 2.5 miss gone",
    "answered_poll_keeps_it_alive": "0.5 miss alive, 1.5 poll alive, 2.5 tick alive, 3.7 tick gone",
    "gone_by_silence_comes_back_when_it_answers": "9 tick gone, 9.5 poll alive",
    "rejoin_after_restart": "9 tick gone, 9.5 restart alive",
    "goodbye_is_gone_at_once": "0.1 goodbye gone",
    "after_goodbye_only_a_newer_report_revives": "0.1 goodbye gone, 0.5 poll gone, 1 newer alive",
    "stale_goodbye_spares_the_restart": "0.5 restart alive, 1 old_goodbye alive, 1.5 goodbye gone",
    "shutdown_notice_in_report_is_gone_at_once": "0.2 shutting_down gone",
}


@pytest.mark.parametrize("steps", TIMELINES.values(), ids=TIMELINES)
def test_liveness_timeline(steps: str) -> None:
    view = view_of(report("b"))
    boot, started, seq = "boot1", 100.0, 1
    for step in steps.split(", "):
        offset, event, expected = step.split()
        now = T0 + float(offset)
        if event in ("newer", "shutting_down"):
            seq += 1
        if event == "restart":
            boot, started, seq = "boot2", now, 1
        current = report("b", boot=boot, started=started, seq=seq)
        if event in ("poll", "newer", "restart"):
            view.accept(current, now)
        elif event == "shutting_down":
            view.accept(current.model_copy(update={"shutting_down": True}), now)
        elif event == "miss":
            view.miss("b", now)
        elif event in ("goodbye", "old_goodbye"):
            view.goodbye("b", boot if event == "goodbye" else "boot1")
        view.refresh(now)
        assert view.peers["b"].status == expected, step
        assert view.alive() == (["a"] if expected == "gone" else ["a", "b"])


def test_gone_reason_says_why() -> None:
    view = view_of(report("b"), report("c"))
    for offset in (1.0, 2.0, 4.5):
        view.miss("b", T0 + offset)
    view.goodbye("c", "boot1")
    assert view.peers["b"].gone_reason == "no report for 4.5 s (3 missed polls)"
    assert view.peers["c"].gone_reason == "said goodbye"


def test_suspect_counts_as_alive_for_leadership_but_is_flagged() -> None:
    view = view_of(report("b", joined_at=1.0))
    assert view.refresh(T0 + 1.5) == {"b": PeerStatus.SUSPECT}
    assert view.alive() == ["a", "b"] and view.suspects() == ["b"]
    assert view.leader(ME) == "b"


def test_refresh_reports_only_changes_on_the_configured_timing() -> None:
    view = view_of(report("b"), timing=Timing(suspect_after=10.0, gone_after=20.0))
    assert view.refresh(T0 + 5.0) == {}
    assert view.refresh(T0 + 11.0) == {"b": PeerStatus.SUSPECT}
    assert view.refresh(T0 + 21.0) == {"b": PeerStatus.GONE}
    assert view.refresh(T0 + 30.0) == {}


A, S, G = PeerStatus.ALIVE, PeerStatus.SUSPECT, PeerStatus.GONE

# (statuses before, statuses after) -> membership events
MEMBERSHIP_CASES = {
    "first_seen": ({}, {"b": A}, [("b", "node_joined")]),
    "unchanged": ({"b": A}, {"b": A}, []),
    "suspect_is_still_a_member": ({"b": A}, {"b": S}, []),
    "suspect_recovers": ({"b": S}, {"b": A}, []),
    "alive_to_gone": ({"b": A}, {"b": G}, [("b", "node_gone")]),
    "suspect_to_gone": ({"b": S}, {"b": G}, [("b", "node_gone")]),
    "stays_gone": ({"b": G}, {"b": G}, []),
    "back_after_gone": ({"b": G}, {"b": A}, [("b", "node_joined")]),
    "first_seen_gone": ({}, {"b": G}, []),
    "several_at_once": (
        {"b": A, "c": G},
        {"b": G, "c": A, "d": A},
        [("b", "node_gone"), ("c", "node_joined"), ("d", "node_joined")],
    ),
}


@pytest.mark.parametrize(
    ("before", "after", "events"), MEMBERSHIP_CASES.values(), ids=MEMBERSHIP_CASES
)
def test_membership_changes(
    before: dict[str, PeerStatus], after: dict[str, PeerStatus], events: list[tuple[str, str]]
) -> None:
    assert membership_changes(before, after) == events


def test_membership_follows_a_liveness_timeline() -> None:
    view = view_of()
    seen: list[tuple[str, str]] = []
    statuses: dict[str, PeerStatus] = {}

    def tick(now: float) -> None:
        nonlocal statuses
        view.refresh(now)
        after = {n: p.status for n, p in view.peers.items()}
        seen.extend(membership_changes(statuses, after))
        statuses = after

    view.accept(report("b"), T0)
    tick(T0)
    tick(T0 + 3.0)  # suspect
    tick(T0 + 5.0)  # gone
    view.accept(report("b", boot="boot2", started=200.0), T0 + 6.0)
    tick(T0 + 6.0)
    assert seen == [("b", "node_joined"), ("b", "node_gone"), ("b", "node_joined")]


@pytest.mark.parametrize("suspect_after, gone_after", [(4.0, 2.0), (2.0, 2.0), (0.0, 1.0)])
def test_timing_refuses_nonsense(suspect_after: float, gone_after: float) -> None:
    with pytest.raises(ValueError):
        Timing(suspect_after=suspect_after, gone_after=gone_after)


def test_goodbye_or_miss_of_an_unknown_node_is_ignored() -> None:
    view = view_of()
    view.miss("zz", T0)
    assert not view.goodbye("zz", "boot1") and view.peers == {}


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("foreign", "reason"),
    [
        pytest.param(report("x", namespace_hash="ns-theirs"), "namespace", id="other_namespace"),
        pytest.param(report("x", protocol=2), "protocol 2", id="other_protocol_major"),
        pytest.param(report("a", boot="boot-elsewhere"), "node.json", id="copied_node_id"),
    ],
)
def test_refused_reports_are_counted_with_a_reason(foreign: NodeReport, reason: str) -> None:
    view = view_of()
    assert not view.accept(foreign, T0)
    assert not view.accept(foreign, T0 + 1.0)
    assert "x" not in view.peers and view.alive() == ["a"]
    refusal = view.refused[foreign.node_id]
    assert reason in refusal.reason and refusal.count == 2
    assert (refusal.first_at, refusal.last_at) == (T0, T0 + 1.0)
    assert state_document(view, ME, T0 + 1.0)["refused"][0]["reason"] == refusal.reason


def test_refusals_are_bounded_and_keep_the_latest() -> None:
    view = view_of(timing=Timing(refused_kept=2))
    for i in range(4):
        view.accept(report(f"x{i}", namespace_hash="other"), T0 + i)
    assert sorted(view.refused) == ["x2", "x3"]


def test_own_report_is_held_but_never_a_peer() -> None:
    view = view_of()
    assert not view.accept(ME, T0)
    assert view.report_of("a") == ME and view.peers == {} and view.refused == {}


# --- leader -----------------------------------------------------------------------------------


def nodes(*fields: dict[str, Any]) -> list[NodeReport]:
    """Reports of nodes b, c, d, ... with the given fields."""
    return [report(chr(ord("b") + i), **f) for i, f in enumerate(fields)]


PIN = {"pinned_leader": True}
LEADER_CASES = {
    "nobody": ([], None),
    "pinned_beats_earlier_join": (nodes({"joined_at": 5}, {"joined_at": 9, **PIN}), "c"),
    "earliest_join": (nodes({"joined_at": 5}, {"joined_at": 3}), "c"),
    "join_tie_smallest_node_id": (nodes({"joined_at": 3}, {"joined_at": 3}), "b"),
    "two_pinned_earliest_join": (
        nodes({"joined_at": 1}, {"joined_at": 8, **PIN}, {"joined_at": 7, **PIN}),
        "d",
    ),
    "unknown_join_ranks_last": (nodes({"joined_at": 0}, {"joined_at": 50}), "c"),
}


@pytest.mark.parametrize(("reports", "leader"), LEADER_CASES.values(), ids=LEADER_CASES)
def test_choose_leader(reports: list[NodeReport], leader: str | None) -> None:
    assert choose_leader(reports) == leader
    for order in itertools.permutations(reports):
        assert choose_leader(order) == leader  # every node computes the same leader


def test_leader_gone_hands_over_to_the_next() -> None:
    view = view_of(report("b", joined_at=5.0), report("c", joined_at=7.0))
    assert view.leader(ME) == "b"
    view.goodbye("b", "boot1")
    assert view.leader(ME) == "c"
    view.refresh(T0 + 10.0)
    assert view.leader(ME) == "a"


# --- drift ------------------------------------------------------------------------------------


D = "differs across nodes:"
V1, V2 = {"version": "1"}, {"version": "2"}
DRIFT_CASES = {
    "all_same": (nodes(V1, V1), None),
    "version": (nodes(V1, V1, V2), f"version {D} 1 on b, c; 2 on d"),
    "unknown_commit_is_no_drift": (nodes({"commit": "abc"}, {}, {"commit": "abc"}), None),
    "commit": (nodes({"commit": "abc"}, {"commit": "def"}), f"commit {D} abc on b; def on c"),
    "protocol": (nodes({"protocol": 1}, {"protocol": 2}), f"protocol {D} 1 on b; 2 on c"),
    "flag_value": (
        nodes({"flags": {"dtype": "bf16"}}, {"flags": {"dtype": "fp16"}}),
        f"flag dtype {D} bf16 on b; fp16 on c",
    ),
    "flag_missing_on_one": (nodes({"flags": {"kv": "8"}}, {}), f"flag kv {D} (unset) on c; 8 on b"),
    "same_names_get_ids": (
        nodes({"name": "mac", **V1}, {"name": "mac", **V2}),
        f"version {D} 1 on mac (b); 2 on mac (c)",
    ),
    "friendly_names": (
        nodes({"name": "alpha", **V1}, {"name": "beta", **V2}),
        f"version {D} 1 on alpha; 2 on beta",
    ),
}


@pytest.mark.parametrize(("reports", "warning"), DRIFT_CASES.values(), ids=DRIFT_CASES)
def test_drift_warnings(reports: list[NodeReport], warning: str | None) -> None:
    assert drift_warnings(reports) == ([warning] if warning else [])


def test_every_drifting_setting_gets_its_sentence() -> None:
    reports = nodes({"flags": {"kv": "8"}, **V1}, {"flags": {"kv": "4"}, **V2})
    assert drift_warnings(reports) == [f"version {D} 1 on b; 2 on c", f"flag kv {D} 4 on c; 8 on b"]


# --- /state, /cluster/links, /cluster/nodes ---------------------------------------------------


A1, B1 = "10.0.0.1", "10.0.0.2"  # a and b on a direct cable


def link_lines(view: ClusterView, me: NodeReport) -> list[str]:
    rows = links_document(view, me, T0)["links"]
    return [
        f"{r['from_node']}->{r['to_node']} {r['recorded_by']}:{r['direction']} "
        + ("one-way" if r["one_way"] else "both")
        for r in rows
    ]


def connection_lines(doc: dict[str, Any]) -> list[str]:
    conns = doc["topology"]["connections"]
    return [f"{c['localNodeId']}->{c['sendBackNodeId']} {'+'.join(c['recordedBy'])}" for c in conns]


def test_one_way_path_is_visible_to_both_sides() -> None:
    # a reaches b; b's probes of a fail (a firewall): both records say one way
    me = report("a", boot="boot-a", links=(path("b", B1, A1),))
    view = view_of(report("b", api_port=52415, links=(path("a", A1, B1, last_success=None),)))
    assert link_lines(view, me) == ["a->b a:outbound one-way", "b->a b:outbound one-way"]
    [conn] = state_document(view, me, T0)["topology"]["connections"]
    assert conn["sendBackMultiaddr"] == "/ip4/10.0.0.2/tcp/52415" and conn["oneWay"] is True
    assert connection_lines(state_document(view, me, T0)) == ["a->b a:outbound"]


INBOUND = {"direction": "inbound"}
# (a's records, b's records), link lines, connection lines (exo topology edges)
PATH_CASES = {
    "inbound_only_record_is_a_connection_from_the_prober": (  # seed-000
        ([], [path("a", A1, B1, **INBOUND)]),
        ["a->b b:inbound one-way"],
        ["a->b b:inbound"],
    ),
    "both_sides_of_one_direction_make_one_connection": (
        ([path("b", B1, A1)], [path("a", A1, B1, **INBOUND)]),
        ["a->b a:outbound one-way", "a->b b:inbound one-way"],
        ["a->b a:outbound+b:inbound"],
    ),
    "two_way_path_is_not_one_way": (
        ([path("b", B1, A1)], [path("a", A1, B1)]),
        ["a->b a:outbound both", "b->a b:outbound both"],
        ["a->b a:outbound", "b->a b:outbound"],
    ),
    "one_way_is_judged_per_address_pair": (  # a->b on the cable, b->a only over wifi
        ([path("b", B1, A1)], [path("a", "192.168.1.1", "192.168.1.2")]),
        ["a->b a:outbound one-way", "b->a b:outbound one-way"],
        ["a->b a:outbound", "b->a b:outbound"],
    ),
    "unrecorded_local_address_matches_either_way": (
        ([path("b", B1, None)], [path("a", A1, B1)]),
        ["a->b a:outbound both", "b->a b:outbound both"],
        ["a->b a:outbound", "b->a b:outbound"],
    ),
    "stale_success_is_no_connection": (
        ([path("b", B1, A1, last_success=T0 - 60)], []),
        ["a->b a:outbound both"],
        [],
    ),
}


@pytest.mark.parametrize(("records", "links", "conns"), PATH_CASES.values(), ids=PATH_CASES)
def test_paths_and_connections(records: tuple, links: list[str], conns: list[str]) -> None:
    me = report("a", boot="boot-a", links=tuple(records[0]))
    view = view_of(report("b", links=tuple(records[1])))
    assert link_lines(view, me) == links
    assert connection_lines(state_document(view, me, T0)) == conns


def test_path_age_is_judged_on_the_recorders_clock() -> None:
    # b's clock is 100 s behind ours; its last success was 1 s before it sent the report
    skewed = T0 - 100.0
    b = report(
        "b", sent_at=skewed, links=(path("a", "10.0.0.1", "10.0.0.2", last_success=skewed - 1),)
    )
    doc = state_document(view_of(b), report("a", boot="boot-a"), T0 + 0.5)
    assert doc["links"][0]["recent"] is True


def test_links_of_gone_nodes_are_dropped() -> None:
    view = view_of(report("b", links=(path("a", "10.0.0.1", "10.0.0.2"),)))
    view.goodbye("b", "boot1")
    assert links_document(view, report("a", boot="boot-a"), T0)["links"] == []


def test_state_document_shape() -> None:
    tb = InterfaceInfo(name="en2", kind=InterfaceKind.THUNDERBOLT, addresses=("10.0.0.1/30",))
    res = Resources(ram_total=64 << 30, ram_available=40 << 30, cpu_count=16)
    me = report("a", boot="boot-a", name="alpha", resources=res, interfaces=(tb,), **V1)
    view = view_of(report("b", joined_at=5.0, **V2), report("c", joined_at=1.0, **V1))
    view.refresh(T0 + 1.5)
    view.goodbye("c", "boot1")
    doc = state_document(view, me, T0 + 1.5)
    json.dumps(doc)  # served as JSON as is
    node = doc["topology"]["nodes"][0]
    assert [n["nodeId"] for n in doc["topology"]["nodes"]] == ["a", "b"]
    profile = node["nodeProfile"]
    assert profile["friendlyName"] == "alpha" and profile["modelId"] == "unknown"
    assert profile["memory"] == {"ramTotal": 64 << 30, "ramAvailable": 40 << 30}
    assert profile["networkInterfaces"] == [
        {"name": "en2", "ipAddress": "10.0.0.1", "type": "thunderbolt"}
    ]
    assert doc["leader"] == "b" and doc["self"] == "a"
    assert doc["drift"] == [f"version {D} 1 on alpha; 2 on b"]
    statuses = {n["node_id"]: (n["status"], n["gone_reason"]) for n in doc["nodes"]}
    assert statuses == {"a": ("alive", None), "b": ("suspect", None), "c": ("gone", "said goodbye")}
    first = doc["nodes"][0]
    assert first["is_self"] and first["interfaces"][0]["kind"] == "thunderbolt"
    assert first["resources"]["cpu_count"] == 16 and "links" not in first
    assert doc["refused"] == []


def test_profile_names_the_device_where_the_node_reports_one() -> None:
    mac = Resources(device="Mac16,9 · Apple M4 Max")
    view = view_of(report("b", resources=mac))
    doc = state_document(view, report("a", boot="boot-a"), T0)
    models = {n["nodeId"]: n["nodeProfile"]["modelId"] for n in doc["topology"]["nodes"]}
    assert models == {"a": "unknown", "b": "Mac16,9 · Apple M4 Max"}


def test_nodes_and_links_documents_match_state() -> None:
    me = report("a", boot="boot-a", links=(path("b", "10.0.0.2", "10.0.0.1"),))
    view = view_of(report("b", joined_at=5.0))
    state = state_document(view, me, T0)
    nodes = nodes_document(view, me, T0)
    assert nodes["nodes"] == state["nodes"] and nodes["leader"] == state["leader"] == "b"
    links = links_document(view, me, T0)
    assert links["links"] == state["links"] and links["recent_window_s"] == 10.0
    row = links["links"][0]
    assert (row["from_node"], row["to_node"], row["interface_kind"]) == ("a", "b", "ethernet")
    assert row["rtt_ms_ewma"] == 0.4 and row["local_interface"] is None


@pytest.mark.parametrize(
    ("build", "document"),
    [(state_document, StateDocument), (nodes_document, NodesDocument),
     (links_document, LinksDocument)],
)  # fmt: skip
def test_typed_documents_declare_every_field_and_serve_the_same_json(
    build: Any, document: type[BaseModel]
) -> None:
    tb = InterfaceInfo(name="en2", kind=InterfaceKind.THUNDERBOLT, addresses=("10.0.0.1/30",))
    me = report("a", boot="boot-a", interfaces=(tb,), links=(path("b", "10.0.0.2", "10.0.0.1"),))
    view = view_of(report("b", joined_at=5.0, links=(path("a", "10.0.0.1", "10.0.0.2"),)))
    view.accept(report("zz", boot="x", protocol=99), T0)  # a refused peer
    raw = json.loads(json.dumps(build(view, me, T0)))
    typed = document.model_validate(raw)
    assert undeclared(typed) == []
    assert typed.model_dump(mode="json", by_alias=True) == raw
