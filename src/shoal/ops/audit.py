"""`shoal audit MODEL`: are a model's files complete and the same on every node?

Manifests are collected through the cluster API of one node (no SSH): that node asks each peer
for its manifest of the model. The checks are pure (`audit`); the command prints PASS/FAIL per
check and `RING_INPUT_READY` only when every check passes, and its exit code says the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import httpx

from shoal.models.manifest import Manifest
from shoal.ops.chat import DEFAULT_API, START_HINT, api_base, error_message

READY = "RING_INPUT_READY"
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def audit(
    manifests: Mapping[str, Manifest | str],
    *,
    expect_shards: int | None = None,
    hash: bool = False,
) -> list[Check]:
    """Every check over the nodes' manifests (node name -> manifest, or why there is none)."""
    checks = [_reachable(manifests)]
    got = {n: m for n, m in manifests.items() if isinstance(m, Manifest)}
    if not got:
        return checks
    checks.append(_per_node("no partial downloads", got, lambda m: _listed(m.partials)))
    checks.append(_per_node("required files", got, lambda m: _listed(m.missing, "missing ")))
    checks.append(_one_format(got))
    if expect_shards is not None:
        checks.append(_per_node("shard count", got, lambda m: _shards(m, expect_shards)))
    checks.append(_parity(got, hash))
    return checks


def ready(checks: list[Check]) -> bool:
    return bool(checks) and all(c.ok for c in checks)


def _reachable(manifests: Mapping[str, Manifest | str]) -> Check:
    errors = {n: m for n, m in manifests.items() if isinstance(m, str)}
    if not manifests:
        return Check("manifests from every node", False, "no node to audit")
    if errors:
        return Check(
            "manifests from every node",
            False,
            "; ".join(f"{n}: {e}" for n, e in sorted(errors.items())),
        )
    return Check("manifests from every node", True, f"{len(manifests)} node(s)")


def _listed(items: tuple[str, ...], prefix: str = "") -> str | None:
    if not items:
        return None
    shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    return prefix + shown


def _shards(m: Manifest, expected: int) -> str | None:
    count = m.gguf_count if m.format == "gguf" else m.safetensors_count
    return None if count == expected else f"{count} {m.format} files, expected {expected}"


def _per_node(name: str, got: Mapping[str, Manifest], problem: Any) -> Check:
    found = {n: p for n, m in sorted(got.items()) if (p := problem(m))}
    if found:
        return Check(name, False, "; ".join(f"{n}: {p}" for n, p in found.items()))
    return Check(name, True, "every node")


def _one_format(got: Mapping[str, Manifest]) -> Check:
    formats = {n: m.format for n, m in got.items()}
    distinct = set(formats.values())
    if len(distinct) == 1 and distinct <= {"safetensors", "gguf"}:
        return Check("one format everywhere", True, distinct.pop())
    detail = ", ".join(f"{n}: {f}" for n, f in sorted(formats.items()))
    return Check("one format everywhere", False, detail)


def _parity(got: Mapping[str, Manifest], hash: bool) -> Check:
    """Every node against the majority's file set: a path missing, extra, or of another size
    (or, with hash, other content) is named with the node that differs."""
    name = "parity (path, size" + (", sha256)" if hash else ")")

    def key(m: Manifest) -> frozenset[tuple[str, int, str | None]]:
        return frozenset((f.path, f.size, f.sha256 if hash else None) for f in m.files)

    if hash and (unhashed := sorted(n for n, m in got.items() if not m.hashed)):
        return Check(name, False, f"no hashes from {', '.join(unhashed)}")
    # the reference is the file set most nodes share; on a tie, one of a complete node, then
    # of the first node by name, so the node that differs is the one named
    counts = Counter(key(m) for m in got.values())
    complete = {key(m) for m in got.values() if not (m.partials or m.missing)}
    first = {k: min(n for n, m in got.items() if key(m) == k) for k in counts}
    reference_key = min(counts, key=lambda k: (-counts[k], k not in complete, first[k]))
    reference = {p: (s, h) for p, s, h in reference_key}
    problems = []
    for node, m in sorted(got.items()):
        mine = {f.path: (f.size, f.sha256 if hash else None) for f in m.files}
        diff = [f"missing {p}" for p in sorted(reference.keys() - mine.keys())]
        diff += [f"extra {p}" for p in sorted(mine.keys() - reference.keys())]
        for p in sorted(reference.keys() & mine.keys()):
            (size, sha), (my_size, my_sha) = reference[p], mine[p]
            if size != my_size:
                diff.append(f"{p} is {my_size} bytes, others {size}")
            elif sha != my_sha:
                diff.append(f"{p} content differs (sha256)")
        if diff:
            problems.append(f"{node}: " + _listed(tuple(diff)))  # type: ignore[operator]
    if problems:
        return Check(name, False, "; ".join(problems))
    return Check(name, True, f"{len(reference)} files match on {len(got)} node(s)")


def render(model_id: str, manifests: Mapping[str, Manifest | str], checks: list[Check]) -> str:
    lines = [f"audit {model_id}"]
    for node, m in sorted(manifests.items()):
        if isinstance(m, Manifest):
            lines.append(
                f"  {node:<16} {m.format:<11} {len(m.files):>4} files "
                f"{m.total_bytes / 2**20:>10.1f} MiB  {m.dir}"
            )
        else:
            lines.append(f"  {node:<16} -  {m}")
    for c in checks:
        lines.append(f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    lines.append(READY if ready(checks) else "NOT READY: fix the FAIL lines, then audit again")
    return "\n".join(lines)


# -- collection through the cluster API ------------------------------------------------------


class AuditUnreachable(Exception):
    pass


def collect(
    client: httpx.Client, base: str, model_id: str, nodes: list[str] | None, hash: bool
) -> tuple[dict[str, Manifest | str], dict[str, Any]]:
    """Ask the node at `base` for every node's manifest; returns them by node name, plus the
    card that node holds for the model."""
    params: dict[str, str] = {"hash": "true" if hash else "false"}
    if nodes:
        params["nodes"] = ",".join(nodes)
    try:
        response = client.get(f"{base}/cluster/manifests/{quote(model_id)}", params=params)
    except httpx.ConnectError as exc:
        raise AuditUnreachable(f"cannot reach {base}: {exc}. {START_HINT}") from None
    if response.status_code != 200:
        raise AuditUnreachable(error_message(response.status_code, response.content))
    body = response.json()
    return manifests_of(body.get("nodes", [])), body.get("card") or {}


def manifests_of(entries: Iterable[Mapping[str, Any]]) -> dict[str, Manifest | str]:
    """`/cluster/manifests` entries by node name: the manifest, or why there is none."""
    manifests: dict[str, Manifest | str] = {}
    for entry in entries:
        name = entry.get("name") or entry.get("node_id") or "?"
        if entry.get("manifest") is not None:
            manifests[name] = Manifest.model_validate(entry["manifest"])
        else:
            manifests[name] = str(entry.get("error") or "no manifest")
    return manifests


def run_audit(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The audit as data (for `shoal bootstrap`) and its exit code."""
    base = api_base(args.api)
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()] if args.nodes else None
    timeout = httpx.Timeout(600.0 if args.hash else 30.0, connect=5.0)
    with httpx.Client(timeout=timeout) as client:
        manifests, card = collect(client, base, args.model, nodes, args.hash)
    expect = args.expect_shards if args.expect_shards is not None else card.get("expected_shards")
    checks = audit(manifests, expect_shards=expect, hash=args.hash)
    result = {
        "model": args.model,
        "ready": ready(checks),
        "checks": [asdict(c) for c in checks],
        "dirs": {n: m.dir for n, m in manifests.items() if isinstance(m, Manifest)},
        "text": render(args.model, manifests, checks),
    }
    return (EXIT_OK if result["ready"] else EXIT_FAILED), result


def run(args: argparse.Namespace) -> int:
    try:
        code, result = run_audit(args)
    except AuditUnreachable as exc:
        print(f"shoal audit: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(result, indent=2) if args.json else result["text"])
    return code


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument(
        "--api",
        default=os.environ.get("SHOAL_API", DEFAULT_API),
        help=f"base URL of any node's API (env SHOAL_API; default {DEFAULT_API})",
    )
    parser.add_argument(
        "--nodes", help="comma list of node names or ids (default: every node in the view)"
    )
    parser.add_argument(
        "--expect-shards",
        type=int,
        help="safetensors shards (or GGUF files) every node must have (default: the model card's)",
    )
    parser.add_argument("--hash", action="store_true", help="compare sha256 too (reads every byte)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)
    return parser
