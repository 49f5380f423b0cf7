"""Reasons and events as data: a code, the nodes, the path and the measured numbers as fields.

A `Reason` is what placement refuses with, what review moves an instance for, what an event
says. It is rendered to text in one place (`render`, the sentences operators read in API answers
and logs) and to text with the node ids marked (`parts`, so the dashboard shows node names from
the fields instead of rewriting ids inside prose). Two reasons "say the same thing" when their
`key()`s match: the code and every field except the measured numbers, which move every tick.

Frozen dataclasses (the planner builds many of these per placement) importing nothing from shoal.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PathRef:
    """A path between two nodes: src dials dst at host ("" when no one address is meant)."""

    src: str
    dst: str
    host: str = ""


@dataclass(frozen=True)
class Reason:
    code: str
    nodes: tuple[str, ...] = ()  # the nodes it names, in the order it names them
    path: PathRef | None = None
    measured: tuple[tuple[str, Any], ...] = ()  # (name, number): moves every tick
    facts: tuple[tuple[str, Any], ...] = ()  # (name, value): a value may be a Reason or Refusal

    def fact(self, name: str, default: Any = None) -> Any:
        return next((v for k, v in self.facts if k == name), default)

    def number(self, name: str) -> Any:
        return next((v for k, v in self.measured if k == name), None)

    def key(self) -> tuple[Any, ...]:
        """What the reason says, without its measured numbers (nested reasons alike)."""
        return (self.code, self.nodes, self.path, tuple((k, _key(v)) for k, v in self.facts))

    def as_dict(self) -> dict[str, Any]:
        """The reason as JSON data (events, API documents)."""
        out: dict[str, Any] = {"code": self.code, "nodes": list(self.nodes)}
        if self.path is not None:
            out["path"] = {"src": self.path.src, "dst": self.path.dst, "host": self.path.host}
        if self.measured:
            out["measured"] = {k: _json(v) for k, v in self.measured}
        if self.facts:
            out["facts"] = {k: _json(v) for k, v in self.facts}
        return out


def reason(
    code: str,
    *,
    nodes: Iterable[str] = (),
    path: PathRef | None = None,
    measured: Mapping[str, Any] | None = None,
    **facts: Any,
) -> Reason:
    """Reason(code, ...) with the measured numbers and facts given as keywords."""
    return Reason(
        code,
        tuple(nodes),
        path,
        tuple(sorted((measured or {}).items())),
        tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in facts.items())),
    )


@dataclass(frozen=True)
class CandidateReason:
    """Why one node set cannot host a model (nodes: the set; empty when it rules out all)."""

    nodes: tuple[str, ...]
    reason: Reason

    def key(self) -> tuple[Any, ...]:
        return (self.nodes, self.reason.key())

    @property
    def text(self) -> str:
        return render(self.reason)


@dataclass(frozen=True)
class Refusal:
    reasons: tuple[CandidateReason, ...] = ()

    def text(self) -> str:
        """One line for people: each reason, prefixed by the node set it rules out."""
        return render(self)

    def key(self) -> tuple[Any, ...]:
        return tuple(r.key() for r in self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {"reasons": [{"nodes": list(r.nodes), **r.reason.as_dict()} for r in self.reasons]}


def refusal(*reasons: Reason, nodes: Iterable[str] = ()) -> Refusal:
    return Refusal(tuple(CandidateReason(tuple(nodes), r) for r in reasons))


def _key(value: Any) -> Any:
    if isinstance(value, Reason | Refusal | CandidateReason):
        return value.key()
    return value


def _json(value: Any) -> Any:
    if isinstance(value, Reason | Refusal):
        return value.as_dict()
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    return value


# ---- the renderer ------------------------------------------------------------------------------

# {node} nodes[0], {nodes} all of them, {others} nodes[1:], {src} {dst} {host} the path; any
# other name a fact or a measured number. Node specs: "" the id, "short" its first 8 characters,
# "name" the node's name where known, "label" "name (short id)", "repr" a Python list of ids.
TEMPLATES: dict[str, str] = {
    # placement (planner, plan, the controller's checks before it)
    "node_not_alive": "node {node} is not alive",
    "no_cuda": "node {node} has no CUDA GPU (the nccl backend needs one per rank)",
    "no_backend": "node {node} may not run {model} over {backend} (its card and engines "
    "allow {allowed}){hint}",
    "mlx_layout": "mlx-lm on node {node} cannot run {arch} as {sharding}{hint}",
    "no_rdma": "jaccl needs RDMA on every link: {src} -> {dst} at {host} goes over "
    "{interface}, which has no RDMA device (enable RDMA on it, or use MlxRingInstance)",
    "too_few_nodes": "needs >= {needed} nodes, {alive} alive{with_cuda}",
    "tensor_indivisible": "tensor parallel over {ways} nodes: {indivisible} "
    "not divisible by {ways}",
    "too_few_layers": "pipeline over {ways} nodes: only {layers} layers",
    "memory": "node {node} has {have_gib:.1f} GiB available, needs {need_gib:.1f} GiB "
    "(weights {weights_gib:.1f} + KV {kv_gib:.1f} + headroom {headroom_gib:.1f})",
    "no_path": "no working path {src} -> {dst} ({seen})",
    "no_common_address": "no single address of {node} is reachable from all of {others:repr}",
    "no_path_either_way": "no working path between {src} and {dst} either way",
    "files_differ": "node {node}'s files of {model} differ from {agreeing} other node(s) "
    "(digest {digest} vs {majority}): run `shoal audit {model}`",
    "blocked": "{model} is blocked by its model card{note}; place it anyway with "
    "allow_blocked=true (CLI: --allow-blocked) once you accept the risk, or set its "
    "status in {where}",
    "not_held": "no alive node holds {model}; held models: {held}",
    "lacks_model": "node {node} does not hold {model}",
    "preflight": "preflight: {check}{better}",
    # preflight checks of one path
    "path_check": "{src:short} -> {dst:short} at {host} ({kind}, {rtt}, loss {loss:.0%}){problem}",
    "probes_unanswered": "probes go unanswered",
    "loss_over": "loss {loss:.0%} is over {max_loss:.0%}",
    "rtt_over_bound": "RTT {rtt_ms:.1f} ms is over the {kind} bound {bound_ms:g} ms",
    "other_side_only": "measured from the other side only",
    "better_path": "{host} ({kind}, RTT {rtt_ms:.1f} ms)",
    # review: why an instance cannot serve as placed, or should move
    "node_gone": "node {nodes:short} is gone",
    "rank_failed": "rank {rank} failed: {detail}",
    "path_down": "path {src:short} -> {dst:short} at {host} is down",
    "path_slower": "path {src:short} -> {dst:short} at {host} now takes {current_ms:.1f} ms; "
    "a layout whose slowest path takes {best_ms:.1f} ms is available",
    "throughput_low": "rank 0 on {node:short} decodes {tok_s:.1f} tok/s, {share:.0%} of its "
    "baseline {baseline_tok_s:.1f} tok/s (floor {floor:.0%}), for {serving_s:.0f} s of serving",
    # the leader's tick and the node's history
    "auto_refused": "waiting to place {model} (--min-nodes {min_nodes}): {refusal}",
    "auto_placed": "placed {model} on {nodes} (auto, --min-nodes {min_nodes})",
    "moved": "instance {instance} ({model}) re-placed on {nodes:name} at {store}: {cause}",
    "unmovable": "{cause}; no other layout: {refusal}",
    "instance_alert": "instance {instance}: {cause}",
    "runner_failed": "runner {runner} failed: {detail}",
    "post_refused": "POST /instance of {model}: The instance no longer fits the cluster: "
    "{refusal}.",
    "crash": "the previous run (boot {boot}, started {started}) ended without a clean stop",
    # cluster membership and path health (cluster.service)
    "member_joined": "node {node:label} joined",
    "member_back": "node {node:label} is back",
    "member_gone": "node {node:label} is gone: {detail}",
    "path_recovered": "path to {dst:name} at {host} ({kind}) is ok again",
    "path_health": "path to {dst:name} at {host} ({kind}): {detail}",
}


def _derived(r: Reason) -> dict[str, Any]:
    """Fields a sentence shows that are worked out of the data rather than stored."""
    code = r.code
    if code == "too_few_nodes":
        return {"with_cuda": " with a CUDA GPU" if r.fact("cuda") else ""}
    if code == "no_backend":
        allowed = r.fact("allowed", ())
        backend = r.fact("backend")
        hint = ""
        if backend in ("ring", "jaccl") and not {"ring", "jaccl"} & set(allowed):
            hint = "; install the MLX engine there: pip install 'shoal[mlx]'"
        elif backend == "jaccl" and "ring" in allowed:
            hint = "; JACCL (RDMA over Thunderbolt 5) runs on Macs: use MlxRingInstance here"
        return {"allowed": ", ".join(allowed) or "none", "hint": hint}
    if code == "mlx_layout":
        other = r.fact("other")
        return {"hint": f"; it can run as {other}" if other else ""}
    if code == "tensor_indivisible":
        return {"indivisible": " / ".join(f"{v} {name}" for name, v in r.fact("indivisible", ()))}
    if code == "no_path":
        seen = zip(r.fact("hosts", ()), r.number("losses") or (), strict=False)
        text = ", ".join(f"{h} loss {loss:.0%}" for h, loss in seen)
        return {"seen": f"measured: {text}" if text else "unmeasured"}
    if code == "blocked":
        note = r.fact("status_note")
        return {
            "note": f" ({note})" if note else "",
            "where": r.fact("source") or "a card under <config>/cards/",
        }
    if code == "not_held":
        return {"held": ", ".join(r.fact("held_models", ())) or "none"}
    if code == "preflight":
        better = r.fact("better")
        return {"better": ("; better measured path: ", better) if better else ""}
    if code == "path_check":
        rtt = r.number("rtt_ms")
        problem = r.fact("problem")
        return {
            "rtt": "unmeasured" if rtt is None else f"RTT {rtt:.1f} ms",
            "problem": (": ", problem) if problem else "",
        }
    return {}


@dataclass(frozen=True)
class _Node:
    node_id: str
    style: str


Segment = str | _Node


def _segments(x: Reason | Refusal | CandidateReason) -> list[Segment]:
    if isinstance(x, Refusal):
        out: list[Segment] = []
        for i, candidate in enumerate(x.reasons):
            out += ["; "] if i else []
            out += _segments(candidate)
        return out or ["no candidate node set"]
    if isinstance(x, CandidateReason):
        if not x.nodes:
            return _segments(x.reason)
        return ["[", *_nodes(x.nodes, ""), "] ", *_segments(x.reason)]
    template = TEMPLATES.get(x.code)
    if template is None:  # a code this version does not know (a newer peer's event)
        return [x.code]
    fields = {**dict(x.measured), **dict(x.facts), **_derived(x)}
    out = []
    for literal, name, spec, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out += _field(x, name, spec or "", fields)
    return out


def _field(r: Reason, name: str, spec: str, fields: Mapping[str, Any]) -> list[Segment]:
    path = r.path
    if name == "node":
        return _nodes(r.nodes[:1], spec)
    if name == "nodes":
        return _nodes(r.nodes, spec)
    if name == "others":
        return _nodes(r.nodes[1:], spec)
    if name in ("src", "dst"):
        return _nodes((getattr(path, name),) if path else (), spec)
    if name == "host":
        return [path.host if path else ""]
    return _value(fields.get(name), spec)


def _value(value: Any, spec: str) -> list[Segment]:
    if isinstance(value, Reason | Refusal | CandidateReason):
        return _segments(value)
    if isinstance(value, tuple) and any(isinstance(v, Reason | Refusal) for v in value):
        return [s for v in value for s in _value(v, spec)]
    if value is None:
        return ["None"]
    return [format(value, spec)]


def _nodes(ids: Iterable[str], spec: str) -> list[Segment]:
    ids = tuple(ids)
    if spec == "repr":
        out: list[Segment] = ["["]
        for i, n in enumerate(ids):
            out += [", '" if i else "'", _Node(n, ""), "'"]
        return [*out, "]"]
    out = []
    for i, n in enumerate(ids):
        out += [", "] if i else []
        out.append(_Node(n, spec))
    return out


def _node_text(node: _Node, names: Mapping[str, str]) -> str:
    short = node.node_id[:8]
    if node.style == "short":
        return short
    if node.style == "name":
        return names.get(node.node_id) or short
    if node.style == "label":
        return f"{names.get(node.node_id) or short} ({short})"
    return node.node_id


def render(x: Reason | Refusal | CandidateReason, names: Mapping[str, str] | None = None) -> str:
    """The sentence for people. names: node id -> name, for the nodes a sentence names by name."""
    names = names or {}
    return "".join(s if isinstance(s, str) else _node_text(s, names) for s in _segments(x))


def parts(x: Reason | Refusal | CandidateReason) -> list[str | dict[str, str]]:
    """The sentence as text runs and {"node": id} marks, for a page that shows node names."""
    out: list[str | dict[str, str]] = []
    for s in _segments(x):
        if isinstance(s, _Node):
            out.append({"node": s.node_id})
        elif s and out and isinstance(out[-1], str):
            out[-1] += s
        elif s:
            out.append(s)
    return out


def event_fields(r: Reason) -> dict[str, Any]:
    """What an event stores beside its kind, time and message: the reason as data and its
    parts (the dashboard renders those; `message` is `render(r)` for everyone else)."""
    return {**r.as_dict(), "parts": parts(r)}
