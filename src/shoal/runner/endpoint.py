"""A rank 0's generation endpoint: the OpenAI routes that run a request on this instance.

Only what the node's router relays here: /v1/chat/completions, /v1/completions, /v1/models,
/health (200 once the warm-up generation passed) and /status. Validation that needs the model
(chat template, context length, sampling) happens here, so its 4xx bodies reach the client
unchanged through the relay. The node's API (shoal.api) holds everything else.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from shoal import __version__
from shoal.engine.generator import ContextLengthError, Event
from shoal.engine.sampling import SamplingParams, TokenLogprob
from shoal.engine.serving import ServedModel
from shoal.runner.logprobs import chat_logprobs, completion_logprobs
from shoal.runner.tools import (
    HERMES,
    ToolCall,
    ToolStream,
    forced_prefix,
    parse_tool_calls,
    template_messages,
    template_renders_tools,
    tool_format,
)
from shoal.schema.limits import (
    DEFAULT_CLIENT_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_TOKENS_CAP,
)
from shoal.schema.openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    Sampling,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from shoal.web.errors import EXCEPTION_HANDLERS, ApiError, CatchUnexpected, invalid_request
from shoal.web.limits import BodyLimit
from shoal.web.sse import DONE, EventStream, sse

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

    async def collect(self) -> tuple[str, Event, list[TokenLogprob]]:
        """Run to the end: the whole text, the final event and the tokens' logprobs (when
        the request asked)."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        async with aclosing(self.events()) as events:
            async for event in events:
                parts.append(event.text)
                logprobs.extend(event.logprobs)
                if event.finish_reason:
                    return "".join(parts), event, logprobs
        raise ApiError(500, "The generation ended without a finish reason.")

    @property
    def wants_logprobs(self) -> bool:
        return self.params.logprobs is not None


def _served(request: Request) -> ServedModel:
    return request.app.state.served


def _find_model(served: ServedModel, name: str) -> ServedModel:
    """The node's router sent this request here; a different name is the client's mistake."""
    if name == served.id:
        return served
    raise ApiError(
        404,
        f"The model '{name}' is not served here. Served models: {served.id}.",
        param="model",
        code="model_not_found",
    )


def _admit(
    served: ServedModel,
    body: Sampling,
    prompt_of: Callable[[ServedModel], list[int]],
    prompt_param: str,
    max_tokens: int | None,
    id_prefix: str,
    logprobs: int | None = None,
    cap: int = DEFAULT_MAX_TOKENS_CAP,
) -> Job:
    """Validate a request against the model; every problem here is a 4xx, never a 500.
    `cap` (--max-tokens-cap): the most output tokens a request asks for, or gets unasked."""
    model = _find_model(served, body.model)
    if max_tokens is not None and max_tokens > cap:
        raise invalid_request(
            f"max_tokens is {max_tokens}, over this instance's cap of {cap} output tokens "
            "(--max-tokens-cap).",
            param="max_tokens",
            code="max_tokens_too_large",
        )
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
            max_tokens=max_tokens or min(cap, model.context_length - len(prompt)),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            seed=body.seed,
            stop=body.stop,
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logprobs=logprobs,
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


@dataclass(frozen=True)
class ToolUse:
    """How this request's tool calls are written and found (shoal.runner.tools)."""

    fmt: str
    prefix: str  # forced by tool_choice: the answer starts with it
    parallel: bool

    def calls(self, found: list[ToolCall]) -> list[ToolCall]:
        return found if self.parallel else found[:1]


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.response_format is not None and body.response_format.type != "text":
        raise invalid_request(
            f"response_format '{body.response_format.type}' needs constrained decoding, which "
            "shoal does not do yet; leave it out (or 'text') and ask for JSON in the prompt.",
            param="response_format",
        )


def _tool_use(
    model: ServedModel, body: ChatCompletionRequest
) -> tuple[ToolUse | None, Callable[[ServedModel], list[int]]]:
    """The request's tool use, and a prompt builder for it."""
    template = model.tokenizer.chat_template
    renders = template_renders_tools(template)
    calling = bool(body.tools) and body.tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if calling else None
    messages = template_messages(
        [m.model_dump(exclude_none=True) for m in body.messages], tools, renders
    )
    if not calling:
        return None, lambda m: m.chat_prompt(messages)
    fmt = tool_format(template) if renders else HERMES
    choice = body.tool_choice
    prefix = forced_prefix(fmt, choice.model_dump() if isinstance(choice, BaseModel) else choice)
    use = ToolUse(fmt, prefix, body.parallel_tool_calls)
    return use, lambda m: m.chat_prompt(messages, tools if renders else None, prefix)


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    _refuse_unsupported(body)
    served = _served(request)
    tool_use, prompt_of = _tool_use(served, body)
    job = _admit(
        served,
        body,
        prompt_of,
        "messages",
        body.max_completion_tokens or body.max_tokens,
        "chatcmpl",
        body.logprobs_wanted,
        request.app.state.max_tokens_cap,
    )
    if body.stream:
        return EventStream(_chat_events(job, body, tool_use))
    text, last, logprobs = await job.collect()
    message, reason = ChatMessageOut(content=text), last.finish_reason
    if tool_use is not None:
        content, found = parse_tool_calls(tool_use.prefix + text, tool_use.fmt)
        message = ChatMessageOut(content=content)  # no call: the prefilled words are its text
        if found:
            calls = [ToolCallOut(**c.openai()) for c in tool_use.calls(found)]
            message = ChatMessageOut(content=content or None, tool_calls=calls)
            reason = "tool_calls"
    choice = ChatChoice(
        message=message,
        finish_reason=reason,
        logprobs=_chat_logprobs(job, logprobs),
        stop_reason=last.stop_sequence,
    )
    result = ChatCompletion(**job.envelope(), choices=[choice], usage=_usage(last))
    return Response(result.model_dump_json(), media_type="application/json")


def _chat_logprobs(job: Job, found: list[TokenLogprob]) -> ChoiceLogprobs | None:
    return chat_logprobs(job.model.tokenizer, found) if job.wants_logprobs else None


def _chat_chunk(
    job: Job, choices: list[ChatChunkChoice], usage: Usage | None = None
) -> ChatCompletionChunk:
    return ChatCompletionChunk(**job.envelope(), choices=choices, usage=usage)


async def _chat_events(
    job: Job, body: ChatCompletionRequest, tool_use: ToolUse | None = None
) -> AsyncGenerator[str, None]:
    calls = ToolStream(tool_use.fmt, tool_use.prefix) if tool_use else None
    pending: list[TokenLogprob] = []  # logprobs of tokens whose text a tool parser holds
    so_far = Usage(prompt_tokens=len(job.prompt), completion_tokens=0, total_tokens=len(job.prompt))

    def chunk(choices: list[ChatChunkChoice]) -> str:
        return sse(_chat_chunk(job, choices, so_far if body.continuous_usage else None))

    def content(text: str) -> str:
        logprobs = _chat_logprobs(job, pending)
        pending.clear()
        return chunk([ChatChunkChoice(delta=Delta(content=text), logprobs=logprobs)])

    yield chunk([ChatChunkChoice(delta=Delta(role="assistant", content=""))])
    try:
        async with aclosing(job.events()) as events:
            async for event in events:
                so_far = _usage(event)
                pending.extend(event.logprobs)
                text = calls.feed(event.text) if calls else event.text
                if text:
                    yield content(text)
                if event.finish_reason:
                    reason = event.finish_reason
                    if calls is not None and tool_use is not None:
                        rest, found = calls.finish()
                        if rest:
                            yield content(rest)
                        if found:
                            deltas = [
                                ToolCallDelta(**c.openai(i))
                                for i, c in enumerate(tool_use.calls(found))
                            ]
                            yield chunk([ChatChunkChoice(delta=Delta(tool_calls=deltas))])
                            reason = "tool_calls"
                    stopped = event.stop_sequence if reason == "stop" else None
                    final = ChatChunkChoice(
                        delta=Delta(), finish_reason=reason, stop_reason=stopped
                    )
                    yield chunk([final])
                    if body.include_usage:
                        yield sse(_chat_chunk(job, [], _usage(event)))
    except ApiError as exc:  # headers are sent: the error travels in the stream
        yield sse(exc.body())
    yield DONE


# ---- text completions ------------------------------------------------------------------------


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    job = _admit(
        _served(request),
        body,
        lambda m: m.text_prompt(body.prompt),
        "prompt",
        body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
        "cmpl",
        body.logprobs,
        request.app.state.max_tokens_cap,
    )
    if body.stream:
        return EventStream(_completion_events(job, body.include_usage))
    text, last, logprobs = await job.collect()
    choice = CompletionChoice(
        text=text, finish_reason=last.finish_reason, logprobs=_completion_logprobs(job, logprobs)
    )
    return Response(
        _completion(job, [choice], _usage(last)).model_dump_json(), media_type="application/json"
    )


def _completion(
    job: Job, choices: list[CompletionChoice], usage: Usage | None = None
) -> Completion:
    return Completion(**job.envelope(), choices=choices, usage=usage)


def _completion_logprobs(
    job: Job, found: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int = 0
) -> CompletionLogprobs | None:
    if not job.wants_logprobs:
        return None
    return completion_logprobs(job.model.tokenizer, found, offset)


async def _completion_events(job: Job, include_usage: bool) -> AsyncGenerator[str, None]:
    offset = 0  # characters of the text sent so far
    try:
        async with aclosing(job.events()) as events:
            async for event in events:
                if event.text or event.finish_reason:
                    choice = CompletionChoice(
                        text=event.text,
                        finish_reason=event.finish_reason,
                        logprobs=_completion_logprobs(job, event.logprobs, offset),
                    )
                    offset += len(event.text)
                    yield sse(_completion(job, [choice]))
                if event.finish_reason and include_usage:
                    yield sse(_completion(job, [], _usage(event)))
    except ApiError as exc:
        yield sse(exc.body())
    yield DONE


# ---- models, health, status ------------------------------------------------------------------


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.id, created=model.created, context_length=model.context_length)


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(_served(request))])


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    return _card(_find_model(_served(request), model_id))


@dataclass
class Readiness:
    """Whether the warm-up generation passed; flipped by the runner process."""

    ready: bool = False
    reason: str = "warming up"


def create_endpoint(
    served: ServedModel,
    readiness: Readiness,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
) -> FastAPI:
    app = FastAPI(title="shoal runner", version=__version__, exception_handlers=EXCEPTION_HANDLERS)
    app.state.served = served
    app.state.max_tokens_cap = max_tokens_cap
    app.add_middleware(CatchUnexpected)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=DEFAULT_CLIENT_TIMEOUT_S)
    app.include_router(router)

    @app.get("/health", response_model=None)
    async def health() -> JSONResponse:
        if not readiness.ready:
            raise ApiError(503, readiness.reason, code="not_ready", type="service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/status")
    async def status() -> dict[str, Any]:
        g = served.generator
        return {
            "model": served.id,
            "ready": readiness.ready,
            "context_length": served.context_length,
            "in_flight": g.in_flight,
            **g.stats,
        }

    return app
