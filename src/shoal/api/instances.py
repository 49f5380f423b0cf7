"""Instance routes, shaped like exo's so operators' scripts keep working.

GET /instance/placement and /instance/previews compute layouts on this node's view; POST
/instance and DELETE /instance/{id} change the plan on the leader (a follower forwards them and
returns the leader's answer); GET /instance/{id} shows one instance with its runners' status.
Every instance document carries exo's keys beside shoal's (schema.exo.exo_instance), a posted
one may be exo's own (shardAssignments) and keeps its instanceId, and instance_meta takes
exo's MlxRing / MlxJaccl as well as shoal's names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from shoal.api.host import controller_of
from shoal.control import Controller, NotLeader, PlaceAsk
from shoal.placement.decide import SERVING
from shoal.placement.plan import (
    META_NAME,
    holders,
    instance_document,
    parse_instance_document,
    parse_meta,
    parse_sharding,
    runner_of,
)
from shoal.placement.planner import Refusal
from shoal.schema.documents import PreflightDocument, PreviewsDocument
from shoal.schema.exo import (
    InstanceDocument,
    exo_instance,
    meta_name,
    model_card,
    posted_instance_id,
)
from shoal.schema.report import InstanceSpec, RunnerState
from shoal.web.errors import ApiError, invalid_request
from shoal.web.signing import SignatureError
from shoal.web.sse import EventStream

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
        backend, meta_shown = parse_meta(meta_name(meta))
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
        meta_shown,
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


def cards_of(controller: Controller, model_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """exo's model card of each model, from what the first node holding it says of it."""
    reports = controller.reports()
    out = {}
    for model_id in model_ids:
        held = holders(reports, model_id)
        out[model_id] = model_card(model_id, held[min(held)] if held else None)
    return out


def exo_document(
    controller: Controller,
    instance: InstanceSpec,
    runners: Mapping[str, RunnerState] | None = None,
) -> dict[str, Any]:
    """{meta: body}: shoal's instance document with exo's keys added."""
    cards = cards_of(controller, [instance.model_id])
    return exo_instance(instance_document(instance, runners), instance, cards)


def exo_instances(controller: Controller) -> dict[str, Any]:
    """/state's instances: id -> {meta: body}, with exo's keys."""
    states = controller.runner_states()
    specs = controller.plan.instances
    cards = cards_of(controller, {i.model_id for i in specs})
    return {i.instance_id: exo_instance(instance_document(i, states), i, cards) for i in specs}


@router.get("/instance/placement", response_model=InstanceDocument)
async def placement(request: Request, ask: AskQuery) -> dict[str, Any]:
    controller = _controller(request)
    return exo_document(controller, _layout(controller, ask, preflight_checks=True))


@router.get("/instance/preflight", response_model=PreflightDocument)
async def preflight(request: Request, ask: AskQuery) -> dict[str, Any]:
    """The paths the layout placement would choose needs, each against its thresholds."""
    controller = _controller(request)
    layout = _layout(controller, ask, preflight_checks=False)
    checks = controller.preflight(layout)
    return {
        "ok": all(c.ok for c in checks),
        "instance": exo_document(controller, layout),
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
                        "instance": exo_document(controller, result) if ok else None,
                        "error": None if ok else result.text(),
                    }
                )
    return {"previews": out}


@router.post("/instance")
async def create_instance(body: CreateInstance, request: Request) -> Response:
    controller = _controller(request)
    try:
        model_id, sharding, meta, nodes = parse_instance_document(body.instance)
        instance_id = posted_instance_id(body.instance)
    except ValueError as exc:
        raise invalid_request(f"Invalid instance: {exc}.", param="instance") from None
    if not controller.is_leader():
        return await _forward(controller, "POST", "/instance", body.model_dump())
    if instance_id is not None and controller.instance(instance_id) is not None:
        raise ApiError(
            409,
            f"Instance {instance_id} exists already: DELETE /instance/{instance_id} first, or "
            "post the document without its instanceId for a new one.",
            code="instance_exists",
        )
    ask = _ask(model_id, sharding, meta, len(nodes), allow_blocked=body.allow_blocked)
    ask = dataclasses.replace(ask, max_nodes=len(nodes), nodes=frozenset(nodes))
    result = controller.place(ask, instance_id=instance_id)
    if isinstance(result, Refusal):  # the view changed since the layout was computed
        text = f"The instance no longer fits the cluster: {result.text()}."
        controller.note("refused", f"POST /instance of {model_id}: {text}", model=model_id)
        raise ApiError(409, text, code="no_placement")
    controller.create(result)
    return _command(result.instance_id)


class PlaceInstance(BaseModel):
    """exo's PlaceInstanceParams; an empty sharding or instance_meta means the default."""

    model_config = ConfigDict(extra="ignore")

    model_id: StrictStr = Field(min_length=1)
    sharding: StrictStr | None = None
    instance_meta: StrictStr | None = None
    min_nodes: StrictInt = 1
    allow_blocked: StrictBool = False


@router.post("/place_instance")
async def place_instance(body: PlaceInstance, request: Request) -> Response:
    """Place a model with shoal's placement on the leader's view and create the instance.

    The answer is exo's (message, command_id, model_card) plus the new instance_id; where exo
    only logs a placement that fails, this answers 400 with every reason."""
    controller = _controller(request)
    ask = _ask(
        body.model_id,
        body.sharding or None,
        body.instance_meta or None,
        body.min_nodes,
        allow_blocked=body.allow_blocked,
    )
    if not controller.is_leader():
        return await _forward(controller, "POST", "/place_instance", body.model_dump())
    instance = _layout(controller, ask, preflight_checks=True)
    controller.create(instance)
    card = cards_of(controller, [instance.model_id])[instance.model_id]
    answer = {
        "message": "Command received.",
        "command_id": str(uuid.uuid4()),
        "model_card": card,
        "instance_id": instance.instance_id,
    }
    return Response(json.dumps(answer), media_type="application/json")


AWAIT_MAX_S = 600.0  # exo waits forever on timeout_seconds=0; here that is the bound
AWAIT_POLL_S = 0.25
KEEPALIVE_S = 10.0


def ready_instance(
    controller: Controller, model_id: str | None, instance_id: str | None
) -> InstanceSpec | None:
    """The oldest instance of the model (or the one named) whose every runner serves."""
    states = controller.runner_states()
    for spec in sorted(controller.plan.instances, key=lambda i: i.created_at):
        if instance_id is not None and spec.instance_id != instance_id:
            continue
        if model_id is not None and spec.model_id != model_id:
            continue
        runners = [states.get(runner_of(spec, rank)) for rank in range(len(spec.nodes))]
        if all(r is not None and r.status in SERVING for r in runners):
            return spec
    return None


@router.get("/instance/await", response_model=None)
async def await_instance(
    request: Request,
    model_id: str | None = Query(None),
    instance_id: str | None = Query(None),
    timeout_seconds: float = Query(300.0, ge=0.0, le=AWAIT_MAX_S),
) -> EventStream:
    """SSE until an instance of `model_id` (or the instance `instance_id`) is ready: one
    `data: {"type": "ready", "instance": {meta: body}}`, or `{"type": "timeout", message}`
    after timeout_seconds (0: AWAIT_MAX_S); `: keep-alive` comments meanwhile."""
    if not model_id and not instance_id:
        raise invalid_request("Name the model_id (or instance_id) to wait for.", "model_id")
    controller = _controller(request)
    bound = timeout_seconds or AWAIT_MAX_S
    what = f"instance {instance_id}" if instance_id else f"instance of {model_id}"

    async def events() -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        start = pinged = loop.time()
        yield ": keep-alive\n\n"
        while True:
            found = ready_instance(controller, model_id or None, instance_id or None)
            if found is not None:
                doc = exo_document(controller, found, controller.runner_states())
                yield f"data: {json.dumps({'type': 'ready', 'instance': doc})}\n\n"
                return
            now = loop.time()
            if now - start >= bound:
                message = f"No ready {what} within {bound:g} s."
                yield f"data: {json.dumps({'type': 'timeout', 'message': message})}\n\n"
                return
            if now - pinged >= KEEPALIVE_S:
                pinged = now
                yield ": keep-alive\n\n"
            await asyncio.sleep(min(AWAIT_POLL_S, max(bound - (now - start), 0.0)))

    return EventStream(events())


@router.get("/instance/{instance_id}", response_model=InstanceDocument)
async def get_instance(instance_id: str, request: Request) -> dict[str, Any]:
    controller = _controller(request)
    instance = controller.instance(instance_id)
    if instance is None:
        raise ApiError(404, f"No instance {instance_id}.", code="instance_not_found")
    return exo_document(controller, instance, controller.runner_states())


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
    try:  # with a cluster secret, the leader's answer is signed: check it before passing it on
        controller.service.peers.verify(answer)
    except SignatureError as exc:
        raise ApiError(
            502,
            f"The leader's answer to the plan change was refused: {exc}.",
            code="leader_unsigned",
        ) from None
    return Response(
        answer.content,
        status_code=answer.status_code,
        media_type=answer.headers.get("content-type", "application/json"),
    )
