"""Anthropic Messages (`/v1/messages`, `/v1/messages/count_tokens`), translated to the
model's OpenAI chat completions (api.upstream) and back.

The translation is pure functions in api.anthropic_translate, tested by tables; the routes
here only parse, fetch and frame. Every error these routes answer is
in Anthropic's shape (`{"type": "error", "error": {type, message}}`): the routes validate the
body themselves, so the app's OpenAI-shaped validation handler never answers for them.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from shoal.api import upstream
from shoal.api.anthropic_translate import (
    AnthropicError,
    StreamTranslator,
    frame,
    invalid,
    parse,
    to_message,
    to_openai,
    usage_of,
)
from shoal.api.upstream import UpstreamError
from shoal.schema.anthropic import (
    CountTokensRequest,
    MessagesRequest,
)
from shoal.web.sse import EventStream

log = logging.getLogger(__name__)


router = APIRouter(prefix="/v1")

# ---- routes ----------------------------------------------------------------------------------


def anthropic_errors(
    route: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Whatever fails in the route answers in Anthropic's shape, an unexpected bug too."""

    @functools.wraps(route)
    async def wrapped(request: Request) -> Response:
        try:
            return await route(request)
        except AnthropicError as exc:
            return exc.response()
        except UpstreamError as exc:
            return AnthropicError.of(exc).response()
        except Exception as exc:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return AnthropicError(500, f"Internal server error ({type(exc).__name__}).").response()

    return wrapped


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise invalid("The request needs a JSON body.")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise invalid(f"The request body is not valid JSON ({exc}).") from None


@router.post("/messages", response_model=None)
@anthropic_errors
async def messages(request: Request) -> Response:
    body = parse(MessagesRequest, await _body(request))
    chat = to_openai(body)
    host = request.app.state.host
    if body.stream:
        return await _stream(host, body, chat)
    completion = await upstream.complete(host, chat)
    return JSONResponse(to_message(completion, body.model, body.stop_sequences))


async def _stream(host: Any, body: MessagesRequest, chat: dict[str, Any]) -> Response:
    # Usage in every chunk: message_start then carries the real input_tokens.
    chunks = upstream.stream(host, {**chat, "stream_options": {"continuous_usage_stats": True}})
    # Wait for the first chunk before the headers go out: a refusal (unknown model, context
    # too long, no rank 0) is then an HTTP status, not an in-stream error.
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    translator = StreamTranslator(body.model, body.stop_sequences)
    return EventStream(_events(translator, first, chunks))


async def _events(
    translator: StreamTranslator, first: dict[str, Any] | None, chunks: AsyncIterator[dict]
) -> AsyncIterator[str]:
    try:
        async with aclosing(chunks):  # type: ignore[type-var]
            opened = translator.feed(first) if first is not None else []  # its usage first
            for event in translator.start() + opened:
                yield frame(event)
            if first is not None:
                async for chunk in chunks:
                    for event in translator.feed(chunk):
                        yield frame(event)
            for event in translator.end():
                yield frame(event)
    except (UpstreamError, AnthropicError) as exc:  # headers are sent: the error is an event
        error = exc if isinstance(exc, AnthropicError) else AnthropicError.of(exc)
        yield frame(error.body())


@router.post("/messages/count_tokens", response_model=None)
@anthropic_errors
async def count_tokens(request: Request) -> Response:
    """The prompt's real token count, as the model's chat template and tokenizer make it.

    The runner has no tokenize route, so this asks for a one-token completion and reads its
    usage.prompt_tokens: one prefill and one decode step, the cheapest honest count."""
    body = parse(CountTokensRequest, await _body(request))
    chat = to_openai(body, max_tokens=1) | {"temperature": 0}
    completion = await upstream.complete(request.app.state.host, chat)
    return JSONResponse({"input_tokens": usage_of(completion.get("usage"))["input_tokens"]})
