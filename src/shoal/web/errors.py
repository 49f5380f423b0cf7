"""OpenAI-style errors: every 4xx/5xx body is `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


RETRY_AFTER_S = 2  # a 503 says when to try again: a move, a load or a stop takes seconds


class ApiError(Exception):
    """An error the client gets back as-is. A 503 carries `Retry-After` (RETRY_AFTER_S unless
    retry_after says otherwise), so clients that retry (the openai package does) wait that."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after = RETRY_AFTER_S if retry_after is None and status == 503 else retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def field_path(loc: Sequence[str | int]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def from_validation(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        detail = err.get("ctx", {}).get("error", "decode error")
        return invalid_request(f"The request body is not valid JSON ({detail}).")
    param = field_path(err["loc"])
    if param is None:
        if err["type"] == "missing":
            return invalid_request("The request needs a JSON body.")
        # A str input here means the body was not parsed as JSON (no Content-Type header).
        return invalid_request(
            "The request body must be a JSON object, sent with 'Content-Type: application/json'."
        )
    return invalid_request(f"Invalid '{param}': {err['msg']}.", param=param)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return from_validation(exc).response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # Unknown routes (404) and wrong methods (405) get the same body shape as everything else.
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    error = ApiError(exc.status_code, message, code=code)
    response = error.response()
    if exc.headers:
        response.headers.update(exc.headers)
    return response


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    RequestValidationError: _validation_error,
    HTTPException: _http_error,
}


class CatchUnexpected:
    """ASGI middleware: an exception nobody handled becomes a logged 500 with the OpenAI body.

    Starlette's own ServerErrorMiddleware re-raises after answering, which logs a second
    traceback from the server; this keeps it to one log line with the request named.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            if started:  # headers are out: all we can do is end the response
                return
            error = ApiError(500, f"Internal server error ({type(exc).__name__}: {exc}).")
            await error.response()(scope, receive, send)
