"""Requests for a model go to the rank-0 runner's endpoint of an instance serving it.

Tokens stream from the rank-0 node straight to the node holding the HTTP request (the leader
is not on the path). The body is passed through byte for byte, so the runner's own
validation and OpenAI error bodies reach the client unchanged; a client that disconnects
closes the upstream stream, which cancels the generation there. A rank 0 that refuses or is
gone before it answered anything, because its instance just moved to a new generation, is not
the client's problem: the request follows the move (`to_instance`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

import httpx
from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from shoal.web.errors import RETRY_AFTER_S, ApiError
from shoal.web.sse import DONE, sse


class Routes(Protocol):
    def endpoint(self, model_id: str) -> tuple[str | None, str]:
        """The base URL of the rank 0 serving a model, or why there is none."""
        ...


READY_WAIT_S = 60.0  # a request for an instance still loading waits this long for it
MOVE_WAIT_S = 5.0  # a refused request watches this long for its instance serving elsewhere
MAX_MOVES = 3  # moves one request follows before it gives the client the refusal
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}


async def endpoint_for(routes: Routes, model_id: str) -> str:
    """The serving instance's base URL, waiting (bounded) while one is still coming up."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        url, why = routes.endpoint(model_id)
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


async def to_instance(
    request: Request, routes: Routes, model_id: str, path: str, client: httpx.AsyncClient
) -> Response:
    """The answer of the model's serving instance, following it when it moves mid-request to
    a new rank 0 that is already serving (never waiting out a new generation's load)."""
    base_url = await endpoint_for(routes, model_id)
    for _ in range(MAX_MOVES):
        answer = await forward(request, base_url, path, client)
        if not isinstance(answer, Refused):
            return answer
        moved_to = await _serving_elsewhere(routes, model_id, base_url)
        if moved_to is None:
            break
        base_url = moved_to
    return answer.response()


async def _serving_elsewhere(routes: Routes, model_id: str, base_url: str) -> str | None:
    """Another endpoint this node's view names as serving the model within MOVE_WAIT_S (the
    leader's new plan reaches a follower about a poll later), or None."""
    deadline = time.monotonic() + MOVE_WAIT_S
    while time.monotonic() < deadline:
        url = routes.endpoint(model_id)[0]
        if url is not None and url != base_url:
            return url
        await asyncio.sleep(0.25)
    return None


class Refused:
    """Rank 0 was unreachable or answered 503 before any byte reached the client."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status, self.body, self.headers = status, body, headers

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, headers=self.headers)


async def forward(
    request: Request, base_url: str, path: str, client: httpx.AsyncClient
) -> Response | Refused:
    """Relay through the node's relay pool (cluster.peers): no client per request."""
    body = await request.body()
    upstream_request = client.build_request(
        "POST",
        base_url + path,
        content=body,
        headers={"content-type": "application/json"},
    )
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        lost = ApiError(
            503,
            f"The instance's rank-0 endpoint {base_url} did not answer: {exc}.",
            code="instance_unreachable",
            type="service_unavailable",
        )
        return Refused(503, lost.response().body, {"content-type": "application/json",
                                                   **lost.headers()})  # fmt: skip
    if upstream.status_code == 503:  # e.g. stopping: its instance moved on
        try:
            refusal = await upstream.aread()
        except httpx.HTTPError:
            refusal = b""
        finally:
            await upstream.aclose()
        if not refusal:  # cut off: still an error body
            refusal = ApiError(503, f"The instance's rank 0 at {base_url} is not serving.",
                               code="instance_unavailable").response().body  # fmt: skip
        keep = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        if "retry-after" not in {k.lower() for k in keep}:  # a runner of another version
            keep["retry-after"] = str(RETRY_AFTER_S)
        return Refused(503, refusal, keep)
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

    return _Relay(relay(), status_code=upstream.status_code, headers=headers)


class _Relay(StreamingResponse):
    """Closes the upstream stream as soon as our client goes away (see sse.EventStream)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
