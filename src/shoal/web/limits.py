"""Limits every HTTP server of shoal (the node's API, a rank 0's endpoint) puts on its clients.

- BodyLimit (ASGI): a request body over `max_bytes` is refused with 413 while it is read, a
  declared Content-Length over it before a byte of the body is read, and a body that has not
  fully arrived `timeout_s` after its headers gets 408. Never more than `max_bytes` of one
  body is held; the app gets the body once complete, so no route reads past the cap.
- ClientTimeoutH11 (uvicorn's h11 protocol): a connection that has not sent a whole request
  head within `client_timeout` of connecting (or of its previous response) is closed;
  uvicorn itself times out only idle keep-alive connections, and only until their first
  byte. h11 already refuses a request head over 16 KiB (uvicorn answers 400).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from shoal.schema.limits import DEFAULT_CLIENT_TIMEOUT_S
from shoal.web.errors import ApiError

# (path, status, message, code) -> the response in the API's own error shape
Render = Callable[[str, int, str, str], JSONResponse]


def openai_refusal(path: str, status: int, message: str, code: str) -> JSONResponse:
    del path  # one shape for every route
    return ApiError(status, message, code=code).response()


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length a request declares (None without one; h11 refuses a malformed one
    before the app sees the request)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def too_large(size: int | str, max_bytes: int) -> tuple[int, str, str]:
    return (
        413,
        f"The request body is {size} bytes, over this server's limit of {max_bytes} "
        "(--max-body-bytes); send a smaller request.",
        "request_too_large",
    )


def too_slow(timeout_s: float) -> tuple[int, str, str]:
    return (
        408,
        f"The request body did not arrive within {timeout_s:g} s (--client-timeout); "
        "send it again.",
        "request_timeout",
    )


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


class BodyLimit:
    def __init__(
        self, app: ASGIApp, max_bytes: int, timeout_s: float, render: Render = openai_refusal
    ) -> None:
        self.app, self.max_bytes, self.timeout_s, self.render = app, max_bytes, timeout_s, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope.get("headers", ()))
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, too_large(declared, self.max_bytes))
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except _TooLarge:
            over = too_large(f"over {self.max_bytes}", self.max_bytes)
            await self._refuse(scope, receive, send, over)
            return
        except TimeoutError:
            await self._refuse(scope, receive, send, too_slow(self.timeout_s))
            return
        except _Gone:  # the client went away before its body was whole: nobody to answer
            return
        await self.app(scope, replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, refusal: tuple[int, str, str]
    ) -> None:
        status, message, code = refusal
        response = self.render(scope.get("path", ""), status, message, code)
        response.headers["connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


def replay(body: bytes, receive: Receive) -> Receive:
    """The whole body as one message, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class ClientTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that is too slow to send a request head.

    Set `client_timeout` on a subclass (see `with_client_timeout`): uvicorn builds the
    protocol itself, from the class."""

    client_timeout: float = DEFAULT_CLIENT_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watch()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _watch_head(self) -> None:
        if not self._awaiting_head():
            self._stop_watch()
        elif self._head_timer is None and not self.transport.is_closing():
            # Armed once per request head, not per byte: trickling bytes does not extend it.
            self._head_timer = self.loop.call_later(self.client_timeout, self._head_too_slow)

    def _stop_watch(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.transport.close()


def with_client_timeout(seconds: float) -> type[ClientTimeoutH11]:
    """The protocol class for uvicorn.Config(http=...), closing slow request heads."""
    return type("ClientTimeoutH11", (ClientTimeoutH11,), {"client_timeout": seconds})


KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this (uvicorn's default)
MAX_HEAD_BYTES = 16 * 1024  # h11's own cap on a request head, stated rather than assumed


def server_limits(client_timeout: float) -> dict[str, Any]:
    """uvicorn.Config keywords: slow heads closed, idle connections closed, heads capped."""
    return {
        "http": with_client_timeout(client_timeout),
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
    }
