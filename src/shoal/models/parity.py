"""Is a model the same on every node? The pure checks over the nodes' manifests (`shoal
audit`, the `/cluster/audit` route and bootstrap's audit phase all judge with them), and the
`/cluster/manifests` document they read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from shoal.models.manifest import Manifest
from shoal.schema.documents import Document


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


class ManifestEntry(Document):
    name: str | None = None
    node_id: str | None = None
    manifest: Manifest | None = None
    error: str | None = None


class ManifestsDocument(Document):
    """GET /cluster/manifests/{model}: every node's manifest and the card this node holds."""

    nodes: tuple[ManifestEntry, ...] = ()
    card: dict[str, Any] = Field(default_factory=dict)

    def by_name(self) -> dict[str, Manifest | str]:
        """Manifests by node name: the manifest, or why there is none."""
        out: dict[str, Manifest | str] = {}
        for entry in self.nodes:
            name = entry.name or entry.node_id or "?"
            out[name] = (
                entry.manifest if entry.manifest is not None else (entry.error or "no manifest")
            )
        return out
