"""`shoal doctor` renders a node's /state for a person."""

from __future__ import annotations

import io

import pytest

from shoal.ops.doctor import render

STATE = {
    "leader": "aaaa1111",
    "nodes": [
        {"node_id": "aaaa1111", "name": "mac-studio", "status": "alive", "is_leader": True,
         "is_self": True, "version": "0.1.0", "seconds_since_seen": 0.0,
         "resources": {"ram_total": 64 * 2**30, "ram_available": 40 * 2**30},
         "interfaces": [{"name": "en5", "kind": "thunderbolt",
                         "addresses": ["192.168.100.1/24"]}]},
        {"node_id": "bbbb2222", "name": "linux-box", "status": "gone", "is_leader": False,
         "is_self": False, "version": "0.0.9", "seconds_since_seen": 7.5,
         "gone_reason": "no report for 4 s", "resources": {}, "interfaces": []},
    ],
    "links": [
        {"from_node": "aaaa1111", "from_addr": "192.168.100.1", "to_node": "bbbb2222",
         "to_addr": "192.168.100.2", "interface_kind": "thunderbolt", "direction": "outbound",
         "rtt_ms_ewma": 0.41, "rtt_ms_p95": 0.6, "loss": 0.0, "recent": True, "one_way": True,
         "recorded_by": "aaaa1111"},
        {"from_node": "bbbb2222", "from_addr": "100.64.0.2", "to_node": "aaaa1111",
         "to_addr": "100.64.0.1", "interface_kind": "vpn", "direction": "outbound",
         "rtt_ms_ewma": None, "rtt_ms_p95": None, "loss": 1.0, "recent": False,
         "one_way": False, "recorded_by": "bbbb2222"},
    ],
    "drift": ["version differs: mac-studio 0.1.0, linux-box 0.0.9"],
    "refused": [{"node_id": "cccc3333", "reason": "another namespace"}],
}  # fmt: skip


@pytest.mark.parametrize(
    "expected",
    [
        "nodes (2), leader mac-studio",
        " *@ mac-studio",
        "gone",
        "(no report for 4 s)",
        "en5          thunderbolt  192.168.100.1/24",
        "rtt 0.41 ms (p95 0.60) loss 0%  ONE-WAY",
        "vpn         outbound rtt - ms (p95 -) loss 100%  DOWN",
        "! version differs: mac-studio 0.1.0, linux-box 0.0.9",
        "refused cccc3333: another namespace",
    ],
)
def test_render_shows(expected):
    out = io.StringIO()
    render(STATE, out)
    assert expected in out.getvalue()


def test_render_of_a_lone_node_says_no_drift():
    out = io.StringIO()
    render({"leader": "x", "nodes": [], "links": [], "drift": [], "refused": []}, out)
    assert "drift: none" in out.getvalue()
