"""A node's event history: bounded, kept across restarts, and a crash noticed at the next start."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.cluster.events import EventLog, merge_history


def test_history_is_bounded_and_survives_a_restart(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "boot1", keep=5)
    for i in range(23):
        log.add("down", f"path {i}")
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) <= 10  # compacted past twice `keep`
    again = EventLog(tmp_path, "boot2", keep=5)
    assert [e["message"] for e in again.recent()] == [f"path {i}" for i in range(18, 23)]
    assert again.counts() == {"down": 5}


def test_a_run_without_a_clean_stop_is_recorded_as_a_crash(tmp_path: Path) -> None:
    first = EventLog(tmp_path, "bootaaaa1111", keep=5)
    first.start()  # killed: stop() never runs
    second = EventLog(tmp_path, "boot2", keep=5)
    second.start()
    (crash,) = [e for e in second.recent() if e["kind"] == "crash"]
    assert "boot bootaaaa" in crash["message"] and "without a clean stop" in crash["message"]
    second.stop()
    third = EventLog(tmp_path, "boot3", keep=5)
    third.start()
    assert [e["kind"] for e in third.recent()] == ["crash"]  # no new crash after a clean stop


@pytest.mark.parametrize(
    ("name", "by_node", "limit", "expected"),
    [
        ("merged by time, marked by recorder",
         {"a": [{"at": 3.0, "kind": "down", "message": "x"}],
          "b": [{"at": 1.0, "kind": "node_joined", "message": "y"}]}, 10,
         [(1.0, "node_joined", "b"), (3.0, "down", "a")]),
        ("the newest `limit` kept",
         {"a": [{"at": float(t), "kind": "k", "message": "m"} for t in range(5)]}, 2,
         [(3.0, "k", "a"), (4.0, "k", "a")]),
        ("malformed peer data dropped",
         {"a": [{"at": "soon", "kind": "k", "message": "m"}, {"kind": "k"}, 7, None,
                {"at": 1, "kind": "k", "message": "ok"}],
          "b": "not a list"}, 10,
         [(1, "k", "a")]),
        ("nothing", {}, 10, []),
    ],
)  # fmt: skip
def test_merge_history(name, by_node, limit, expected) -> None:
    merged = merge_history(by_node, limit)
    assert [(e["at"], e["kind"], e["recorded_by"]) for e in merged] == expected, name
