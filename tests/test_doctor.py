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


def test_render_explains_each_hop_of_an_instance():
    from shoal.placement.plan import instance_document
    from shoal.schema.report import InstanceSpec, RunnerState

    spec = InstanceSpec(
        instance_id="inst1", model_id="m", nodes=("aaaa1111", "bbbb2222"),
        layer_ranges=((0, 15), (15, 30)), store_address="192.168.100.1", store_port=41000,
        rank_addresses=("192.168.100.1", "192.168.100.2"), rank_interfaces=("en5", "en5"),
    )  # fmt: skip
    failed = RunnerState(runner_id="inst1-g0-r1", instance_id="inst1", status="failed",
                         reason="init timed out")  # fmt: skip
    slow = {"from_node": "aaaa1111", "from_addr": "100.64.0.1", "to_node": "bbbb2222",
            "to_addr": "100.64.0.2:52415", "interface_kind": "vpn", "direction": "outbound",
            "rtt_ms_ewma": 41.0, "recent": True, "recorded_by": "aaaa1111"}  # fmt: skip
    state = {**STATE, "links": [*STATE["links"], slow],
             "instances": {"inst1": instance_document(spec, {"inst1-g0-r1": failed})}}  # fmt: skip
    out = io.StringIO()
    render(state, out)
    text = out.getvalue()
    assert "instances (1)" in text
    assert "rank 0 mac-studio   layers 0-15  192.168.100.1 via en5  pending" in text
    assert (
        "rank 1 linux-box    layers 15-30  192.168.100.2 via en5  failed (init timed out)" in text
    )
    assert ("why mac-studio -> linux-box: uses 192.168.100.2 (thunderbolt, rtt 0.41 ms, ok); "
            "measured and not chosen: 100.64.0.2 (vpn, rtt 41.00 ms, ok)") in text  # fmt: skip
    assert (
        "why linux-box -> mac-studio: uses 192.168.100.1; measured and not chosen: 100.64.0.1"
        in text
    )


def test_models_show_who_holds_them_whether_files_agree_and_pulls() -> None:
    held = {
        "model_id": "org/m",
        "num_layers": 2,
        "hidden_size": 8,
        "num_heads": 2,
        "num_kv_heads": 2,
        "head_dim": 4,
        "weight_bytes": 1,
    }
    nodes = [
        {"node_id": "aaaa1111", "name": "a", "models": [{**held, "files_digest": "x"}],
         "store": {"downloads": [{"model_id": "org/new", "status": "downloading",
                                  "bytes_done": 2**20, "bytes_total": 4 * 2**20}]}},
        {"node_id": "bbbb2222", "name": "b", "models": [{**held, "files_digest": "y"}]},
    ]  # fmt: skip
    out = io.StringIO()
    render({"leader": "aaaa1111", "nodes": nodes, "links": [], "drift": []}, out)
    text = out.getvalue()
    assert "org/m" in text and "on a, b  (FILES DIFFER: run `shoal audit`)" in text
    assert "pull org/new on a: downloading 1/4 MiB" in text
    nodes[1]["models"] = [{**held, "files_digest": "x"}]
    out = io.StringIO()
    render({"leader": "aaaa1111", "nodes": nodes, "links": [], "drift": []}, out)
    assert "on a, b  (files agree)" in out.getvalue()


def test_nodes_and_models_show_the_engines_backends_and_mlx_layouts() -> None:
    held = {
        "model_id": "org/moe",
        "num_layers": 2,
        "hidden_size": 8,
        "num_heads": 2,
        "num_kv_heads": 2,
        "head_dim": 4,
        "weight_bytes": 1,
        "arch": "qwen3_moe",
        "backends": ["ring", "jaccl"],
        "mlx_layouts": ["pipeline", "tensor"],
    }
    nodes = [{"node_id": "aaaa1111", "name": "a", "engines": ["torch:mps", "mlx:metal"],
              "backends": ["gloo", "ring", "jaccl"], "models": [held]}]  # fmt: skip
    out = io.StringIO()
    render({"leader": "aaaa1111", "nodes": nodes, "links": [], "drift": []}, out)
    text = out.getvalue()
    assert "runs torch:mps, mlx:metal; backends gloo, ring, jaccl" in text, text
    assert "qwen3_moe over ring, jaccl; mlx pipeline/tensor" in text, text
