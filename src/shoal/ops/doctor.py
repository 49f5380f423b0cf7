"""`shoal doctor`: what a node sees of the cluster: nodes, leader, every measured path, drift."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, TextIO

import httpx

from shoal.ops.chat import DEFAULT_API, START_HINT, api_base, error_message
from shoal.placement.addressing import host_of


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _short(node_id: str | None, names: dict[str, str]) -> str:
    if not node_id:
        return "?"
    return names.get(node_id, node_id[:8])


def render(state: dict[str, Any], out: TextIO) -> None:
    """The /state document as a report a person reads top to bottom (pure: no I/O but out)."""
    nodes = state.get("nodes", [])
    names = {n["node_id"]: n.get("name") or n["node_id"][:8] for n in nodes}
    leader = state.get("leader")
    out.write(f"nodes ({len(nodes)}), leader {_short(leader, names)}\n")
    for n in nodes:
        marks = ("*" if n.get("is_leader") else " ") + ("@" if n.get("is_self") else " ")
        res = n.get("resources", {})
        ram = f"{res.get('ram_available', 0) / 2**30:.1f}/{res.get('ram_total', 0) / 2**30:.1f} GiB"
        seen = f"seen {n.get('seconds_since_seen', 0):.1f}s ago"
        out.write(
            f" {marks} {names[n['node_id']]:<16} {n['node_id']:<18} {n.get('status', '?'):<8}"
            f" v{n.get('version', '?')}  RAM {ram}  {seen}"
            + (f"  ({n['gone_reason']})" if n.get("gone_reason") else "")
            + "\n"
        )
        for i in n.get("interfaces", []):
            if i.get("kind") != "loopback" and i.get("addresses"):
                out.write(f"      {i['name']:<12} {i['kind']:<12} {', '.join(i['addresses'])}\n")
    links = state.get("links", [])
    out.write(f"\npaths ({len(links)}): from -> to, as recorded by one side\n")
    for row in links:
        status = "ok" if row.get("recent") else "DOWN"
        if row.get("one_way"):
            status = "ONE-WAY"
        out.write(
            f"  {_short(row.get('from_node'), names):>12} {row.get('from_addr') or '?':<16}"
            f" -> {_short(row.get('to_node'), names):<12} {row.get('to_addr') or '?':<16}"
            f" {row.get('interface_kind', '?'):<11} {row.get('direction', '?'):<8}"
            f" rtt {_ms(row.get('rtt_ms_ewma'))} ms (p95 {_ms(row.get('rtt_ms_p95'))})"
            f" loss {100 * (row.get('loss') or 0):.0f}%  {status}"
            f"  [by {_short(row.get('recorded_by'), names)}]\n"
        )
    drift = state.get("drift", [])
    out.write(f"\ndrift: {'none' if not drift else ''}\n")
    for line in drift:
        out.write(f"  ! {line}\n")
    for refused in state.get("refused", []):
        out.write(f"  refused {refused.get('node_id')}: {refused.get('reason')}\n")
    _render_models(nodes, names, out)
    _render_instances(state, names, out)
    _render_health(state, out)


def _render_models(nodes: list[dict[str, Any]], names: dict[str, str], out: TextIO) -> None:
    """Which node holds which model, whether their files agree, and downloads in flight."""
    holders: dict[str, dict[str, str | None]] = {}
    for n in nodes:
        for m in n.get("models", []):
            holders.setdefault(m["model_id"], {})[n["node_id"]] = m.get("files_digest")
    out.write(f"\nmodels ({len(holders)})\n")
    for model_id, held in sorted(holders.items()):
        digests = {d for d in held.values() if d}
        files = "files agree" if len(digests) <= 1 else "FILES DIFFER: run `shoal audit`"
        who = ", ".join(sorted(_short(n, names) for n in held))
        out.write(f"  {model_id:<44} on {who}  ({files})\n")
    for n in nodes:
        store = n.get("store") or {}
        for d in store.get("downloads", []):
            done = f"{d.get('bytes_done', 0) / 2**20:.0f}/{d.get('bytes_total', 0) / 2**20:.0f} MiB"
            error = f": {d['error']}" if d.get("error") else ""
            out.write(
                f"  pull {d.get('model_id')} on {_short(n['node_id'], names)}: "
                f"{d.get('status')} {done}{error}\n"
            )


def _render_health(state: dict[str, Any], out: TextIO) -> None:
    """Alerts now, then this node's history of crashes, moves and degradations."""
    if "alerts" not in state:
        return
    alerts = state.get("alerts", [])
    out.write(f"\nalerts: {'none' if not alerts else len(alerts)}\n")
    for a in alerts:
        out.write(f"  ! {a.get('kind')} {a.get('status')}: {a.get('message')}\n")
    events = state.get("events", [])
    out.write(f"\nhistory ({len(events)} recent)\n")
    for e in events[-15:]:
        at = time.strftime("%H:%M:%S", time.localtime(e.get("at", 0)))
        out.write(f"  {at} {e.get('kind', '?'):<13} {e.get('message', '')}\n")


def _render_instances(state: dict[str, Any], names: dict[str, str], out: TextIO) -> None:
    """Each instance's ranks and, per hop, the path it uses next to the others measured."""
    instances = state.get("instances")
    if instances is None:
        return
    out.write(f"\ninstances ({len(instances)})\n")
    for iid, entry in instances.items():
        ((meta, body),) = entry.items()
        ranks = _ranks(body)
        out.write(
            f"  {iid} {body.get('modelId')} {body.get('sharding')} {meta} ({body.get('backend')})"
            f" store {body.get('storeAddress')}\n"
        )
        for rank, node, rid, shard in ranks:
            status = body.get("runnerStatus", {}).get(rid, {})
            hosts = body.get("hostsByNode", {}).get(node, [{}])
            iface = body.get("rankInterfaces", {}).get(node) or "any interface"
            reason = f" ({status['reason']})" if status.get("reason") else ""
            out.write(
                f"    rank {rank} {_short(node, names):<12} layers {shard.get('startLayer')}-"
                f"{shard.get('endLayer')}  {hosts[0].get('ip')} via {iface}"
                f"  {status.get('status', '?')}{reason}\n"
            )
        nodes = [node for _, node, _, _ in ranks]
        hops = list(zip(nodes, nodes[1:] + nodes[:1], strict=True)) if len(nodes) > 1 else []
        checks = state.get("preflight", {}).get(iid)
        if checks is not None:
            failed = [c for c in checks if not c.get("ok")]
            out.write(
                f"    preflight: {'ok' if not failed else 'FAILED'} ({len(checks)} paths checked)\n"
            )
            for c in failed:
                better = f"; better: {c['better']}" if c.get("better") else ""
                out.write(f"      ! {c.get('message')}{better}\n")
        if body.get("placedBecause"):
            out.write(f"    generation {body.get('generation')}: {body['placedBecause']}\n")
        for a, b in hops:
            out.write(
                f"    why {_short(a, names)} -> {_short(b, names)}: {_why(state, body, a, b)}\n"
            )


def _ranks(body: dict[str, Any]) -> list[tuple[int, str, str, dict[str, Any]]]:
    out = []
    for node, rid in body.get("nodeToRunner", {}).items():
        ((_, shard),) = body.get("runnerToShard", {}).get(rid, {"?": {}}).items()
        out.append((shard.get("deviceRank", 0), node, rid, shard))
    return sorted(out)


def _why(state: dict[str, Any], body: dict[str, Any], a: str, b: str) -> str:
    """The hop's chosen address against every other path measured from a to b."""
    chosen = (body.get("hostsByNode", {}).get(b) or [{}])[0].get("ip")
    seen: dict[str, dict[str, Any]] = {}
    for row in state.get("links", []):
        if row.get("from_node") == a and row.get("to_node") == b and row.get("to_addr"):
            held = seen.get(host := host_of(row["to_addr"]))
            if held is None or (held.get("rtt_ms_ewma") is None and row.get("rtt_ms_ewma")):
                seen[host] = row  # the prober's own record carries the RTT
    if not seen:
        return f"uses {chosen}; no measurements of {a[:8]} -> {b[:8]} in this node's view"

    def describe(host: str, row: dict[str, Any]) -> str:
        state_ = "ok" if row.get("recent") else "not working now"
        return (
            f"{host} ({row.get('interface_kind')}, rtt {_ms(row.get('rtt_ms_ewma'))} ms, {state_})"
        )

    others = [describe(h, r) for h, r in sorted(seen.items()) if h != chosen]
    text = f"uses {describe(chosen, seen[chosen]) if chosen in seen else chosen}"
    if others:
        text += "; measured and not chosen: " + ", ".join(others)
    return text


def run(args: argparse.Namespace) -> int:
    base = api_base(args.api)
    try:
        response = httpx.get(f"{base}/state", timeout=5)
    except httpx.TransportError:
        print(f"shoal doctor: no node answers at {base}: {START_HINT}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        print(
            f"shoal doctor: {error_message(response.status_code, response.content)}",
            file=sys.stderr,
        )
        return 1
    render(response.json(), sys.stdout)
    return 0


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--api",
        default=os.environ.get("SHOAL_API", DEFAULT_API),
        help=f"node to ask (env SHOAL_API; default {DEFAULT_API})",
    )
    parser.set_defaults(func=run)
    return parser
