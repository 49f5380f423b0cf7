"""Model store routes: what this node holds, manifests, downloads; and the cluster-wide
collection of manifests that `shoal audit` reads (node to node over the API, no SSH)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from shoal.api.host import library_of
from shoal.models.cards import BUILTIN_DIR, ModelCard
from shoal.models.library import Library, PullRefused
from shoal.models.parity import ManifestsDocument, audit, ready
from shoal.schema.address import base_url, host_of, is_loopback, join_host_port
from shoal.schema.exo import model_card
from shoal.schema.report import HeldModel
from shoal.web.errors import ApiError, invalid_request
from shoal.web.signing import SignatureError

router = APIRouter()

MANIFEST_TIMEOUT_S = 30.0  # per peer; hashing a large model takes longer (see `hash`)
HASH_TIMEOUT_S = 900.0
REACH_TIMEOUT_S = 2.0
NOT_ON_NODE = "model not on this node"


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    include: list[str] = []
    revision: str = "main"


def _library(request: Request) -> Library:
    library = library_of(request.app.state.host)
    if library is None:
        raise ApiError(404, "This endpoint serves one model and has no model store.")
    return library


def _not_here(model_id: str) -> ApiError:
    return ApiError(
        404,
        f"{model_id} is not on this node: no store dir, --model or bundled model has it. "
        f"Download it with `shoal models pull {model_id}` or POST /models/pull.",
        code="model_not_found",
    )


@router.get("/models")
async def models(request: Request, status: str | None = Query(None)) -> dict[str, Any]:
    """Held models (served or placeable), store dirs that are not complete yet, cards, and
    downloads in flight; each row also in exo's catalog shape (name, hugging_face_id,
    storage_size_megabytes, ...). `?status=downloaded` keeps the models held on disk."""
    if status not in (None, "", "downloaded"):
        raise invalid_request("status must be 'downloaded' or left out.", param="status")
    library = _library(request)
    rows: dict[str, dict[str, Any]] = {}
    for model_id, local in library.models.items():
        rows[model_id] = {"id": model_id, "held": True, "path": str(local.source or local.path)}
    for stored in library.store.models():
        rows.setdefault(stored.model_id, {"id": stored.model_id, "held": False})
        rows[stored.model_id].setdefault("path", str(stored.path))
    if status == "downloaded":
        rows = {m: row for m, row in rows.items() if row["held"]}
    sizes = await asyncio.to_thread(_sizes, library, list(rows))
    for row in rows.values():
        card = library.card(row["id"])
        row["status"] = card.status
        row["card"] = card.model_dump(exclude={"source"}) | {"source": card.source or None}
        local = library.models.get(row["id"])
        row |= catalog_row(card, local.held if local else None, sizes.get(row["id"], 0))
    return {
        "object": "list",
        "data": sorted(rows.values(), key=lambda r: r["id"]),
        "store": library.state().model_dump(),
    }


def _sizes(library: Library, model_ids: list[str]) -> dict[str, int]:
    """Bytes of each model's files on disk (sizes only, nothing hashed)."""
    out = {}
    for model_id in model_ids:
        found = library.manifest(model_id)
        out[model_id] = found.total_bytes if found is not None else 0
    return out


def catalog_row(card: ModelCard, held: HeldModel | None, size_bytes: int) -> dict[str, Any]:
    """exo's ModelListModel fields of one model, from its card and what this node holds."""
    exo = model_card(card.model_id, held, size_bytes)
    return {
        "object": "model",
        "created": 0,
        "owned_by": "shoal",
        "hugging_face_id": card.model_id,
        "name": card.name or card.model_id.rsplit("/", 1)[-1],
        "description": card.notes,
        "context_length": exo["contextLength"],
        "tags": [card.status] if card.status != "active" else [],
        "storage_size_megabytes": round(size_bytes / 2**20),
        "supports_tensor": exo["supportsTensor"],
        "tasks": list(exo["tasks"]),
        "is_custom": bool(card.source) and not Path(card.source).is_relative_to(BUILTIN_DIR),
        "family": exo["family"],
        "quantization": "",  # shoal cards do not state it
        "base_model": "",
        "capabilities": list(exo["capabilities"]),
    }


@router.get("/models/{model_id:path}/manifest")
async def manifest(model_id: str, request: Request, hash: bool = Query(False)) -> dict[str, Any]:
    library = _library(request)
    found = await asyncio.to_thread(library.manifest, model_id, hash)
    if found is None:
        raise _not_here(model_id)
    return found.model_dump()


@router.post("/models/pull", status_code=202)
async def pull(body: PullRequest, request: Request) -> dict[str, Any]:
    """Start a download into this node's store; its progress shows in GET /models, /state and
    this node's report. One direct download per node: each node pulls for itself."""
    library = _library(request)
    try:
        state = library.start_pull(body.model, body.include, body.revision)
    except PullRefused as exc:
        busy = "already" in str(exc)
        raise ApiError(409 if busy else 400, str(exc), param=None if busy else "model") from None
    return state.model_dump()


# -- across the cluster ------------------------------------------------------------------


@router.get("/cluster/manifests/{model_id:path}")
async def cluster_manifests(
    model_id: str,
    request: Request,
    hash: bool = Query(False),
    nodes: str | None = Query(None, description="comma list of node names or ids"),
) -> dict[str, Any]:
    """Every node's manifest of the model, asked for by this node over the API."""
    entries, card = await _gather_manifests(request, model_id, hash, nodes)
    return {"model": model_id, "card": card.model_dump(), "nodes": entries}


@router.get("/cluster/audit/{model_id:path}")
async def cluster_audit(
    model_id: str, request: Request, hash: bool = Query(False)
) -> dict[str, Any]:
    """`shoal audit` as data: the checks over every alive node's manifest of the model, with
    the shard count the card expects."""
    entries, card = await _gather_manifests(request, model_id, hash, None)
    checks = audit(
        ManifestsDocument.model_validate({"nodes": entries}).by_name(),
        expect_shards=card.expected_shards,
        hash=hash,
    )
    return {
        "model_id": model_id,
        "ready": ready(checks),
        "checks": [dataclasses.asdict(c) for c in checks],
    }


async def _gather_manifests(
    request: Request, model_id: str, hash: bool, nodes: str | None
) -> tuple[list[dict[str, Any]], ModelCard]:
    """Each chosen node's manifest entry (node_id, name, manifest or error), and this node's
    card of the model."""
    host = request.app.state.host
    library, cluster = _library(request), host.cluster
    if cluster is None:
        raise ApiError(503, "The cluster service is not running on this node yet.")
    reports = cluster.view.alive_reports(cluster.report)
    wanted = [n.strip() for n in nodes.split(",") if n.strip()] if nodes else None
    chosen = [r for r in reports if wanted is None or r.node_id in wanted or r.name in wanted]
    entries: list[dict[str, Any]] = []
    for name in wanted or ():
        if not any(name in (r.node_id, r.name) for r in reports):
            entries.append({"node_id": None, "name": name, "error": "not in this node's view"})

    async def one(node_id: str, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"node_id": node_id, "name": name, "manifest": None}
        if node_id == cluster.identity.node_id:
            found = await asyncio.to_thread(library.manifest, model_id, hash)
            if found is None:
                entry["error"] = NOT_ON_NODE
            else:
                entry["manifest"] = found.model_dump()
            return entry
        where = cluster.address_of(node_id)
        if where is None:
            return {**entry, "error": "no known address"}
        url = base_url(*where) + f"/models/{quote(model_id)}/manifest"
        params = {"hash": str(hash).lower()}
        try:
            response = await cluster.peers.http.get(url, params=params, timeout=timeout)
        except httpx.HTTPError as exc:
            return {**entry, "error": f"unreachable at {join_host_port(*where)}: {exc!r}"}
        try:  # with a cluster secret, the answer must be signed with it
            cluster.peers.verify(response)
        except SignatureError as exc:
            return {**entry, "error": f"answer refused: {exc}"}
        if response.status_code == 200:
            return {**entry, "manifest": response.json()}
        if response.status_code == 404:
            return {**entry, "error": NOT_ON_NODE}
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        return {**entry, "error": f"HTTP {response.status_code}: {message}"}

    timeout = httpx.Timeout(HASH_TIMEOUT_S if hash else MANIFEST_TIMEOUT_S, connect=5.0)
    entries += await asyncio.gather(*(one(r.node_id, r.name) for r in chosen))
    return entries, library.card(model_id)


@router.get("/cluster/reach")
async def reach(
    request: Request, host: str = Query(...), port: int = Query(..., ge=1, le=65535)
) -> dict[str, Any]:
    """Can this node open a TCP connection to host:port? Only addresses of nodes in the view
    are tried, so the API is no port scanner; `shoal bootstrap` checks transport both ways."""
    cluster = request.app.state.host.cluster
    if cluster is None:
        raise ApiError(503, "The cluster service is not running on this node yet.")
    reports = cluster.view.alive_reports(cluster.report)
    known = {a.split("/")[0] for r in reports for i in r.interfaces for a in i.addresses}
    known |= {host_of(a) for r in reports for a in r.addresses}
    if host not in known and not is_loopback(host):
        raise invalid_request(
            f"{host} is not an address of a node in this node's view.", param="host"
        )
    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.to_thread(_connect, host, port), REACH_TIMEOUT_S + 1)
    except (OSError, TimeoutError) as exc:
        return {"host": host, "port": port, "ok": False, "error": str(exc) or type(exc).__name__}
    return {"host": host, "port": port, "ok": True, "ms": (time.perf_counter() - started) * 1e3}


def _connect(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
        pass
