"""Instance routes, shaped like exo's so operators' scripts keep working.

GET /instance/placement and /instance/previews compute layouts on this node's view; POST
/instance and DELETE /instance/{id} change the plan on the leader (a follower forwards them and
returns the leader's answer); GET /instance/{id} shows one instance with its runners' status.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict

from shoal.api.host import controller_of
from shoal.control import Controller, NotLeader, PlaceAsk
from shoal.placement.plan import (
    META_NAME,
    instance_document,
    parse_instance_document,
    parse_meta,
    parse_sharding,
)
from shoal.placement.planner import Refusal
from shoal.schema.documents import PreflightDocument, PreviewsDocument
from shoal.schema.exo import InstanceDocument
from shoal.schema.report import InstanceSpec
from shoal.web.errors import ApiError, invalid_request

router = APIRouter()


class CreateInstance(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instance: dict[str, Any]
    allow_blocked: bool = False  # place a model whose card says status = blocked


def _controller(request: Request) -> Controller:
    controller = controller_of(request.app.state.host)
    if controller is None:
        raise ApiError(
            503,
            "The cluster service is not running on this node yet.",
            code="no_cluster",
            type="service_unavailable",
        )
    return controller


def _ask(
    model_id: str,
    sharding: str | None,
    meta: str | None,
    min_nodes: int,
    node_ids: str | None = None,
    allow_blocked: bool = False,
) -> PlaceAsk:
    try:
        backend, meta_name = parse_meta(meta)
        shard = parse_sharding(sharding)
    except ValueError as exc:
        raise invalid_request(
            f"{exc}.", param="instance_meta" if "meta" in str(exc) else "sharding"
        ) from None
    if min_nodes < 1:
        raise invalid_request("min_nodes must be at least 1.", param="min_nodes")
    nodes = frozenset(n.strip() for n in node_ids.split(",") if n.strip()) if node_ids else None
    return PlaceAsk(
        model_id,
        shard,
        backend,
        meta_name,
        min_nodes=min_nodes,
        nodes=nodes,
        allow_blocked=allow_blocked,
    )


def _query_ask(
    model_id: str = Query(...),
    sharding: str | None = Query(None),
    instance_meta: str | None = Query(None),
    min_nodes: int = Query(1),
    allow_blocked: bool = Query(False),
) -> PlaceAsk:
    """The query both /instance/placement and /instance/preflight take."""
    return _ask(model_id, sharding, instance_meta, min_nodes, allow_blocked=allow_blocked)


AskQuery = Annotated[PlaceAsk, Depends(_query_ask)]


def _layout(controller: Controller, ask: PlaceAsk, preflight_checks: bool) -> InstanceSpec:
    result = controller.place(ask, preflight_checks=preflight_checks)
    if isinstance(result, Refusal):
        raise ApiError(
            400, f"No placement for {ask.model_id}: {result.text()}.", code="no_placement"
        )
    return result


@router.get("/instance/placement", response_model=InstanceDocument)
async def placement(request: Request, ask: AskQuery) -> dict[str, Any]:
    return instance_document(_layout(_controller(request), ask, preflight_checks=True))


@router.get("/instance/preflight", response_model=PreflightDocument)
async def preflight(request: Request, ask: AskQuery) -> dict[str, Any]:
    """The paths the layout placement would choose needs, each against its thresholds."""
    controller = _controller(request)
    layout = _layout(controller, ask, preflight_checks=False)
    checks = controller.preflight(layout)
    return {
        "ok": all(c.ok for c in checks),
        "instance": instance_document(layout),
        "checks": [{**c.__dict__, "message": c.describe()} for c in checks],
    }


@router.get("/instance/previews", response_model=PreviewsDocument)
async def previews(
    request: Request, model_id: str = Query(...), node_ids: str | None = Query(None)
) -> dict[str, Any]:
    controller = _controller(request)
    alive = len(controller.reports())
    out = []
    for sharding in ("Pipeline", "Tensor"):
        for meta in META_NAME.values():  # torch's gloo and nccl, mlx's ring and jaccl
            for n in range(1, alive + 1):
                result = controller.place(_ask(model_id, sharding, meta, n, node_ids))
                ok = not isinstance(result, Refusal)
                out.append(
                    {
                        "model_id": model_id,
                        "sharding": sharding,
                        "instance_meta": meta,
                        "min_nodes": n,
                        "instance": instance_document(result) if ok else None,
                        "error": None if ok else result.text(),
                    }
                )
    return {"previews": out}


@router.post("/instance")
async def create_instance(body: CreateInstance, request: Request) -> Response:
    controller = _controller(request)
    try:
        model_id, sharding, meta, nodes = parse_instance_document(body.instance)
    except ValueError as exc:
        raise invalid_request(f"Invalid instance: {exc}.", param="instance") from None
    if not controller.is_leader():
        return await _forward(controller, "POST", "/instance", body.model_dump())
    ask = _ask(model_id, sharding, meta, len(nodes), allow_blocked=body.allow_blocked)
    ask = dataclasses.replace(ask, max_nodes=len(nodes), nodes=frozenset(nodes))
    result = controller.place(ask)
    if isinstance(result, Refusal):  # the view changed since the layout was computed
        text = f"The instance no longer fits the cluster: {result.text()}."
        controller.note("refused", f"POST /instance of {model_id}: {text}", model=model_id)
        raise ApiError(409, text, code="no_placement")
    controller.create(result)
    return _command(result.instance_id)


@router.get("/instance/{instance_id}", response_model=InstanceDocument)
async def get_instance(instance_id: str, request: Request) -> dict[str, Any]:
    controller = _controller(request)
    instance = controller.instance(instance_id)
    if instance is None:
        raise ApiError(404, f"No instance {instance_id}.", code="instance_not_found")
    return instance_document(instance, controller.runner_states())


@router.delete("/instance/{instance_id}")
async def delete_instance(instance_id: str, request: Request) -> Response:
    controller = _controller(request)
    if not controller.is_leader():
        return await _forward(controller, "DELETE", f"/instance/{instance_id}")
    if not controller.delete(instance_id):
        raise ApiError(404, f"No instance {instance_id}.", code="instance_not_found")
    return _command(instance_id)


def _command(instance_id: str) -> Response:
    body = {
        "message": "Command received.",
        "command_id": str(uuid.uuid4()),
        "instance_id": instance_id,
    }
    return Response(json.dumps(body), media_type="application/json")


async def _forward(controller: Controller, method: str, path: str, body: Any = None) -> Response:
    try:
        answer = await controller.forward(method, path, body)
    except (NotLeader, httpx.HTTPError) as exc:
        raise ApiError(
            503,
            f"Cannot reach the leader to change the plan: {exc}. Retry in a "
            "few seconds, or send the request to the leader (GET /state names "
            "it).",
            code="leader_unreachable",
            type="service_unavailable",
        ) from None
    return Response(
        answer.content,
        status_code=answer.status_code,
        media_type=answer.headers.get("content-type", "application/json"),
    )
