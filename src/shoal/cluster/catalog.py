"""The models of the cluster for /state: who holds each, whose files differ, what is downloading.

Pure: the alive nodes' reports and the leader's cards in, one row per model out. Whose files
differ is what placement refuses (cluster.plan.files_agree), so the dashboard shows the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from shoal.placement.plan import files_agree, holders
from shoal.schema.report import NodeReport

if TYPE_CHECKING:
    from shoal.models.cards import ModelCard


def models_document(
    reports: Iterable[NodeReport], card_of: Callable[[str], ModelCard] | None = None
) -> list[dict[str, Any]]:
    """One row per model any node holds or downloads, by model id."""
    reports = sorted(reports, key=lambda r: r.node_id)
    downloads = [(r.node_id, d) for r in reports if r.store is not None for d in r.store.downloads]
    model_ids = {m.model_id for r in reports for m in r.models} | {d.model_id for _, d in downloads}
    rows = []
    for model_id in sorted(model_ids):
        held = holders(reports, model_id)
        allowed, _ = files_agree(held)
        card = card_of(model_id) if card_of is not None else None
        rows.append(
            {
                "model_id": model_id,
                "holders": {n: m.files_digest for n, m in held.items()},
                "differ": sorted(set(held) - allowed),
                "card": (
                    {"status": card.status, "status_note": card.status_note} if card else None
                ),
                "downloads": [
                    {"node": n, **d.model_dump(mode="json")}
                    for n, d in downloads
                    if d.model_id == model_id
                ],
            }
        )
    return rows
