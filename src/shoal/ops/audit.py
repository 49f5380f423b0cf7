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
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import httpx

from shoal.models.manifest import Manifest
from shoal.models.parity import Check, audit, ready
from shoal.ops.client import (
    DEFAULT_API,
    ApiClient,
    ApiError,
    ApiUnreachable,
    add_api_key_flag,
    cannot_reach,
)

READY = "RING_INPUT_READY"
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3


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


def collect(
    api: ApiClient, model_id: str, nodes: list[str] | None, hash: bool, timeout: float
) -> tuple[dict[str, Manifest | str], dict[str, Any]]:
    """Ask the node at `api` for every node's manifest; returns them by node name, plus the
    card that node holds for the model (ApiUnreachable, ApiError: why not)."""
    body = api.manifests(model_id, nodes, hash, timeout=httpx.Timeout(timeout, connect=5.0))
    return body.by_name(), body.card


def run_audit(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The audit as data and its exit code."""
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()] if args.nodes else None
    with ApiClient(args.api, api_key=args.api_key) as api:
        manifests, card = collect(api, args.model, nodes, args.hash, 600.0 if args.hash else 30.0)
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
    except (ApiUnreachable, ApiError) as exc:
        why = cannot_reach(exc.base, exc) if isinstance(exc, ApiUnreachable) else str(exc)
        print(f"shoal audit: {why}", file=sys.stderr)
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
    add_api_key_flag(parser)
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
