"""`shoal doctor`: what a node sees of the cluster: nodes, leader, every measured path, drift."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import httpx

from shoal.ops.client import (
    DEFAULT_API,
    START_HINT,
    ApiClient,
    ApiError,
    ApiUnreachable,
    add_api_key_flag,
    api_base,
)
from shoal.placement.addressing import host_of
from shoal.schema.documents import LinkRow, NodeRow, StateDocument
from shoal.schema.exo import HostPort, InstanceBody, RunnerStatus, ShardMetadata


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _short(node_id: str | None, names: dict[str, str]) -> str:
    if not node_id:
        return "?"
    return names.get(node_id, node_id[:8])


def render(state: StateDocument | dict[str, Any], out: TextIO) -> None:
    """The /state document as a report a person reads top to bottom (pure: no I/O but out)."""
    state = StateDocument.of(state)
    nodes = state.nodes
    names = {n.node_id: n.name or n.node_id[:8] for n in nodes}
    out.write(f"nodes ({len(nodes)}), leader {_short(state.leader, names)}\n")
    for n in nodes:
        marks = ("*" if n.is_leader else " ") + ("@" if n.is_self else " ")
        res = n.resources
        ram = f"{res.ram_available / 2**30:.1f}/{res.ram_total / 2**30:.1f} GiB"
        seen = f"seen {n.seconds_since_seen:.1f}s ago"
        out.write(
            f" {marks} {names[n.node_id]:<16} {n.node_id:<18} {n.status:<8}"
            f" v{n.version or '?'}  RAM {ram}  {seen}"
            + (f"  ({n.gone_reason})" if n.gone_reason else "")
            + "\n"
        )
        if n.engines:
            out.write(f"      runs {', '.join(n.engines)}; backends {', '.join(n.backends)}\n")
        for i in n.interfaces:
            if i.kind != "loopback" and i.addresses:
                out.write(f"      {i.name:<12} {i.kind:<12} {', '.join(i.addresses)}\n")
    links = state.links
    out.write(f"\npaths ({len(links)}): from -> to, as recorded by one side\n")
    for row in links:
        status = "ok" if row.recent else "DOWN"
        if row.one_way:
            status = "ONE-WAY"
        out.write(
            f"  {_short(row.from_node, names):>12} {row.from_addr or '?':<16}"
            f" -> {_short(row.to_node, names):<12} {row.to_addr or '?':<16}"
            f" {row.interface_kind:<11} {row.direction:<8}"
            f" rtt {_ms(row.rtt_ms_ewma)} ms (p95 {_ms(row.rtt_ms_p95)})"
            f" loss {100 * (row.loss or 0):.0f}%  {status}"
            f"  [by {_short(row.recorded_by, names)}]\n"
        )
    out.write(f"\ndrift: {'none' if not state.drift else ''}\n")
    for line in state.drift:
        out.write(f"  ! {line}\n")
    for refused in state.refused:
        out.write(f"  refused {refused.node_id}: {refused.reason}\n")
    _render_models(nodes, names, out)
    _render_instances(state, names, out)
    _render_health(state, out)


def _render_models(nodes: Sequence[NodeRow], names: dict[str, str], out: TextIO) -> None:
    """Which node holds which model, whether their files agree, and downloads in flight."""
    holders: dict[str, dict[str, str | None]] = {}
    kinds: dict[str, set[str]] = {}  # "llama over gloo, ring" per node's copy
    for n in nodes:
        for m in n.models:
            holders.setdefault(m.model_id, {})[n.node_id] = m.files_digest
            layouts = f"; mlx {'/'.join(m.mlx_layouts)}" if m.mlx_layouts else ""
            kinds.setdefault(m.model_id, set()).add(
                f"{m.arch or '?'} over {', '.join(m.backends) or 'no backend'}{layouts}"
            )
    out.write(f"\nmodels ({len(holders)})\n")
    for model_id, held in sorted(holders.items()):
        digests = {d for d in held.values() if d}
        files = "files agree" if len(digests) <= 1 else "FILES DIFFER: run `shoal audit`"
        who = ", ".join(sorted(_short(n, names) for n in held))
        out.write(f"  {model_id:<44} on {who}  ({files})\n")
        for kind in sorted(kinds[model_id]):
            out.write(f"      {kind}\n")
    for n in nodes:
        for d in n.store.downloads if n.store else ():
            done = f"{d.bytes_done / 2**20:.0f}/{d.bytes_total / 2**20:.0f} MiB"
            error = f": {d.error}" if d.error else ""
            out.write(
                f"  pull {d.model_id} on {_short(n.node_id, names)}: {d.status} {done}{error}\n"
            )


def _render_health(state: StateDocument, out: TextIO) -> None:
    """Alerts now, then this node's history of crashes, moves and degradations."""
    if state.alerts is None:  # no controller on this node: /state has no alerts
        return
    alerts = state.alerts
    out.write(f"\nalerts: {'none' if not alerts else len(alerts)}\n")
    for a in alerts:
        out.write(f"  ! {a.kind} {a.status}: {a.message}\n")
    events = state.events or ()
    out.write(f"\nhistory ({len(events)} recent)\n")
    for e in events[-15:]:
        at = time.strftime("%H:%M:%S", time.localtime(e.at))
        out.write(f"  {at} {e.kind:<13} {e.message}\n")


def _render_instances(state: StateDocument, names: dict[str, str], out: TextIO) -> None:
    """Each instance's ranks and, per hop, the path it uses next to the others measured."""
    if state.instances is None:
        return
    out.write(f"\ninstances ({len(state.instances)})\n")
    for iid, entry in state.instances.items():
        ((meta, body),) = entry.items()
        ranks = _ranks(body)
        out.write(
            f"  {iid} {body.model_id} {body.sharding} {meta} ({body.backend})"
            f" store {body.store_address}\n"
        )
        for rank, node, rid, shard in ranks:
            status = body.runner_status.get(rid) or RunnerStatus()
            iface = body.rank_interfaces.get(node) or "any interface"
            reason = f" ({status.reason})" if status.reason else ""
            out.write(
                f"    rank {rank} {_short(node, names):<12} layers {shard.start_layer}-"
                f"{shard.end_layer}  {_host(body, node).ip} via {iface}"
                f"  {status.status}{reason}\n"
            )
        nodes = [node for _, node, _, _ in ranks]
        hops = list(zip(nodes, nodes[1:] + nodes[:1], strict=True)) if len(nodes) > 1 else []
        checks = (state.preflight or {}).get(iid)
        if checks is not None:
            failed = [c for c in checks if not c.ok]
            out.write(
                f"    preflight: {'ok' if not failed else 'FAILED'} ({len(checks)} paths checked)\n"
            )
            for c in failed:
                better = f"; better: {c.better}" if c.better else ""
                out.write(f"      ! {c.message}{better}\n")
        if body.placed_because:
            out.write(f"    generation {body.generation}: {body.placed_because}\n")
        for a, b in hops:
            out.write(
                f"    why {_short(a, names)} -> {_short(b, names)}: {_why(state, body, a, b)}\n"
            )


def _host(body: InstanceBody, node: str) -> HostPort:
    """The first address the instance gives the node (an empty one where it gives none)."""
    return (body.hosts_by_node.get(node) or (HostPort(),))[0]


def _ranks(body: InstanceBody) -> list[tuple[int, str, str, ShardMetadata]]:
    ranks = []
    for node, rid in body.node_to_runner.items():
        shard = body.shard(rid)
        ranks.append((shard.device_rank, node, rid, shard))
    return sorted(ranks, key=lambda rank: rank[:3])  # nodes are unique: shards never compared


def _why(state: StateDocument, body: InstanceBody, a: str, b: str) -> str:
    """The hop's chosen address against every other path measured from a to b."""
    chosen = _host(body, b).ip
    seen: dict[str, LinkRow] = {}
    for row in state.links:
        if row.from_node == a and row.to_node == b and row.to_addr:
            held = seen.get(host := host_of(row.to_addr))
            if held is None or (held.rtt_ms_ewma is None and row.rtt_ms_ewma):
                seen[host] = row  # the prober's own record carries the RTT
    if not seen:
        return f"uses {chosen}; no measurements of {a[:8]} -> {b[:8]} in this node's view"

    def describe(host: str, row: LinkRow) -> str:
        state_ = "ok" if row.recent else "not working now"
        return f"{host} ({row.interface_kind}, rtt {_ms(row.rtt_ms_ewma)} ms, {state_})"

    others = [describe(h, r) for h, r in sorted(seen.items()) if h != chosen]
    text = f"uses {describe(chosen, seen[chosen]) if chosen in seen else chosen}"
    if others:
        text += "; measured and not chosen: " + ", ".join(others)
    return text


def run(args: argparse.Namespace) -> int:
    base = api_base(args.api)
    try:
        with ApiClient(base, timeout=5, api_key=args.api_key) as api:
            state = api.state()
    except (ApiUnreachable, httpx.TransportError):
        print(f"shoal doctor: no node answers at {base}: {START_HINT}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"shoal doctor: {exc}", file=sys.stderr)
        return 1
    render(state, sys.stdout)
    return 0


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--api",
        default=os.environ.get("SHOAL_API", DEFAULT_API),
        help=f"node to ask (env SHOAL_API; default {DEFAULT_API})",
    )
    add_api_key_flag(parser)
    parser.set_defaults(func=run)
    return parser
