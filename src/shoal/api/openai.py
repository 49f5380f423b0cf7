"""OpenAI-compatible routes of the node: /v1/chat/completions, /v1/completions, /v1/models.

The node never runs a model itself: it validates the request's shape, asks the router where
the model's rank 0 serves, and relays the request there (api.proxy); the runner's endpoint
(shoal.runner.endpoint) generates and answers in OpenAI's shapes, its 4xx bodies included.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from shoal.api import proxy
from shoal.api.host import ModelHost, held_models_of, request_limits_of
from shoal.api.router import ServedCard
from shoal.schema.limits import COMPLETIONS, OPENAI, Fields, over_limit
from shoal.schema.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Sampling,
)
from shoal.web.errors import ApiError, invalid_request

router = APIRouter(prefix="/v1")


def _host(request: Request) -> ModelHost:
    return request.app.state.host


def _find_model(host: ModelHost, name: str) -> ServedCard:
    models = host.models
    if name in models:
        return models[name]
    served = ", ".join(sorted(models)) or (
        "none yet (start shoal run with --model, or place an instance: POST /instance)"
    )
    raise ApiError(
        404,
        f"The model '{name}' is not served here. Served models: {served}.",
        param="model",
        code="model_not_found",
    )


async def _relay(request: Request, model: str, path: str) -> Response:
    """Relay a generation request to the rank 0 serving `model`, through the node's pool."""
    host = _host(request)
    _find_model(host, model)
    return await proxy.to_instance(request, host, model, path, host.peers.relay)


def _within_limits(request: Request, body: Sampling, fields: Fields) -> None:
    """The node's caps (schema.limits): a 400 naming the field, before any relay."""
    capped = body.model_dump(include={"messages", "prompt", "max_tokens", "max_completion_tokens"})
    over = over_limit(request_limits_of(_host(request)), capped, fields)
    if over is not None:
        raise ApiError(400, over.message, param=over.param, code=over.code)


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    _within_limits(request, body, OPENAI)
    return await _relay(request, body.model, "/v1/chat/completions")


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    _within_limits(request, body, COMPLETIONS)
    return await _relay(request, body.model, "/v1/completions")


def _card(model: ServedCard) -> ModelCard:
    return ModelCard(id=model.id, created=model.created, context_length=model.context_length)


@router.get("/models")
async def list_models(request: Request, status: str | None = None) -> ModelList:
    """Served models; `?status=downloaded` lists the models this node holds on disk."""
    host = _host(request)
    if status == "downloaded":
        held = held_models_of(host)
        return ModelList(
            data=[
                ModelCard(id=m, created=0, context_length=h.context_length)
                for m, h in sorted(held.items())
            ]
        )
    if status not in (None, ""):
        raise invalid_request("status must be 'downloaded' or left out.", param="status")
    return ModelList(data=[_card(m) for m in host.models.values()])


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    return _card(_find_model(_host(request), model_id))
