"""OpenAI chat completions at a model's rank 0, as data: the one upstream every other API
shape (Anthropic Messages, OpenAI Responses, Ollama) translates to and from.

api.proxy relays OpenAI requests byte for byte; the translators instead need the answer as
dicts: `complete` returns one chat.completion, `stream` yields each chat.completion.chunk.
A refusal of the runner (its 4xx/5xx OpenAI error body, or no rank 0 reachable) is raised
as UpstreamError with that status and body, for each API to render in its own error shape.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_sse import EventSource

from shoal.api import proxy
from shoal.api.host import ModelHost, request_limits_of
from shoal.schema.limits import OPENAI, Fields, over_limit
from shoal.web.errors import ApiError

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"  # text completions (raw prompts): chunks of the same kind


class UpstreamError(Exception):
    """The rank 0 refused the request (or there was none): an HTTP status and OpenAI error."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        type: str = "",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    @classmethod
    def of(cls, status: int, body: Any) -> UpstreamError:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status, f"the model's runner answered HTTP {status}")
        return cls(
            status,
            str(error.get("message") or f"HTTP {status}"),
            error.get("code"),
            str(error.get("type") or ""),
        )

    @classmethod
    def from_api_error(cls, exc: ApiError) -> UpstreamError:
        return cls(exc.status, exc.message, exc.code, exc.type)


async def _base_url(host: ModelHost, model: str) -> str:
    if model not in host.models:
        served = ", ".join(sorted(host.models)) or "none yet"
        raise UpstreamError(
            404,
            f"The model '{model}' is not served here. Served models: {served}.",
            "model_not_found",
        )
    try:
        return await proxy.endpoint_for(host, model)
    except ApiError as exc:
        raise UpstreamError.from_api_error(exc) from None


def check_limits(host: ModelHost, body: dict[str, Any], fields: Fields) -> None:
    """The node's caps on one request (schema.limits), as a 400 the caller's API renders."""
    over = over_limit(request_limits_of(host), body, fields)
    if over is not None:
        raise UpstreamError(400, over.message, over.code, param=over.param)


async def complete(
    host: ModelHost, body: dict[str, Any], fields: Fields = OPENAI
) -> dict[str, Any]:
    """One non-streamed chat completion (the runner's JSON). `fields`: how the client's API
    names the capped fields, for the refusal's message."""
    check_limits(host, body, fields)
    url = await _base_url(host, str(body.get("model")))
    try:
        response = await host.peers.relay.post(url + CHAT_PATH, json={**body, "stream": False})
    except httpx.HTTPError as exc:
        raise UpstreamError(503, f"The model's rank 0 did not answer: {exc}.") from None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code != 200 or not isinstance(answer, dict):
        raise UpstreamError.of(response.status_code, answer)
    return answer


async def stream(
    host: ModelHost, body: dict[str, Any], path: str = CHAT_PATH, fields: Fields = OPENAI
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of one streamed chat (or, with COMPLETIONS_PATH, text) completion, usage
    included in the last one.

    Raises UpstreamError before the first chunk if the runner refuses; an error the runner
    sends mid-stream (headers already sent) is raised where it arrives."""
    check_limits(host, body, fields)
    url = await _base_url(host, str(body.get("model")))
    options = {"include_usage": True, **(body.get("stream_options") or {})}
    payload = {**body, "stream": True, "stream_options": options}
    request = host.peers.relay.build_request("POST", url + path, json=payload)
    try:
        response = await host.peers.relay.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise UpstreamError(503, f"The model's rank 0 did not answer: {exc}.") from None
    try:
        if response.status_code != 200:
            try:
                refusal = json.loads(await response.aread())
            except ValueError:
                refusal = None
            raise UpstreamError.of(response.status_code, refusal)
        async for event in EventSource(response).aiter_sse():
            if event.data == "[DONE]":
                return
            chunk = json.loads(event.data)
            if "error" in chunk:  # headers were sent: the runner's error travels in the stream
                unavailable = chunk["error"].get("type") == "service_unavailable"
                raise UpstreamError.of(503 if unavailable else 500, chunk)
            yield chunk
    except httpx.HTTPError as exc:
        raise UpstreamError(503, f"The model's rank 0 went away mid-answer: {exc}.") from None
    finally:
        await response.aclose()
