"""Requests for a model placed as an instance go to its rank-0 runner's endpoint.

Tokens stream from the rank-0 node straight to the node holding the HTTP request (the leader
is not on the path). The body is passed through byte for byte, so the runner's own
validation and OpenAI error bodies reach the client unchanged; a client that disconnects
closes the upstream stream, which cancels the generation there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from shoal.api.errors import ApiError
from shoal.api.sse import DONE, sse
from shoal.control import Controller

READY_WAIT_S = 60.0  # a request for an instance still loading waits this long for it
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}


async def endpoint_for(controller: Controller, model_id: str) -> str:
    """The serving instance's base URL, waiting (bounded) while one is still coming up."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        url, why = controller.endpoint(model_id)
        if url is not None:
            return url
        if time.monotonic() >= deadline:
            raise ApiError(
                503,
                f"The model '{model_id}' is placed but not serving: {why}. "
                "GET /state shows its runners.",
                code="instance_not_ready",
                type="service_unavailable",
            )
        await asyncio.sleep(0.25)


async def forward(request: Request, base_url: str, path: str) -> Response:
    body = await request.body()
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
    upstream_request = client.build_request(
        "POST", base_url + path, content=body, headers={"content-type": "application/json"}
    )
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        raise ApiError(
            503,
            f"The instance's rank-0 endpoint {base_url} did not answer: {exc}.",
            code="instance_unreachable",
            type="service_unavailable",
        ) from None
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}

    streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:  # rank 0 went away mid-answer: say so, never hang
            if streaming:
                lost = ApiError(
                    503,
                    f"The instance's rank 0 at {base_url} went away mid-answer "
                    f"({type(exc).__name__}); retry the request.",
                    code="instance_lost",
                    type="service_unavailable",
                )
                yield ("\n\n" + sse(lost.body()) + DONE).encode()
        finally:
            await upstream.aclose()
            await client.aclose()

    return _Relay(relay(), status_code=upstream.status_code, headers=headers)


class _Relay(StreamingResponse):
    """Closes the upstream stream as soon as our client goes away (see sse.EventStream)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
