"""The phase gates of `shoal bootstrap`, as pure verdicts: each `judge_*` takes what a phase
saw (the /state document, manifests, probes, answers) and returns its PhaseResult: the gates
with PASS/WARN/FAIL, the evidence, the blocker and the command to run next.

--fast turns the strict-only gates (drift, disk threshold, shard count, late joiners) into
warnings; file integrity, parity, placement, transport and a failed chat always stop the run.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from shoal.models.manifest import Manifest
from shoal.ops import audit
from shoal.ops.client import DEFAULT_API
from shoal.schema.documents import NodeRow, StateDocument
from shoal.schema.exo import InstanceBody
from shoal.schema.report import StoreState

PASS, WARN, FAIL = "pass", "warn", "fail"
PASSED = (PASS, WARN)  # a phase with warnings still opens the next gate
PHASES = ("preflight", "audit", "canary", "join", "placement", "transport", "first_chat", "bench")
SERVING = ("ready", "running")
STRICT_AUDIT_CHECKS = ("shard count",)  # an expectation; the other checks are file integrity
GB = 1e9


def bootstrap_command(model: str, api: str, *extra: str) -> str:
    return shlex.join(["shoal", "bootstrap", model, "--api", api, *extra])


# -- gates and phase results -------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    name: str
    status: str  # pass | warn | fail
    detail: str
    strict: bool = False  # a strict-only check: --fast turns its failure into a warning
    next_command: str = ""  # what to run when it fails

    def line(self) -> str:
        return f"{self.status.upper()} {self.name}: {self.detail}"


def gate(name: str, ok: bool, detail: str, *, strict: bool = False, next_command: str = "") -> Gate:
    return Gate(name, PASS if ok else FAIL, detail, strict, next_command)


def apply_fast(gates: Iterable[Gate], fast: bool) -> tuple[Gate, ...]:
    """--fast: strict-only failures (drift, disk threshold, shard count) become warnings; file
    integrity, parity and serving failures never do."""
    return tuple(
        replace(g, status=WARN, detail=f"{g.detail} (--fast: warning only)")
        if fast and g.strict and g.status == FAIL
        else g
        for g in gates
    )


@dataclass(frozen=True)
class PhaseResult:
    name: str
    status: str  # pass | warn | fail
    evidence: tuple[str, ...] = ()  # the first line is the headline (the blocker on failure)
    checks: tuple[Gate, ...] = ()
    next_command: str = ""
    blocker: str = ""
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """Its entry in ledger.json (the checks are among the evidence lines)."""
        out = asdict(self)
        del out["checks"]
        return {**out, "evidence": list(self.evidence), "seconds": round(self.seconds, 2)}

    @classmethod
    def from_record(cls, entry: dict[str, Any]) -> PhaseResult:
        known = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "evidence": tuple(known.get("evidence", ())), "checks": ()})


def conclude(
    name: str,
    gates: Iterable[Gate],
    *,
    fast: bool = False,
    headline: str = "",
    evidence: Iterable[str] = (),
    next_command: str = "",
) -> PhaseResult:
    """A phase's verdict from its gates: the first failing gate is the blocker and names the
    next command (or the phase's own)."""
    checks = apply_fast(gates, fast)
    failed = [g for g in checks if g.status == FAIL]
    status = FAIL if failed else WARN if any(g.status == WARN for g in checks) else PASS
    blocker = f"{failed[0].name}: {failed[0].detail}" if failed else ""
    lines = (blocker or headline, *(g.line() for g in checks), *evidence)
    chosen = (failed[0].next_command or next_command) if failed else ""
    return PhaseResult(name, status, lines, checks, chosen, blocker)


@dataclass(frozen=True)
class Options:
    model: str
    api: str = DEFAULT_API
    report_dir: Path = Path(".")
    min_nodes: int = 2
    sharding: str | None = None
    instance_meta: str | None = None
    allow_blocked: bool = False
    expect_shards: int | None = None
    hash: bool = False
    min_disk_gb: float | None = None
    join_timeout: float = 60.0
    ready_timeout: float = 300.0
    bench: bool = False
    bench_args: str = ""
    resume: bool = False
    fast: bool = False
    only: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never in the ledger or a command

    def command(self, *extra: str) -> str:
        """This bootstrap again, e.g. with --resume."""
        return bootstrap_command(self.model, self.api, *extra)


@dataclass(frozen=True)
class NodeApi:
    node_id: str
    name: str
    api: str | None  # the base URL that answered from here
    error: str = ""


# -- verdicts -----------------------------------------------------------------------------------


def pull_command(model: str, node: NodeApi | None, name: str) -> str:
    where = node.api if node and node.api else "http://NODE:52415"
    body = json.dumps({"model": model})
    return (
        f"curl -X POST {where}/models/pull -H 'Content-Type: application/json' -d '{body}'"
        f"  # or on {name}: shoal models pull {model}"
    )


def judge_preflight(
    opts: Options,
    state: StateDocument | dict[str, Any],
    apis: Sequence[NodeApi],
    manifests: dict[str, Manifest | str],
    card: dict[str, Any],
    previous_dirs: dict[str, str],
) -> PhaseResult:
    state = StateDocument.of(state)
    nodes, drift = state.nodes, state.drift
    down = [n.name for n in nodes if n.status != "alive"]
    silent = [a for a in apis if a.api is None]
    silent_names = ", ".join(a.name for a in silent)
    gates = [
        gate(
            "nodes alive",
            not down,
            ", ".join(_node_status(n) for n in nodes),
            next_command=f"start shoal on {', '.join(down)} again; why: curl {opts.api}/state",
        ),
        gate(
            "APIs answer from here",
            not silent,
            "; ".join(f"{a.name} {a.api or 'no answer: ' + a.error}" for a in apis),
            next_command=f"open {silent_names}'s API port to this machine (`shoal run --host` "
            "there), then curl http://HOST:PORT/health",
        ),
        gate(
            "version and flag drift",
            not drift,
            "; ".join(drift) or "none",
            strict=True,
            next_command=f"install one shoal with the same flags on every node (`shoal doctor "
            f"--api {opts.api}` lists the drift), or {opts.command('--fast')}",
        ),
    ]
    if refused := state.refused:
        detail = "; ".join(f"{r.name}: {r.reason}" for r in refused)
        gates.append(Gate("refused peers", WARN, detail))
    gates += [_disk_gate(opts, nodes, card), _card_gate(opts, card)]
    missing = sorted(n for n, m in manifests.items() if not isinstance(m, Manifest))
    dirs = {n: m.dir for n, m in manifests.items() if isinstance(m, Manifest)}
    first = missing[0] if missing else ""
    gates.append(
        gate(
            "model dir on every node",
            bool(manifests) and not missing,
            "; ".join(f"{n}: {dirs.get(n) or manifests[n]}" for n in sorted(manifests))
            or "no node answered",
            next_command=pull_command(
                opts.model, next((a for a in apis if a.name == first), None), first
            ),
        )
    )
    # Path drift: the same node serving the model from another dir than last run.
    if moved := {n: d for n, d in dirs.items() if previous_dirs.get(n, d) != d}:
        detail = "; ".join(f"{n}: {previous_dirs[n]} -> {d}" for n, d in sorted(moved.items()))
        gates.append(Gate("model dirs as in the last run", WARN, detail + " (path drift?)"))
    names = ", ".join(a.name for a in apis)
    headline = f"{len(apis)} node(s) alive and answering ({names}); the model is on each"
    return conclude("preflight", gates, fast=opts.fast, headline=headline)


def _node_status(node: NodeRow) -> str:
    reason = f" ({node.gone_reason})" if node.gone_reason else ""
    return f"{node.name} {node.status}{reason}"


def _disk_gate(opts: Options, nodes: Sequence[NodeRow], card: dict[str, Any]) -> Gate:
    need = opts.min_disk_gb if opts.min_disk_gb is not None else card.get("min_disk_gb")
    short, parts = [], []
    for n in (n for n in nodes if n.status == "alive"):
        store = n.store or StoreState()
        free, total = store.disk_free / GB, store.disk_total / GB
        parts.append(f"{n.name} {free:.1f} GB free of {total:.1f}")
        if need is not None and free < need:
            short.append(n.name)
    threshold = f"need {need} GB" if need is not None else "no threshold set"
    return gate(
        "disk space",
        not short,
        f"{'; '.join(parts)} ({threshold})",
        strict=True,
        next_command=f"free disk on {', '.join(short)}, or {opts.command('--fast')}",
    )


def _card_gate(opts: Options, card: dict[str, Any]) -> Gate:
    status = card.get("status", "active")
    note = f" ({card['status_note']})" if card.get("status_note") else ""
    if status == "blocked" and not opts.allow_blocked:
        return gate(
            "model card",
            False,
            f"blocked{note}: not placed without --allow-blocked",
            next_command=opts.command("--allow-blocked") + "  # once you accept the risk",
        )
    if status == "blocked":
        return Gate("model card", WARN, f"blocked{note}, overridden by --allow-blocked")
    if status in ("watch", "deprecated"):
        return Gate("model card", WARN, f"{status}{note}")
    return gate("model card", True, status)


def judge_audit(
    opts: Options, manifests: dict[str, Manifest | str], card: dict[str, Any]
) -> PhaseResult:
    expect = opts.expect_shards if opts.expect_shards is not None else card.get("expected_shards")
    checks = audit.audit(manifests, expect_shards=expect, hash=opts.hash)
    again = ["shoal", "audit", opts.model, "--api", opts.api] + (["--hash"] if opts.hash else [])
    fix = f"re-pull on the node the FAIL line names (POST /models/pull), then {shlex.join(again)}"
    gates = [
        gate(c.name, c.ok, c.detail, strict=c.name in STRICT_AUDIT_CHECKS, next_command=fix)
        for c in checks
    ]
    headline = f"{audit.READY}: {checks[-1].detail}"  # parity is the last check
    return conclude("audit", gates, fast=opts.fast, headline=headline)


def judge_canary(opts: Options, problems: dict[str, tuple[NodeApi, str | None]]) -> PhaseResult:
    """problems: node name -> (its API, why it fails the canary, or None)."""
    gates = [
        gate(
            f"{name} alone",
            problem is None,
            problem or f"{node.api}: /state answers, {opts.model} is downloaded",
            next_command=f"curl '{node.api}/v1/models?status=downloaded'  # on {name}: check "
            "`shoal run --model` and SHOAL_MODELS_DIR, and GET /models",
        )
        for name, (node, problem) in sorted(problems.items())
    ]
    headline = f"{len(problems)} node(s) list {opts.model} as downloaded"
    return conclude("canary", gates, fast=opts.fast, headline=headline)


def judge_join(
    opts: Options,
    state: StateDocument | dict[str, Any],
    waited_s: float,
    audited: Iterable[str] = (),
) -> PhaseResult:
    """audited: the nodes preflight and audit saw (none given: not checked)."""
    state = StateDocument.of(state)
    nodes = state.nodes
    alive = [n.name for n in nodes if n.status == "alive"]
    isolated = " (cluster isolated)" if len(alive) == 1 < opts.min_nodes else ""
    gates = [
        gate(
            "nodes alive",
            len(alive) >= opts.min_nodes,
            f"{len(alive)} of --min-nodes {opts.min_nodes} after {waited_s:.0f} s{isolated}",
            next_command=f"start {opts.min_nodes - len(alive)} more node(s) in this namespace "
            f"(shoal run --peers {opts.api.split('://')[-1]}); see refused/drift in curl "
            f"{opts.api}/state; then {opts.command('--resume')}",
        )
    ]
    # A node that joined after the audit never had its files checked: no inference on it yet.
    audited = set(audited)
    if audited and (late := sorted(set(alive) - audited)):
        gates.append(
            gate(
                "every node audited",
                False,
                f"{', '.join(late)} joined after the audit",
                strict=True,
                next_command=opts.command(),
            )
        )
    seen = [f"nodes visible: {len(nodes)}, alive {len(alive)} ({', '.join(alive)})"]
    seen += [_node_status(n) for n in nodes if n.status != "alive"]
    seen += [f"refused {r.name}: {r.reason}" for r in state.refused]
    seen += [f"drift: {d}" for d in state.drift]
    headline = f"{len(alive)} nodes alive ({', '.join(alive)}), --min-nodes {opts.min_nodes}"
    return conclude("join", gates, fast=opts.fast, headline=headline, evidence=seen)


def judge_placement(
    opts: Options,
    body: InstanceBody | dict[str, Any],
    names: dict[str, str],
    how: str,
    waited_s: float,
) -> PhaseResult:
    """body: the instance's body (exo's camelCase keys where a dict); names: node id ->
    name; how: 'created' or 'reused'."""
    if not isinstance(body, InstanceBody):
        body = InstanceBody.model_validate(body)
    iid, node_to_runner = body.instance_id, body.node_to_runner
    status = {rid: s.status for rid, s in body.runner_status.items()}
    reasons = {rid: s.reason for rid, s in body.runner_status.items()}
    failed = [f"{rid} failed: {reasons[rid]}" for rid, s in status.items() if s == "failed"]
    runners = [
        f"{names.get(n, n)} {rid} {status.get(rid, 'pending')}" for n, rid in node_to_runner.items()
    ]
    inspect = f"curl {opts.api}/instance/{iid}  # and: shoal doctor --api {opts.api}"
    gates = [
        gate("nodeToRunner", bool(node_to_runner), f"{len(node_to_runner)} runner(s)"),
        gate("no failed runner", not failed, "; ".join(failed) or "none"),
        gate(
            "every runner ready",
            bool(status) and all(s in SERVING for s in status.values()),
            f"{'; '.join(runners) or 'none'} after {waited_s:.0f} s",
        ),
    ]
    if 0 < len(node_to_runner) < opts.min_nodes:
        detail = f"{len(node_to_runner)} node(s), fewer than --min-nodes {opts.min_nodes}"
        gates.append(Gate("instance size", WARN, detail))
    headline = (
        f"instance {iid} ({how}, generation {body.generation}): "
        f"{len(node_to_runner)} runner(s) ready"
    )
    return conclude("placement", gates, fast=opts.fast, headline=headline, next_command=inspect)


@dataclass(frozen=True)
class Probe:
    source: str  # the node that dialed
    target: str  # "store", "rank 0 endpoint", "b's API"
    host: str
    port: int
    ok: bool
    detail: str  # "0.4 ms" or the error


def judge_transport(opts: Options, probes: Sequence[Probe]) -> PhaseResult:
    gates = [
        gate(
            f"{p.source} -> {p.target}",
            p.ok,
            f"{p.host}:{p.port} {p.detail}",
            next_command=f"on {p.source}: nc -vz -w 2 {p.host} {p.port}  # check its firewall, "
            f"and shoal doctor --api {opts.api}",
        )
        for p in probes
    ]
    if not probes:
        place = opts.command("--only", "placement")
        gates = [gate("instance ports", False, "no instance of the model", next_command=place)]
    sources = ", ".join(sorted({p.source for p in probes}))
    headline = f"{len(probes)} connections from {sources}: store, rank 0 and each other's API"
    return conclude("transport", gates, fast=opts.fast, headline=headline)


@dataclass(frozen=True)
class ChatAnswer:
    name: str
    api: str
    ok: bool
    seconds: float
    detail: str  # the text, or the error


def chat_body(model: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Reply with exactly OK"}]
    return {
        "model": model,
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0,
        "stream": False,
    }


def judge_first_chat(opts: Options, answers: Sequence[ChatAnswer]) -> PhaseResult:
    body = json.dumps(chat_body(opts.model))
    gates = [
        gate(
            f"{a.name} chat",
            a.ok,
            f"{a.api} {a.seconds:.2f} s: {a.detail}",
            next_command=f"curl {a.api}/v1/chat/completions -H 'Content-Type: "
            f"application/json' -d '{body}'",
        )
        for a in answers
    ] or [gate("chat", False, "no node to ask")]
    timings = ", ".join(f"{a.name} {a.seconds:.2f} s" for a in answers)
    headline = f"{len(answers)} node(s) answered 200 with choices ({timings})"
    return conclude("first_chat", gates, fast=opts.fast, headline=headline)


def bench_command(opts: Options, out: Path) -> list[str]:
    """Only --api, --model and --out of bench's flags; the rest comes from --bench-args."""
    flags = ["--api", opts.api, "--model", opts.model, "--out", str(out)]
    return [sys.executable, "-m", "shoal.ops.bench", *flags, *shlex.split(opts.bench_args)]
