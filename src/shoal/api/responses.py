"""OpenAI Responses (`/v1/responses`), translated to the model's chat completions
(api.upstream) and back.

The translation is pure functions over dicts (input items -> chat messages, a chat completion
-> output items, chunks -> Responses stream events via StreamTranslator), so each is tested by
tables; the routes only fetch, store and frame. `previous_response_id` continues a
conversation held by this node in a bounded LRU (ResponseStore): another node, or a restart,
does not know the id and answers 404, as OpenAI does for an id it does not hold.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from shoal.api import upstream
from shoal.api.responses_translate import (
    StreamTranslator,
    chat_request,
    new_id,
    refuse_unsupported,
    response_of,
    skeleton,
    sse_event,
)
from shoal.api.upstream import UpstreamError
from shoal.schema.limits import RESPONSES
from shoal.schema.responses import (
    InputItem,
    ResponsesRequest,
)
from shoal.web.errors import ApiError, invalid_request
from shoal.web.sse import EventStream

router = APIRouter(prefix="/v1")

STORE_CAPACITY = 256  # responses each node keeps for previous_response_id and GET


# ---- the store -----------------------------------------------------------------------------


_ITEMS = TypeAdapter(list[InputItem])


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    conversation: tuple[InputItem, ...]  # every input and output item up to this response


class ResponseStore:
    """The last `capacity` stored responses of this node, least recently used evicted first."""

    def __init__(self, capacity: int = STORE_CAPACITY) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self, response: dict[str, Any], history: Iterable[InputItem], inputs: Iterable[InputItem]
    ) -> None:
        outputs = _ITEMS.validate_python(response["output"], strict=False)
        self._entries[response["id"]] = Stored(response, (*history, *inputs, *outputs))
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        stored = self._entries.get(response_id)
        if stored is not None:
            self._entries.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None


def _store(request: Request) -> ResponseStore:
    state = request.app.state
    if not hasattr(state, "responses"):  # one store per node's app
        state.responses = ResponseStore()
    return state.responses


def _not_found(response_id: str, param: str, code: str) -> ApiError:
    return ApiError(
        404,
        f"Response with id '{response_id}' not found (this node keeps its last "
        f"{STORE_CAPACITY} stored responses, in memory).",
        param=param,
        code=code,
    )


def _api_error(exc: UpstreamError) -> ApiError:
    param = exc.param or ("model" if exc.code == "model_not_found" else None)
    return ApiError(exc.status, exc.message, param=param, code=exc.code, type=exc.type)


# ---- routes --------------------------------------------------------------------------------


@router.post("/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request) -> JSONResponse | EventStream:
    refuse_unsupported(body)
    store = _store(request)
    history: tuple[InputItem, ...] = ()
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise _not_found(
                body.previous_response_id, "previous_response_id", "previous_response_not_found"
            )
        history = previous.conversation
    chat = chat_request(body, history)
    if not chat["messages"]:
        raise invalid_request("input holds no items (and there are no instructions).", "input")
    base = skeleton(body, new_id("resp"), int(time.time()))
    host = request.app.state.host

    def keep(response: dict[str, Any]) -> None:
        if body.store and response["status"] in ("completed", "incomplete"):
            store.put(response, history, body.input)

    if not body.stream:
        try:
            completion = await upstream.complete(host, chat, RESPONSES)
        except UpstreamError as exc:
            raise _api_error(exc) from None
        response = response_of(base, completion)
        keep(response)
        return JSONResponse(response)

    chunks = upstream.stream(host, chat, fields=RESPONSES)
    try:  # a refusal before the first chunk is still an HTTP error
        first: dict[str, Any] | None = await anext(chunks)
    except UpstreamError as exc:
        await chunks.aclose()
        raise _api_error(exc) from None
    except StopAsyncIteration:
        first = None
    return EventStream(_events(StreamTranslator(base), first, chunks, keep))


async def _events(
    translator: StreamTranslator,
    first: dict[str, Any] | None,
    chunks: AsyncIterator[dict[str, Any]],
    keep: Callable[[dict[str, Any]], None],
) -> AsyncIterator[str]:
    async with aclosing(chunks):  # a client that goes away cancels the generation
        for event in translator.start():
            yield sse_event(event)
        try:
            if first is not None:
                for event in translator.feed(first):
                    yield sse_event(event)
            async for chunk in chunks:
                for event in translator.feed(chunk):
                    yield sse_event(event)
            ending = translator.finish()
        except UpstreamError as exc:
            ending = translator.fail(exc.message, exc.code)
        keep(translator.response)
        for event in ending:
            yield sse_event(event)


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> JSONResponse:
    stored = _store(request).get(response_id)
    if stored is None:
        raise _not_found(response_id, "response_id", "response_not_found")
    return JSONResponse(stored.response)


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    if not _store(request).delete(response_id):
        raise _not_found(response_id, "response_id", "response_not_found")
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
