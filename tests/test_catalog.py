"""The cluster's models for /state: holders and digests, whose files differ, cards, downloads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shoal.cluster.catalog import models_document
from shoal.models.cards import ModelCard, default_card
from shoal.schema.report import DownloadState, HeldModel, NodeReport, StoreState


def held(model_id: str = "org/m", digest: str | None = "d1") -> HeldModel:
    return HeldModel(
        model_id=model_id, num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1,
        head_dim=4, weight_bytes=100, files_digest=digest,
    )  # fmt: skip


def node(node_id: str, *models: HeldModel, downloads: tuple[DownloadState, ...] = ()) -> NodeReport:
    store = StoreState(root="/s", downloads=downloads) if downloads else None
    return NodeReport(node_id=node_id, models=models, store=store)


PULLING = DownloadState(model_id="org/new", files_total=3, files_done=1, started_at=5.0)

# reports -> {model_id: (holders, differ, download nodes)}
CASES: dict[str, tuple[list[NodeReport], dict[str, Any]]] = {
    "nothing_held": ([node("a"), node("b")], {}),
    "all_agree": (
        [node("a", held()), node("b", held())],
        {"org/m": ({"a": "d1", "b": "d1"}, [], [])},
    ),
    "minority_differs": (
        [node("a", held()), node("b", held(digest="d2")), node("c", held())],
        {"org/m": ({"a": "d1", "b": "d2", "c": "d1"}, ["b"], [])},
    ),
    "tie_goes_to_the_smaller_digest": (
        [node("a", held(digest="d2")), node("b", held(digest="d1"))],
        {"org/m": ({"a": "d2", "b": "d1"}, ["a"], [])},
    ),
    "no_digest_goes_along": (
        [node("a", held()), node("b", held(digest=None))],
        {"org/m": ({"a": "d1", "b": None}, [], [])},
    ),
    "downloading_only": (
        [node("a", held()), node("b", downloads=(PULLING,))],
        {"org/m": ({"a": "d1"}, [], []), "org/new": ({}, [], ["b"])},
    ),
    "held_and_downloading_elsewhere": (
        [
            node("a", held()),
            node("b", downloads=(PULLING.model_copy(update={"model_id": "org/m"}),)),
        ],
        {"org/m": ({"a": "d1"}, [], ["b"])},
    ),
}


@pytest.mark.parametrize(("reports", "expected"), CASES.values(), ids=CASES)
def test_models_document(reports: list[NodeReport], expected: dict[str, Any]) -> None:
    rows = models_document(reports)
    got = {
        r["model_id"]: (r["holders"], r["differ"], [d["node"] for d in r["downloads"]])
        for r in rows
    }
    assert got == expected
    assert [r["model_id"] for r in rows] == sorted(expected)  # sorted by model id
    assert all(r["card"] is None for r in rows)  # no library: no card


def test_rows_carry_the_card_status_and_the_download_fields() -> None:
    cards = {"org/m": ModelCard(model_id="org/m", status="blocked", status_note="drifts")}
    reports = [node("a", held()), node("b", downloads=(PULLING,))]
    rows = models_document(reports, lambda m: cards.get(m) or default_card(m))
    json.dumps(rows)  # served as is
    assert rows[0]["card"] == {"status": "blocked", "status_note": "drifts"}
    assert rows[1]["card"] == {"status": "active", "status_note": ""}
    (download,) = rows[1]["downloads"]
    assert download == {"node": "b", **PULLING.model_dump(mode="json")}
    assert download["status"] == "downloading" and download["files_done"] == 1
