"""The run ledger of `shoal bootstrap`: which phases a run repeats, and the hand-off after
every phase (ledger.json for tools, RUN.md for the next operator).

Everything here is pure except `write_ledger`/`read_ledger`. RUN.md keeps the runbook's
section order: the stable sections (90-Second Handoff, Phase Gates, Failure Signatures) never
change; Current Run Header, Run Ledger and the Hand-off Block are rewritten after every phase.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from shoal.ops.phase_gates import FAIL, PASSED, PHASES, PhaseResult, bootstrap_command

COMPLETE = "complete"  # CURRENT_PHASE once every phase passed
HANDOFF_KEYS = (
    "MODEL",
    "NODES",
    "MODEL_DIRS",
    "LAST_PASS_PHASE",
    "CURRENT_PHASE",
    "KNOWN_BLOCKER",
    "STRONGEST_EVIDENCE",
    "NEXT_COMMAND",
    "DO_NOT_REPEAT",
)


# -- which phases run --------------------------------------------------------------------------


def phase_order(bench: bool) -> tuple[str, ...]:
    return PHASES if bench else PHASES[:-1]


def plan_phases(
    order: Sequence[str], previous: Sequence[PhaseResult], *, resume: bool, only: str | None
) -> tuple[list[PhaseResult], list[str]]:
    """(ledger entries kept from the previous run, phases to run now). --only runs one phase
    and keeps the other entries; --resume keeps the passed prefix and runs from the first phase
    that did not pass; otherwise everything runs afresh."""
    if only:
        return [p for p in previous if p.name != only], [only]
    if not resume:
        return [], list(order)
    done = {p.name: p for p in previous if p.status in PASSED}
    first = next((i for i, name in enumerate(order) if name not in done), len(order))
    return [done[name] for name in order[:first]], list(order[first:])


# -- the ledger and its summary ----------------------------------------------------------------


@dataclass
class Ledger:
    model: str
    api: str
    nodes: list[dict[str, str]] = field(default_factory=list)  # name, node_id, api
    model_dirs: dict[str, str] = field(default_factory=dict)  # node name -> dir
    instance_id: str | None = None
    phases: list[PhaseResult] = field(default_factory=list)  # in PHASES order

    def record(self, result: PhaseResult) -> None:
        kept = [p for p in self.phases if p.name != result.name]
        self.phases = sorted([*kept, result], key=lambda p: PHASES.index(p.name))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        return cls(
            model=data["model"],
            api=data.get("api", ""),
            nodes=list(data.get("nodes", [])),
            model_dirs=dict(data.get("model_dirs", {})),
            instance_id=data.get("instance_id"),
            phases=[PhaseResult.from_record(p) for p in data.get("phases", [])],
        )


def passed_prefix(ledger: Ledger, order: Sequence[str]) -> list[PhaseResult]:
    """The phases that passed, in order, up to the first that did not (or has not run)."""
    by_name = {p.name: p for p in ledger.phases}
    out = []
    for name in order:
        if name not in by_name or by_name[name].status not in PASSED:
            break
        out.append(by_name[name])
    return out


def failed_phase(ledger: Ledger) -> PhaseResult | None:
    """The earliest phase that failed: the gate that blocks the run (with --only, whichever
    phase was run)."""
    return next((p for p in ledger.phases if p.status == FAIL), None)


def current_phase(ledger: Ledger, order: Sequence[str]) -> str:
    if failed := failed_phase(ledger):
        return failed.name
    passed = passed_prefix(ledger, order)
    return order[len(passed)] if len(passed) < len(order) else COMPLETE


def last_pass_phase(ledger: Ledger, order: Sequence[str]) -> str:
    passed = passed_prefix(ledger, order)
    return passed[-1].name if passed else "none"


def known_blocker(ledger: Ledger) -> str:
    failed = failed_phase(ledger)
    return f"{failed.name}: {failed.blocker}" if failed else "none"


def strongest_evidence(ledger: Ledger, order: Sequence[str]) -> str:
    """The headline of the furthest phase that passed: a chat beats a placement beats a join."""
    passed = passed_prefix(ledger, order)
    return f"{passed[-1].name}: {passed[-1].evidence[0]}" if passed else "none yet"


def next_command(ledger: Ledger, order: Sequence[str]) -> str:
    """The failed phase's own command; the bench once all passed; else resume."""
    if current_phase(ledger, order) == COMPLETE:
        if "bench" not in order:
            return bootstrap_command(ledger.model, ledger.api, "--resume", "--bench")
        return shlex.join(["shoal", "chat", "--api", ledger.api, "--model", ledger.model])
    failed = failed_phase(ledger)
    if failed and failed.next_command:
        return failed.next_command
    return bootstrap_command(ledger.model, ledger.api, "--resume")


DO_NOT_REPEAT = {
    "preflight": "preflight passed at {t}: nodes, disk and model dirs are checked",
    "audit": "audit passed at {t}: the files are complete and identical; do not re-download",
    "canary": "canary passed at {t}: every node lists the model",
    "join": "join passed at {t}: the nodes see each other; do not restart them",
    "placement": "placement passed at {t}: instance {instance} is ready; do not create another",
    "transport": "transport passed at {t}: the instance's ports answer both ways",
    "first_chat": "first chat passed at {t}: every node answers (serving truth)",
    "bench": "bench passed at {t}: results are in bench.jsonl",
}


def do_not_repeat(ledger: Ledger, order: Sequence[str]) -> list[str]:
    return [
        DO_NOT_REPEAT[p.name].format(t=p.finished_at, instance=ledger.instance_id or "?")
        for p in passed_prefix(ledger, order)
    ]


def handoff_fields(ledger: Ledger, order: Sequence[str]) -> dict[str, str]:
    nodes = ", ".join(f"{n['name']} ({n['node_id']}, {n.get('api') or '?'})" for n in ledger.nodes)
    dirs = "; ".join(f"{name}={d}" for name, d in sorted(ledger.model_dirs.items()))
    return {
        "MODEL": ledger.model,
        "NODES": nodes or "not checked yet",
        "MODEL_DIRS": dirs or "not checked yet",
        "LAST_PASS_PHASE": last_pass_phase(ledger, order),
        "CURRENT_PHASE": current_phase(ledger, order),
        "KNOWN_BLOCKER": known_blocker(ledger),
        "STRONGEST_EVIDENCE": strongest_evidence(ledger, order),
        "NEXT_COMMAND": next_command(ledger, order),
        "DO_NOT_REPEAT": "; ".join(do_not_repeat(ledger, order)) or "none",
    }


def render_handoff(fields: dict[str, str]) -> str:
    return "```\n" + "\n".join(f"{key}: {fields[key]}" for key in HANDOFF_KEYS) + "\n```"


def ledger_document(ledger: Ledger, order: Sequence[str], now: str) -> dict[str, Any]:
    return {
        "model": ledger.model,
        "api": ledger.api,
        "nodes": ledger.nodes,
        "model_dirs": ledger.model_dirs,
        "instance_id": ledger.instance_id,
        "phases": [p.record() for p in ledger.phases],
        "last_pass_phase": last_pass_phase(ledger, order),
        "current_phase": current_phase(ledger, order),
        "known_blocker": known_blocker(ledger),
        "strongest_evidence": strongest_evidence(ledger, order),
        "next_command": next_command(ledger, order),
        "do_not_repeat": do_not_repeat(ledger, order),
        "updated_at": now,
    }


# -- RUN.md ------------------------------------------------------------------------------------

HANDOFF_90S = """\
1. Read the Hand-off Block at the bottom: MODEL, NODES, MODEL_DIRS, then NEXT_COMMAND.
2. Confirm the target nodes, the model id and each node's model dir (Current Run Header).
3. Confirm the files are complete and identical on every node (audit: RING_INPUT_READY)
   before any placement.
4. Confirm the cluster join (enough nodes alive) before any benchmark.
5. Confirm serving truth with a real /v1/chat/completions on every node, not /state maps.
6. Only then run long benchmarks. After a fix, `shoal bootstrap MODEL --resume` runs again
   from the first phase that did not pass; passed phases are not repeated."""

PHASE_GATES = (
    ("phase", "PASS if", "STOP if"),
    ("preflight", "every node alive and answering from here; no version or flag drift; disk "
     "over the threshold; card not blocked; model dir on every node",
     "a node gone or unreachable, drift, too little disk, a blocked card, a node without the "
     "model"),
    ("audit", "no partial files, required files, one format, shard count, parity (path + "
     "size; sha256 with --hash): RING_INPUT_READY", "any FAIL line"),
    ("canary", "each node's /state answers and /v1/models?status=downloaded lists the model",
     "a node that does not list it"),
    ("join", "--min-nodes nodes alive within --join-timeout, all of them audited",
     "the cluster stays smaller (isolated), or a node joined after the audit"),
    ("placement", "an instance of the model, every runner ready or running",
     "a failed runner, nodeToRunner empty, not ready within --ready-timeout"),
    ("transport", "every instance node reaches the store port, rank 0's endpoint and the "
     "other nodes' APIs", "connection refused or a timeout on any of them"),
    ("first_chat", "every node answers a chat completion with 200 and choices",
     "a timeout, an error, no choices"),
    ("bench", "`shoal bench` exits 0; results in bench.jsonl", "a non-zero exit"),
)  # fmt: skip

FAILURE_SIGNATURES = (
    ("symptom", "likely cause", "next command"),
    ("a node lacks the model, or MODEL_DIRS changed since the last run",
     "path drift: the files sit in another dir than the one the node serves from",
     "`curl http://NODE/models`; one dir per node (SHOAL_MODELS_DIR, "
     "SHOAL_MODELS_READONLY_DIRS), then `shoal audit MODEL`"),
    ("parity differs only in cache files", "HF cache metadata (`.cache/huggingface`)",
     "none: manifests leave it out; a parity FAIL names a serving file, re-pull it there"),
    ("`.incomplete` / `.part` files", "an interrupted download",
     "`curl -X POST http://NODE/models/pull -d '{\"model\": \"MODEL\"}'`, then audit"),
    ("version or flag drift", "tool asymmetry: nodes run other shoal builds or settings",
     "install one shoal with the same flags everywhere (`shoal doctor` lists the drift)"),
    ("join: one node alone for over a minute",
     "another namespace or secret, no `--peers`, a firewalled API port, offline flags",
     "`curl API/state` (refused, drift); same namespace and `--peers HOST:PORT` everywhere"),
    ("/state shows runners but chat fails, or chat works while nodeToRunner lags",
     "/state lags serving truth", "trust first_chat: `curl API/v1/chat/completions`"),
    ("a runner failed, or nodeToRunner stays empty",
     "files differ, too little memory, a process group that never met",
     "`curl API/instance/ID`; `shoal doctor`"),
    ("connection refused on the store or endpoint port",
     "a firewall, or the rank bound to another interface",
     "`curl 'http://NODE/cluster/reach?host=H&port=P'`; `shoal doctor`"),
    ("a long benchmark looks hung", "no heartbeat",
     "`shoal bench` prints a heartbeat and appends each cell to bench.jsonl as it ends"),
    ("the model card says blocked", "the model is marked unsafe to run",
     "`shoal bootstrap MODEL --allow-blocked` once you accept the risk"),
)  # fmt: skip


def _table(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def render_run_md(ledger: Ledger, order: Sequence[str], now: str) -> str:
    fields = handoff_fields(ledger, order)
    nodes = [("node", "id", "API", "model dir")] + [
        (n["name"], n["node_id"], n.get("api") or "?", ledger.model_dirs.get(n["name"], "?"))
        for n in ledger.nodes
    ]
    runs = "\n".join(
        f"- {p.finished_at} **{p.name}** {p.status.upper()} ({p.seconds:.1f} s): "
        f"{p.evidence[0] if p.evidence else ''}"
        for p in ledger.phases
    )
    sections = [
        f"# shoal bootstrap: {ledger.model}",
        f"## 90-Second Handoff\n\n{HANDOFF_90S}",
        f"## Current Run Header\n\n- model: `{ledger.model}`\n- API: {ledger.api}\n"
        f"- instance: {ledger.instance_id or 'none yet'}\n"
        f"- known blockers: {fields['KNOWN_BLOCKER']}\n- updated: {now}\n\n{_table(nodes)}",
        f"## Phase Gates\n\n{_table(PHASE_GATES)}",
        f"## Failure Signatures\n\n{_table(FAILURE_SIGNATURES)}",
        f"## Run Ledger\n\n{runs or '- no phase has run yet'}",
        f"## Hand-off Block\n\n{render_handoff(fields)}",
    ]
    return "\n\n".join(sections) + "\n"


def write_ledger(report_dir: Path, ledger: Ledger, order: Sequence[str]) -> None:
    """ledger.json and RUN.md, each replaced whole: a crash never leaves half a file."""
    now = now_text()
    report_dir.mkdir(parents=True, exist_ok=True)
    document = json.dumps(ledger_document(ledger, order, now), indent=2) + "\n"
    _write_atomic(report_dir / "ledger.json", document)
    _write_atomic(report_dir / "RUN.md", render_run_md(ledger, order, now))


def read_ledger(report_dir: Path) -> Ledger | None:
    try:
        return Ledger.from_json(json.loads((report_dir / "ledger.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def now_text() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
