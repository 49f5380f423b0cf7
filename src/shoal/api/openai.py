"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from starlette.responses import Response

from shoal import __version__
from shoal.api import proxy
from shoal.api.errors import ApiError, invalid_request
from shoal.api.host import ModelHost, controller_of, held_models_of
from shoal.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    Sampling,
    Usage,
)
from shoal.api.sse import DONE, EventStream, sse
from shoal.engine.generator import ContextLengthError, Event
from shoal.engine.sampling import SamplingParams
from shoal.engine.serving import ServedModel

router = APIRouter(prefix="/v1")

SYSTEM_FINGERPRINT = f"shoal-{__version__}"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy /v1/completions


@dataclass(frozen=True)
class Job:
    """One admitted generation request."""

    model: ServedModel
    prompt: list[int]
    params: SamplingParams
    name: str  # the model id as the client asked for it, echoed in every response
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self) -> dict[str, Any]:
        """The fields every response and chunk of this request carries."""
        return dict(
            id=self.id,
            created=self.created,
            model=self.name,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    async def events(self) -> AsyncGenerator[Event, None]:
        """The generation's events; a failed generation raises ApiError(500)."""
        async with aclosing(self.model.stream(self.prompt, self.params)) as events:
            async for event in events:
                if event.finish_reason == "aborted":  # a stop or a move, not the request's fault
                    raise ApiError(
                        503,
                        f"The generation was stopped: {event.error}; retry the request.",
                        code="server_stopping",
                        type="service_unavailable",
                    )
                if event.finish_reason not in (None, "stop", "length"):
                    reason = event.error or f"the generation was {event.finish_reason}"
                    raise ApiError(500, f"Generation failed: {reason}.", code="generation_failed")
                yield event

    async def collect(self) -> tuple[str, Event]:
        """Run to the end: the whole text and the final event."""
        parts: list[str] = []
        async with aclosing(self.events()) as events:
            async for event in events:
                parts.append(event.text)
                if event.finish_reason:
                    return "".join(parts), event
        raise ApiError(500, "The generation ended without a finish reason.")


def _host(request: Request) -> ModelHost:
    return request.app.state.host


def _placed(request: Request, name: str) -> bool:
    """A model served by an instance across nodes rather than by this process."""
    host = _host(request)
    controller = controller_of(host)
    return name not in host.models and controller is not None and name in controller.models_served()


async def _proxy(request: Request, name: str, path: str) -> Response:
    controller = _host(request).controller
    return await proxy.to_instance(request, controller, name, path)


def _find_model(host: ModelHost, name: str) -> ServedModel:
    models = host.models
    if name in models:
        return models[name]
    controller = controller_of(host)
    placed = controller.models_served() if controller is not None else []
    served = ", ".join(sorted([*models, *placed])) or (
        "none yet (start shoal run with --model, or place an instance: POST /instance)"
    )
    raise ApiError(
        404,
        f"The model '{name}' is not served here. Served models: {served}.",
        param="model",
        code="model_not_found",
    )


def _admit(
    host: ModelHost,
    body: Sampling,
    prompt_of: Callable[[ServedModel], list[int]],
    prompt_param: str,
    max_tokens: int | None,
    id_prefix: str,
) -> Job:
    """Validate a request against the model; every problem here is a 4xx, never a 500."""
    model = _find_model(host, body.model)
    if body.n != 1:
        raise invalid_request("Only n=1 is supported.", param="n")
    try:
        prompt = prompt_of(model)
    except jinja2.TemplateError as exc:  # chat templates reject e.g. an unsupported role order
        raise invalid_request(
            f"The chat template rejected the messages: {exc}", param=prompt_param
        ) from None
    if not prompt:
        raise invalid_request("The prompt is empty.", param=prompt_param)
    try:
        model.generator.check_prompt(prompt)
    except ContextLengthError as exc:
        raise invalid_request(
            f"Context length exceeded: {exc}.", param=prompt_param, code="context_length_exceeded"
        ) from None
    try:
        params = SamplingParams(
            max_tokens=max_tokens or model.context_length - len(prompt),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            seed=body.seed,
            stop=body.stop,
            ignore_eos=body.ignore_eos,
        )
    except ValueError as exc:
        raise invalid_request(f"Invalid sampling parameters: {exc}.") from None
    return Job(model, prompt, params, body.model, f"{id_prefix}-{uuid.uuid4().hex}")


def _usage(event: Event) -> Usage:
    return Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
    )


# ---- chat ------------------------------------------------------------------------------------


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    if _placed(request, body.model):
        return await _proxy(request, body.model, "/v1/chat/completions")
    messages = [m.model_dump() for m in body.messages]
    job = _admit(
        _host(request),
        body,
        lambda m: m.chat_prompt(messages),
        "messages",
        body.max_completion_tokens or body.max_tokens,
        "chatcmpl",
    )
    if body.stream:
        return EventStream(_chat_events(job, body.include_usage))
    text, last = await job.collect()
    choice = ChatChoice(message=ChatMessageOut(content=text), finish_reason=last.finish_reason)
    result = ChatCompletion(**job.envelope(), choices=[choice], usage=_usage(last))
    return Response(result.model_dump_json(), media_type="application/json")


def _chat_chunk(
    job: Job, choices: list[ChatChunkChoice], usage: Usage | None = None
) -> ChatCompletionChunk:
    return ChatCompletionChunk(**job.envelope(), choices=choices, usage=usage)


async def _chat_events(job: Job, include_usage: bool) -> AsyncGenerator[str, None]:
    yield sse(_chat_chunk(job, [ChatChunkChoice(delta=Delta(role="assistant", content=""))]))
    try:
        async with aclosing(job.events()) as events:
            async for event in events:
                if event.text:
                    delta = Delta(content=event.text)
                    yield sse(_chat_chunk(job, [ChatChunkChoice(delta=delta)]))
                if event.finish_reason:
                    final = ChatChunkChoice(delta=Delta(), finish_reason=event.finish_reason)
                    yield sse(_chat_chunk(job, [final]))
                    if include_usage:
                        yield sse(_chat_chunk(job, [], _usage(event)))
    except ApiError as exc:  # headers are sent: the error travels in the stream
        yield sse(exc.body())
    yield DONE


# ---- text completions ------------------------------------------------------------------------


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    if _placed(request, body.model):
        return await _proxy(request, body.model, "/v1/completions")
    job = _admit(
        _host(request),
        body,
        lambda m: m.text_prompt(body.prompt),
        "prompt",
        body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
        "cmpl",
    )
    if body.stream:
        return EventStream(_completion_events(job, body.include_usage))
    text, last = await job.collect()
    choice = CompletionChoice(text=text, finish_reason=last.finish_reason)
    return Response(
        _completion(job, [choice], _usage(last)).model_dump_json(), media_type="application/json"
    )


def _completion(
    job: Job, choices: list[CompletionChoice], usage: Usage | None = None
) -> Completion:
    return Completion(**job.envelope(), choices=choices, usage=usage)


async def _completion_events(job: Job, include_usage: bool) -> AsyncGenerator[str, None]:
    try:
        async with aclosing(job.events()) as events:
            async for event in events:
                if event.text or event.finish_reason:
                    choice = CompletionChoice(text=event.text, finish_reason=event.finish_reason)
                    yield sse(_completion(job, [choice]))
                if event.finish_reason and include_usage:
                    yield sse(_completion(job, [], _usage(event)))
    except ApiError as exc:
        yield sse(exc.body())
    yield DONE


# ---- models ----------------------------------------------------------------------------------


def _card(model_id: str, model: ServedModel) -> ModelCard:
    return ModelCard(id=model_id, created=model.created, context_length=model.context_length)


@router.get("/models")
async def list_models(request: Request, status: str | None = None) -> ModelList:
    """Served models; `?status=downloaded` lists the models this node holds on disk."""
    host = _host(request)
    controller = controller_of(host)
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
    cards = [_card(name, m) for name, m in host.models.items()]
    if controller is not None:
        cards += [
            _placed_card(controller, m) for m in controller.models_served() if m not in host.models
        ]
    return ModelList(data=cards)


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    host = _host(request)
    if _placed(request, model_id):
        return _placed_card(host.controller, model_id)
    return _card(model_id, _find_model(host, model_id))


def _placed_card(controller: Any, model_id: str) -> ModelCard:
    instance = next(i for i in controller.plan.instances if i.model_id == model_id)
    held = next((m for r in controller.reports() for m in r.models if m.model_id == model_id), None)
    return ModelCard(
        id=model_id,
        created=int(instance.created_at),
        context_length=held.context_length if held else None,
    )
