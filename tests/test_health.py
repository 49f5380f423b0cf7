"""Path health verdicts over synthetic RTT series (one sample per second, as the cluster tick)."""

from __future__ import annotations

import pytest

from shoal.cluster.health import (
    DEGRADED,
    DOWN,
    OK,
    PathHealthTracker,
)
from shoal.schema.report import InterfaceKind, PathStats
from shoal.schema.thresholds import Thresholds, parse_bounds


def run(series: list[float | None], kind: str = InterfaceKind.VETH) -> list[str]:
    """Status after each tick; None = the probes of that second got no reply."""
    tracker = PathHealthTracker()
    last_success = None
    out = []
    for t, rtt in enumerate(series, start=1):
        now = 1000.0 + t
        if rtt is not None:
            last_success = now - 0.01
        stats = PathStats(
            peer_node_id="b",
            peer_addr="10.0.0.2:52415",
            interface_kind=kind,
            rtt_ms_ewma=rtt,
            last_success=last_success,
            last_attempt=now - 0.01,
        )
        tracker.observe([stats], now)
        (health,) = tracker.snapshot(now)
        out.append(health.status)
    return out


FAST = [0.1] * 20


@pytest.mark.parametrize(
    ("name", "series", "kind", "expect_at"),
    [
        ("steady cable", FAST, InterfaceKind.VETH, {20: OK}),
        ("one spike is not a shift", FAST[:10] + [80.0] + FAST[:9], InterfaceKind.VETH, {20: OK}),
        (
            "two spikes are not a shift",
            FAST[:10] + [80.0, 90.0] + FAST[:8],
            InterfaceKind.VETH,
            {20: OK},
        ),
        # 0.1 -> 40 ms at t=11: the window median moves at t=13, sustained 3 s by t=16
        ("sustained shift", FAST[:10] + [40.0] * 10, InterfaceKind.VPN, {12: OK, 17: DEGRADED}),
        (
            "back to normal",
            FAST[:10] + [40.0] * 10 + FAST[:10],
            InterfaceKind.VPN,
            {20: DEGRADED, 30: OK},
        ),
        ("past the bound for its kind", [15.0] * 10, InterfaceKind.VETH, {2: OK, 10: DEGRADED}),
        ("a VPN at 40 ms is normal for a VPN", [40.0] * 20, InterfaceKind.VPN, {20: OK}),
        ("tiny absolute change", [0.05] * 10 + [0.2] * 10, InterfaceKind.VETH, {20: OK}),
        ("no replies: down", FAST[:10] + [None] * 5, InterfaceKind.VETH, {11: OK, 12: DOWN}),
        ("never replied", [None] * 5, InterfaceKind.VETH, {1: DOWN}),
        (
            "replies again",
            FAST[:10] + [None] * 5 + FAST[:5],
            InterfaceKind.VETH,
            {15: DOWN, 20: OK},
        ),
    ],
)
def test_verdicts(name: str, series: list[float | None], kind: str, expect_at: dict[int, str]):
    statuses = run(series, kind)
    for t, status in expect_at.items():
        assert statuses[t - 1] == status, (name, t, statuses)


def test_degraded_reason_names_the_numbers_and_baseline_stays_low():
    tracker = PathHealthTracker()
    changes = []
    for t in range(1, 21):
        rtt = 0.1 if t <= 10 else 40.0
        stats = PathStats(
            peer_node_id="b",
            peer_addr="x:1",
            interface_kind=InterfaceKind.VPN,
            rtt_ms_ewma=rtt,
            last_success=t - 0.01,
            last_attempt=t - 0.01,
        )
        changes += tracker.observe([stats], float(t))
    (health,) = tracker.snapshot(20.0)
    assert health.status == DEGRADED
    assert health.baseline_ms == pytest.approx(0.1)
    assert "40.0 ms is 400.0x its baseline 0.10 ms" in health.reason
    assert [c.status for c in changes] == [DEGRADED]


def test_inbound_records_are_not_judged():
    tracker = PathHealthTracker()
    stats = PathStats(peer_node_id="b", peer_addr="x:1", direction="inbound")
    assert tracker.observe([stats], 1.0) == []
    assert tracker.snapshot(1.0) == ()


@pytest.mark.parametrize(
    ("text", "kind", "bound"),
    [
        ("", "vpn", 200.0),
        ("", "loopback", 20.0),
        ("vpn=20", "vpn", 20.0),
        ("ethernet=5, wifi=30", "wifi", 30.0),
    ],
)
def test_parse_bounds(text: str, kind: str, bound: float):
    assert parse_bounds(text).bound(kind) == bound


@pytest.mark.parametrize(
    ("text", "message"), [("vpn", "kind=ms"), ("warp=3", "kind=ms"), ("vpn=fast", "not a number")]
)
def test_parse_bounds_errors(text: str, message: str):
    with pytest.raises(ValueError, match=message):
        parse_bounds(text)


def test_thresholds_are_configurable():
    strict = Thresholds(degrade_factor=1.5, min_degrade_ms=0.0)
    tracker = PathHealthTracker(strict)
    for t in range(1, 21):
        rtt = 1.0 if t <= 10 else 2.0
        stats = PathStats(
            peer_node_id="b",
            peer_addr="x:1",
            rtt_ms_ewma=rtt,
            last_success=t - 0.01,
            last_attempt=t - 0.01,
        )
        tracker.observe([stats], float(t))
    assert tracker.snapshot(20.0)[0].status == DEGRADED
