"""`shoal bootstrap`: the runbook's phase gates, the run ledger and the hand-off.

Pure tables first (resume, --fast, next commands, the hand-off block), then the command end to
end against two real nodes on 127.0.0.1 and 127.0.0.2 holding the bundled model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.models.manifest import Manifest, ManifestFile
from shoal.ops import bootstrap
from shoal.ops.phase_gates import (
    FAIL,
    PASS,
    WARN,
    ChatAnswer,
    Gate,
    NodeApi,
    Options,
    PhaseResult,
    Probe,
    apply_fast,
    bench_command,
    conclude,
    gate,
    judge_audit,
    judge_canary,
    judge_first_chat,
    judge_join,
    judge_placement,
    judge_preflight,
    judge_transport,
)
from shoal.ops.run_ledger import (
    HANDOFF_KEYS,
    Ledger,
    handoff_fields,
    next_command,
    phase_order,
    plan_phases,
    render_handoff,
    render_run_md,
)

from test_instances import HOSTS, MODEL, Pair
from waiting import wait_for

pytestmark = pytest.mark.timeout(300)

PORT = 52735  # test_instances uses 52715: the modules may run in one session
API = f"http://{HOSTS['a']}:{PORT}"
ORDER = phase_order(bench=False)
OPTS = Options(MODEL, api=API)


# -- pure: which phases run --------------------------------------------------------------------


def results(**statuses: str) -> list[PhaseResult]:
    return [PhaseResult(name, status, (f"{name} headline",)) for name, status in statuses.items()]


@pytest.mark.parametrize(
    ("previous", "resume", "only", "kept", "to_run"),
    [
        # a fresh run ignores the ledger
        (results(preflight=PASS, audit=PASS), False, None, [], list(ORDER)),
        # resume: the passed prefix is kept, the run starts at the first phase that did not pass
        (
            results(preflight=PASS, audit=PASS, canary=PASS, join=FAIL),
            True,
            None,
            ["preflight", "audit", "canary"],
            ["join", "placement", "transport", "first_chat"],
        ),
        # a warning is a pass with a note
        (results(preflight=WARN), True, None, ["preflight"], list(ORDER[1:])),
        # a later pass after an earlier failure does not count: the gates are in order
        (results(preflight=FAIL, audit=PASS), True, None, [], list(ORDER)),
        # everything passed: nothing to repeat
        (results(**dict.fromkeys(ORDER, PASS)), True, None, list(ORDER), []),
        # --only runs one phase and keeps the other entries
        (results(preflight=PASS, audit=FAIL), False, "audit", ["preflight"], ["audit"]),
    ],
)
def test_resume_picks_the_phases_to_run_from_the_ledger(
    previous: list[PhaseResult], resume: bool, only: str | None, kept: list, to_run: list
) -> None:
    got_kept, got_run = plan_phases(ORDER, previous, resume=resume, only=only)
    assert [p.name for p in got_kept] == kept
    assert got_run == to_run


def test_resume_with_bench_runs_only_the_bench_after_a_passed_run() -> None:
    previous = results(**dict.fromkeys(ORDER, PASS))
    kept, to_run = plan_phases(phase_order(bench=True), previous, resume=True, only=None)
    assert len(kept) == len(ORDER) and to_run == ["bench"]


# -- pure: --fast ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checked", "fast", "status"),
    [
        (gate("drift", False, "x", strict=True), True, WARN),
        (gate("drift", False, "x", strict=True), False, FAIL),
        (gate("parity", False, "x"), True, FAIL),
        (gate("drift", True, "x", strict=True), True, PASS),
    ],
)
def test_fast_turns_only_strict_failures_into_warnings(
    checked: Gate, fast: bool, status: str
) -> None:
    assert apply_fast([checked], fast)[0].status == status


def manifest(
    node: str, size: int = 100, partials: tuple[str, ...] = (), gguf_count: int = 1
) -> Manifest:
    files = tuple(ManifestFile(path=f"m-{i}.gguf", size=size) for i in range(gguf_count))
    return Manifest(
        model_id=MODEL,
        dir=f"/models/{node}/{MODEL}",
        format="gguf",
        files=files,
        partials=partials,
        gguf_count=gguf_count,
        total_bytes=size * gguf_count,
    )


@pytest.mark.parametrize(
    ("manifests", "expect_shards", "fast", "status"),
    [
        ({"a": manifest("a"), "b": manifest("b")}, 1, False, PASS),
        # a shard count is an expectation: --fast lets it through with a warning
        ({"a": manifest("a"), "b": manifest("b")}, 3, False, FAIL),
        ({"a": manifest("a"), "b": manifest("b")}, 3, True, WARN),
        # partial files, parity and a node without the model never pass, --fast or not
        ({"a": manifest("a"), "b": manifest("b", partials=("m.part",))}, None, True, FAIL),
        ({"a": manifest("a"), "b": manifest("b", size=99)}, None, True, FAIL),
        ({"a": manifest("a"), "b": "model not on this node"}, None, True, FAIL),
    ],
)
def test_fast_audit_warns_on_shard_count_but_never_on_partials_or_parity(
    manifests: dict, expect_shards: int | None, fast: bool, status: str
) -> None:
    opts = Options(MODEL, api=API, expect_shards=expect_shards, fast=fast)
    assert judge_audit(opts, manifests, card={}).status == status


def node(name: str, status: str = "alive", free_gb: float = 500.0) -> dict[str, Any]:
    store = {"disk_free": int(free_gb * 1e9), "disk_total": int(2000e9)}
    return {"node_id": f"id-{name}", "name": name, "status": status, "store": store}


def apis(*names: str) -> list[NodeApi]:
    return [NodeApi(f"id-{n}", n, f"http://{n}:52415") for n in names]


def judged_preflight(
    fast: bool = False,
    allow_blocked: bool = False,
    card: dict[str, Any] | None = None,
    drift: tuple[str, ...] = (),
    free_gb: float = 500.0,
    min_disk_gb: float | None = None,
    b_manifest: Manifest | str | None = None,
    previous_dirs: dict[str, str] | None = None,
) -> PhaseResult:
    opts = Options(MODEL, api=API, fast=fast, allow_blocked=allow_blocked, min_disk_gb=min_disk_gb)
    state = {"nodes": [node("a", free_gb=free_gb), node("b")], "drift": list(drift)}
    manifests = {"a": manifest("a"), "b": b_manifest or manifest("b")}
    return judge_preflight(opts, state, apis("a", "b"), manifests, card or {}, previous_dirs or {})


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({}, PASS),
        ({"drift": ("version differs across nodes: 0.1 on a; 0.2 on b",)}, FAIL),
        ({"drift": ("version differs across nodes: 0.1 on a; 0.2 on b",), "fast": True}, WARN),
        ({"free_gb": 10, "min_disk_gb": 50}, FAIL),
        ({"free_gb": 10, "min_disk_gb": 50, "fast": True}, WARN),
        ({"free_gb": 10, "card": {"min_disk_gb": 50}}, FAIL),
        ({"card": {"status": "watch"}}, WARN),
        ({"card": {"status": "deprecated"}}, WARN),
        ({"card": {"status": "blocked"}}, FAIL),
        ({"card": {"status": "blocked"}, "fast": True}, FAIL),  # only --allow-blocked overrides
        ({"card": {"status": "blocked"}, "allow_blocked": True}, WARN),
        ({"b_manifest": "model not on this node", "fast": True}, FAIL),
        ({"previous_dirs": {"b": "/elsewhere"}}, WARN),  # path drift since the last run
    ],
)
def test_preflight_gates(kwargs: dict[str, Any], status: str) -> None:
    assert judged_preflight(**kwargs).status == status


def test_preflight_reports_disk_numbers_even_without_a_threshold() -> None:
    result = judged_preflight(free_gb=123.4)
    (disk,) = [line for line in result.evidence if line.startswith("PASS disk space")]
    assert "a 123.4 GB free of 2000.0; b 500.0 GB free" in disk and "(no threshold set)" in disk


def test_a_late_joiner_fails_join_until_audited_and_fast_only_warns() -> None:
    state = {"nodes": [node("a"), node("b"), node("c")]}
    strict = judge_join(Options(MODEL, api=API), state, 1.0, audited=["a", "b"])
    assert strict.status == FAIL and "c joined after the audit" in strict.blocker
    fast = judge_join(Options(MODEL, api=API, fast=True), state, 1.0, audited=["a", "b"])
    assert fast.status == WARN


# -- pure: the command to run next -------------------------------------------------------------


def failing_results() -> list[tuple[PhaseResult, str]]:
    """(a failing verdict of each phase, what its next command must contain)."""
    body = {"instanceId": "i-1", "nodeToRunner": {"id-a": "r0"},
            "runnerStatus": {"r0": {"status": "failed", "reason": "out of memory"}}}  # fmt: skip
    empty = {"instanceId": "i-2", "nodeToRunner": {}, "runnerStatus": {}}
    bench_fail = conclude(
        "bench", [gate("bench exit", False, "exit 2", next_command="python -m shoal.ops.bench")]
    )
    return [
        (judged_preflight(b_manifest="model not on this node"),
         "curl -X POST http://b:52415/models/pull"),
        (judged_preflight(card={"status": "blocked"}), "--allow-blocked"),
        (judged_preflight(drift=("flag offline differs",)), "--fast"),
        (judge_audit(OPTS, {"a": manifest("a"), "b": manifest("b", size=1)}, {}),
         f"shoal audit {MODEL}"),
        (judge_canary(OPTS, {"b": (apis("b")[0], "not in /v1/models?status=downloaded")}),
         "curl 'http://b:52415/v1/models?status=downloaded'"),
        (judge_join(OPTS, {"nodes": [node("a")]}, 60.0), "--peers 127.0.0.1:52735"),
        (judge_placement(OPTS, body, {}, "created", 3.0), f"{API}/instance/i-1"),
        (judge_placement(OPTS, empty, {}, "created", 300.0), f"{API}/instance/i-2"),
        (judge_transport(OPTS, [Probe("b", "store", "127.0.0.1", 4000, False, "refused")]),
         "on b: nc -vz -w 2 127.0.0.1 4000"),
        (judge_transport(OPTS, []), "--only placement"),
        (judge_first_chat(OPTS, [ChatAnswer("a", API, False, 120.0, "ReadTimeout")]),
         f"curl {API}/v1/chat/completions"),
        (bench_fail, "python -m shoal.ops.bench"),
    ]  # fmt: skip


@pytest.mark.parametrize(("result", "expected"), failing_results())
def test_each_failing_phase_names_its_next_command(result: PhaseResult, expected: str) -> None:
    assert result.status == FAIL
    passed_before = ORDER[: ORDER.index(result.name)] if result.name in ORDER else ORDER
    ledger = Ledger(MODEL, API, phases=results(**dict.fromkeys(passed_before, PASS)))
    ledger.record(result)
    order = phase_order(bench=result.name == "bench")
    assert expected in next_command(ledger, order)
    fields = handoff_fields(ledger, order)
    assert fields["CURRENT_PHASE"] == result.name
    assert fields["KNOWN_BLOCKER"] == f"{result.name}: {result.blocker}"


def test_a_failed_runner_and_an_empty_node_to_runner_are_blockers() -> None:
    failed, empty = (r for r, _ in failing_results() if r.name == "placement")
    assert "out of memory" in failed.blocker
    assert failed.blocker.startswith("no failed runner")
    assert empty.blocker == "nodeToRunner: 0 runner(s)"


@pytest.mark.parametrize(
    ("phases", "bench", "expected"),
    [
        (results(**dict.fromkeys(ORDER, PASS)), False, "--resume --bench"),
        (results(**dict.fromkeys((*ORDER, "bench"), PASS)), True, "shoal chat --api"),
        (results(preflight=PASS), False, "--resume"),  # stopped between phases
    ],
)
def test_next_command_when_nothing_failed(phases: list, bench: bool, expected: str) -> None:
    assert expected in next_command(Ledger(MODEL, API, phases=phases), phase_order(bench))


def test_bench_runs_with_only_api_model_and_out_plus_the_given_args() -> None:
    opts = Options(MODEL, api=API, bench_args="--concurrency 1,2 --prompt-tokens '128'")
    command = bench_command(opts, Path("/r/bench.jsonl"))
    fixed = ["--api", API, "--model", MODEL, "--out", "/r/bench.jsonl"]
    given = ["--concurrency", "1,2", "--prompt-tokens", "128"]
    assert command[1:] == ["-m", "shoal.ops.bench", *fixed, *given]


# -- pure: the hand-off ------------------------------------------------------------------------


def test_handoff_block_has_every_key_in_order_in_a_fenced_block() -> None:
    ledger = Ledger(MODEL, API, phases=results(preflight=PASS, audit=PASS, canary=PASS))
    ledger.record(PhaseResult("join", FAIL, ("nodes alive: 1 of 2",), (), "start b", "1 of 2"))
    ledger.nodes = [{"name": "a", "node_id": "id-a", "api": API}]
    ledger.model_dirs = {"a": "/models/a"}
    block = render_handoff(handoff_fields(ledger, ORDER))
    lines = block.splitlines()
    assert lines[0] == lines[-1] == "```"
    assert [line.split(":", 1)[0] for line in lines[1:-1]] == list(HANDOFF_KEYS)
    assert f"NODES: a (id-a, {API})" in lines
    assert "MODEL_DIRS: a=/models/a" in lines
    assert "LAST_PASS_PHASE: canary" in lines and "CURRENT_PHASE: join" in lines
    assert "KNOWN_BLOCKER: join: 1 of 2" in lines and "NEXT_COMMAND: start b" in lines
    assert "STRONGEST_EVIDENCE: canary: canary headline" in lines
    assert any(line.startswith("DO_NOT_REPEAT: preflight passed at") for line in lines)


def test_run_md_keeps_the_runbook_section_order() -> None:
    text = render_run_md(Ledger(MODEL, API), ORDER, "now")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## 90-Second Handoff",
        "## Current Run Header",
        "## Phase Gates",
        "## Failure Signatures",
        "## Run Ledger",
        "## Hand-off Block",
    ]
    assert "CURRENT_PHASE: preflight" in text and "LAST_PASS_PHASE: none" in text


# -- end to end: two nodes on loopback ---------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = Pair(tmp_path_factory.mktemp("bootstrap"), port=PORT)

    def both_alive_in_both_views() -> bool:
        views = [p.json(name, "/state") or {} for name in HOSTS]
        return all(sum(n["status"] == "alive" for n in v.get("nodes", [])) == 2 for v in views)

    try:
        for name in HOSTS:
            p.start(name)
        wait_for("both nodes alive in both views", both_alive_in_both_views, timeout=60)
        yield p
    finally:
        for iid in instances_of(p):
            httpx.delete(p.url("a", f"/instance/{iid}"), timeout=10)
        p.stop()


def instances_of(pair: Pair) -> list[str]:
    return list(((pair.json("a", "/state") or {}).get("instances") or {}).keys())


def run_bootstrap(report: Path, *flags: str, model: str = MODEL) -> int:
    return bootstrap.main([model, "--api", API, "--report-dir", str(report), *flags])


def ledger_of(report: Path) -> dict[str, Any]:
    return json.loads((report / "ledger.json").read_text())


def statuses(ledger: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["status"] for p in ledger["phases"]}


def test_a_model_nobody_holds_stops_at_preflight_with_the_pull_command(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_bootstrap(tmp_path, model="nobody/holds-this") == 1
    ledger = ledger_of(tmp_path)
    assert statuses(ledger) == {"preflight": FAIL}
    assert ledger["last_pass_phase"] == "none" and ledger["current_phase"] == "preflight"
    assert "models/pull" in ledger["next_command"] and "nobody/holds-this" in ledger["next_command"]
    out = capsys.readouterr().out
    assert "FAIL model dir on every node" in out and "NEXT_COMMAND: curl -X POST" in out


def test_a_join_failure_stops_there_and_resume_goes_on_from_join(
    pair: Pair,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run_bootstrap(tmp_path, "--min-nodes", "3", "--join-timeout", "3") == 1
    ledger = ledger_of(tmp_path)
    assert statuses(ledger) == {"preflight": PASS, "audit": PASS, "canary": PASS, "join": FAIL}
    assert ledger["last_pass_phase"] == "canary" and ledger["current_phase"] == "join"
    assert "--peers" in ledger["next_command"]
    assert ledger["model_dirs"].keys() == {"a", "b"}
    assert "CURRENT_PHASE: join" in (tmp_path / "RUN.md").read_text()
    out = capsys.readouterr().out
    assert "FAIL join" in out and "NEXT_COMMAND: start 1 more node(s)" in out

    # the ledger is on disk after every phase, each time one phase further
    written: list[tuple[str, int]] = []
    real_write = bootstrap.write_ledger

    def write_and_read_back(*args: Any) -> None:
        real_write(*args)
        on_disk = ledger_of(tmp_path)
        written.append((on_disk["current_phase"], len(on_disk["phases"])))

    monkeypatch.setattr(bootstrap, "write_ledger", write_and_read_back)
    assert run_bootstrap(tmp_path, "--resume") == 0, capsys.readouterr().out + pair.log()
    assert written == [
        ("join", 3), ("placement", 4), ("transport", 5), ("first_chat", 6), ("complete", 7)
    ]  # fmt: skip
    out = capsys.readouterr().out
    for skipped in ("preflight", "audit", "canary"):
        assert f"SKIP {skipped}: passed at" in out
    assert "\nPASS first_chat" in out and "200 with choices" in out
    ledger = ledger_of(tmp_path)
    assert set(statuses(ledger).values()) == {PASS} and len(ledger["phases"]) == len(ORDER)
    assert ledger["current_phase"] == "complete" and ledger["known_blocker"] == "none"
    assert ledger["instance_id"] in instances_of(pair)
    run_md = (tmp_path / "RUN.md").read_text()
    block = run_md.split("## Hand-off Block", 1)[1]
    for key in HANDOFF_KEYS:
        assert f"\n{key}: " in block
    assert "LAST_PASS_PHASE: first_chat" in block


def test_resume_after_success_repeats_nothing_and_a_fresh_run_reuses_the_instance(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_bootstrap(tmp_path) == 0, capsys.readouterr().out + pair.log()
    first = ledger_of(tmp_path)
    assert set(statuses(first).values()) == {PASS}
    assert instances_of(pair) == [first["instance_id"]]
    capsys.readouterr()

    assert run_bootstrap(tmp_path, "--resume") == 0
    out = capsys.readouterr().out
    assert all(f"SKIP {phase}: passed at" in out for phase in ORDER)
    assert "[1/" not in out  # no phase ran
    assert ledger_of(tmp_path)["phases"] == first["phases"]
    assert instances_of(pair) == [first["instance_id"]]  # no second instance

    assert run_bootstrap(tmp_path / "fresh") == 0  # not --resume: every phase again
    again = ledger_of(tmp_path / "fresh")
    placed = next(p for p in again["phases"] if p["name"] == "placement")
    assert "(reused," in placed["evidence"][0]
    assert instances_of(pair) == [first["instance_id"]]


def test_a_failing_bench_is_a_failed_phase_with_its_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_bootstrap(tmp_path, "--only", "bench", "--bench-args=--no-such-flag") == 1
    ledger = ledger_of(tmp_path)
    assert statuses(ledger) == {"bench": FAIL} and ledger["current_phase"] == "bench"
    assert (
        "shoal.ops.bench" in ledger["next_command"] and "--no-such-flag" in ledger["next_command"]
    )
    assert "  | " in capsys.readouterr().out  # bench's own output, streamed


def test_an_unreachable_api_exits_3_and_says_how_to_start_a_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = bootstrap.main([MODEL, "--api", "127.0.0.1:9", "--report-dir", str(tmp_path)])
    assert code == 3
    assert "shoal run" in capsys.readouterr().out
    assert ledger_of(tmp_path)["current_phase"] == "preflight"
