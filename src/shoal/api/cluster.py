"""Cluster routes: the node's own report for peers, goodbyes, and the view for operators."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from shoal.api.host import controller_of
from shoal.api.instances import exo_instances
from shoal.api.limits import peer_refusal
from shoal.cluster.catalog import models_document
from shoal.cluster.events import merge_history
from shoal.cluster.hints import rdma_hints
from shoal.cluster.service import ClusterService
from shoal.cluster.view import links_document, nodes_document, state_document
from shoal.placement.review import used_path_rows
from shoal.schema.documents import (
    AlertsDocument,
    HistoryDocument,
    LinksDocument,
    NodesDocument,
    StateDocument,
)
from shoal.schema.exo import runner_tagged
from shoal.schema.exo_state import exo_topology, node_maps
from shoal.schema.reasons import event_fields, render
from shoal.web.errors import ApiError

log = logging.getLogger(__name__)
router = APIRouter()
HISTORY_TIMEOUT_S = 2.0  # a peer slower than this is named as unreachable, not waited for
MAX_HISTORY_BYTES = 1_000_000  # a peer's larger answer is dropped, never parsed


class Goodbye(BaseModel):
    model_config = ConfigDict(extra="ignore")

    node_id: str
    boot_id: str


def _cluster(request: Request) -> ClusterService:
    cluster = request.app.state.host.cluster
    if cluster is None:
        raise ApiError(503, "The cluster service is not running on this node.", code="no_cluster")
    return cluster


@router.get("/node_id")
async def node_id(request: Request) -> str:
    return _cluster(request).identity.node_id


@router.get("/cluster/report", response_model=None)
async def report(request: Request) -> Response:
    """Polled by every peer about once a second: unchanged reports answer 304."""
    if (flooded := peer_refusal(request)) is not None:
        return flooded
    cluster = _cluster(request)
    etag = cluster.etag
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    body = cluster.report.model_dump_json()
    return Response(body, media_type="application/json", headers={"ETag": etag})


@router.post("/cluster/goodbye", status_code=204)
async def goodbye(body: Goodbye, request: Request) -> Response:
    if (flooded := peer_refusal(request)) is not None:
        return flooded
    _cluster(request).accept_goodbye(body.node_id, body.boot_id)
    return Response(status_code=204)


@router.get("/state", response_model=StateDocument)
async def state(request: Request) -> dict[str, Any]:
    return state_of(request)


@router.get("/state/{path:path}", response_model=None)
async def state_path(path: str, request: Request) -> JSONResponse:
    """exo's sub-path of /state: `/state/instances/<id>`, `/state/runners/<id>`,
    `/state/nodeDisk/<node>`... walked by key (and list index) through the same document."""
    document = StateDocument.model_validate(state_of(request)).model_dump(
        mode="json", by_alias=True
    )
    try:
        return JSONResponse(walk(document, path))
    except LookupError:
        raise ApiError(
            404,
            f"No '{path.strip('/').replace('/', '.')}' in the state document.",
            code="state_path_not_found",
        ) from None


def walk(document: Any, path: str) -> Any:
    """The value at a /-separated key path (list items by index); LookupError if absent."""
    value = document
    for part in (p for p in path.split("/") if p):
        if isinstance(value, dict):
            value = value[part]
        elif isinstance(value, list) and part.isdigit():
            value = value[int(part)]
        else:
            raise LookupError(part)
    return value


def state_of(request: Request) -> dict[str, Any]:
    """GET /state: the view's document with exo's keys, and the controller's parts."""
    cluster = _cluster(request)
    document = state_document(cluster.view, cluster.report, time.time())
    document["topology"] = exo_topology(document["topology"])
    document.update(node_maps(cluster.view.alive_reports(cluster.report)))
    controller = controller_of(request.app.state.host)
    if controller is not None:
        reports = controller.reports()
        by_id = {r.node_id: r for r in reports}
        library = controller.library
        document["instances"] = exo_instances(controller)
        document["runners"] = {
            rid: {**s.model_dump(), **runner_tagged(s)}
            for rid, s in controller.runner_states().items()
        }
        document["alerts"] = alerts_of(controller)
        document["preflight"] = {
            i.instance_id: [
                {**c.__dict__, "message": c.describe()} for c in controller.preflight(i)
            ]
            for i in controller.plan.instances
        }
        document["instance_paths"] = {
            i.instance_id: used_path_rows(i, by_id) for i in controller.plan.instances
        }
        document["models"] = models_document(reports, library.card if library is not None else None)
        document["hints"] = rdma_hints(reports)
        document["events"] = controller.events.recent() if controller.events else []
        document["plan"] = {
            "term": controller.plan.term,
            "version": controller.plan.version,
            "leader": controller.plan.leader,
        }
    return document


@router.get("/cluster/nodes", response_model=NodesDocument)
async def nodes(request: Request) -> dict[str, Any]:
    cluster = _cluster(request)
    return nodes_document(cluster.view, cluster.report, time.time())


@router.get("/cluster/links", response_model=LinksDocument)
async def links(request: Request) -> dict[str, Any]:
    cluster = _cluster(request)
    return links_document(cluster.view, cluster.report, time.time())


@router.get("/cluster/alerts", response_model=AlertsDocument)
async def alerts(request: Request) -> dict[str, Any]:
    """What is wrong now (paths degraded or down, instances that cannot serve as placed) and
    this node's recent history of crashes, failovers and degradations."""
    controller = controller_of(request.app.state.host)
    if controller is None:
        raise ApiError(503, "The cluster service is not running on this node.", code="no_cluster")
    return {
        "alerts": alerts_of(controller),
        "events": controller.events.recent() if controller.events else [],
    }


@router.get("/cluster/history", response_model=HistoryDocument)
async def history(request: Request, limit: int = Query(200, ge=1, le=1000)) -> dict[str, Any]:
    """Every alive node's recent events (each node's GET /cluster/alerts), as one history,
    oldest first, each event marked with the node that recorded it."""
    cluster, controller = _cluster(request), controller_of(request.app.state.host)
    own = controller.events.recent() if controller is not None and controller.events else []
    by_node: dict[str, Any] = {cluster.identity.node_id: own}
    unreachable: list[str] = []

    async def one(node_id: str) -> None:
        url = cluster.url_of(node_id, "/cluster/alerts")
        try:
            if url is None:
                raise ValueError("no known address")
            async with cluster.peers.http.stream("GET", url, timeout=HISTORY_TIMEOUT_S) as r:
                r.raise_for_status()
                body = b""
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_HISTORY_BYTES:
                        raise ValueError(f"answer over {MAX_HISTORY_BYTES} bytes")
                cluster.peers.verify(r, body)  # with a cluster secret: signed with it
            by_node[node_id] = json.loads(body).get("events", [])
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.info("no history from %s: %r", cluster.name_of(node_id), exc)
            unreachable.append(cluster.name_of(node_id))

    peers = [r.node_id for r in cluster.view.alive_reports(cluster.report)]
    await asyncio.gather(*(one(n) for n in peers if n not in by_node))
    return {"events": merge_history(by_node, limit), "unreachable": sorted(unreachable)}


def alerts_of(controller: Any) -> list[dict[str, Any]]:
    names = {r.node_id: r.name or r.node_id[:8] for r in controller.reports()}
    out = []
    for r in controller.reports():
        for h in r.health:
            if h.status != "ok":
                peer = names.get(h.peer_node_id, h.peer_node_id[:8])
                where = f"{names[r.node_id]} -> {peer} at {h.peer_addr} ({h.interface_kind})"
                out.append(
                    {
                        "kind": "path",
                        "status": h.status,
                        "node": r.node_id,
                        "message": f"{where}: {h.reason}",
                        "since": h.since,
                    }
                )
    for iid, why in controller.alert_reasons.items():  # the reason as data, and its parts
        alert = {"kind": "instance", "status": "degraded", "instance": iid, "message": render(why)}
        out.append({**alert, **event_fields(why)})
    for s in controller.runner_states().values():
        if s.status == "failed":
            out.append(
                {
                    "kind": "runner",
                    "status": "failed",
                    "runner": s.runner_id,
                    "message": f"runner {s.runner_id} failed: {s.reason}",
                    "since": s.since,
                }
            )
    return out
