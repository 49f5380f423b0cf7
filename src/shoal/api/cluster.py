"""Cluster routes: the node's own report for peers, goodbyes, and the view for operators."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict

from shoal.api.errors import ApiError
from shoal.cluster.service import ClusterService
from shoal.cluster.view import links_document, nodes_document, state_document

router = APIRouter()


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
    cluster = _cluster(request)
    etag = cluster.etag
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    body = cluster.report.model_dump_json()
    return Response(body, media_type="application/json", headers={"ETag": etag})


@router.post("/cluster/goodbye", status_code=204)
async def goodbye(body: Goodbye, request: Request) -> Response:
    _cluster(request).accept_goodbye(body.node_id, body.boot_id)
    return Response(status_code=204)


@router.get("/state")
async def state(request: Request) -> dict[str, Any]:
    cluster = _cluster(request)
    document = state_document(cluster.view, cluster.report, time.time())
    controller = getattr(request.app.state.host, "controller", None)
    if controller is not None:
        document["instances"] = controller.instances_document()
        document["runners"] = {rid: s.model_dump() for rid, s in controller.runner_states().items()}
        document["plan"] = {"term": controller.plan.term, "version": controller.plan.version,
                            "leader": controller.plan.leader}  # fmt: skip
    return document


@router.get("/cluster/nodes")
async def nodes(request: Request) -> dict[str, Any]:
    cluster = _cluster(request)
    return nodes_document(cluster.view, cluster.report, time.time())


@router.get("/cluster/links")
async def links(request: Request) -> dict[str, Any]:
    cluster = _cluster(request)
    return links_document(cluster.view, cluster.report, time.time())
