"""The node API's limits as each API shape answers them: a refusal of the body limit
(web.limits.BodyLimit) in the error shape of the route it was meant for, and the rate limit
on the routes peers call (GET /cluster/report, POST /cluster/goodbye), keyed by the caller's
address and logged once per interval per caller."""

from __future__ import annotations

import logging
import time

from fastapi import Request
from fastapi.responses import JSONResponse

from shoal.api.anthropic_translate import AnthropicError
from shoal.cluster.ratelimit import RateLimiter
from shoal.web.errors import ApiError

log = logging.getLogger(__name__)

# A peer polls /cluster/report about once a second; nodes sharing one address (a host running
# several, NAT) and the tools share a source's bucket, so it is generous.
PEER_RATE_PER_S = 50.0
PEER_BURST = 200.0
OLLAMA_PREFIXES = ("/api/", "/ollama/api/")
ANTHROPIC_PREFIX = "/v1/messages"


def refusal(path: str, status: int, message: str, code: str) -> JSONResponse:
    """A refusal before the route ran, in the shape of the API the path belongs to."""
    if path.startswith(OLLAMA_PREFIXES):
        return JSONResponse({"error": message}, status_code=status)
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return AnthropicError(status, message).response()
    return ApiError(status, message, code=code).response()


def peer_limiter(request: Request) -> RateLimiter:
    state = request.app.state
    if not hasattr(state, "peer_limiter"):  # one per node's app
        state.peer_limiter = RateLimiter(PEER_RATE_PER_S, PEER_BURST)
    return state.peer_limiter


def peer_refusal(request: Request) -> JSONResponse | None:
    """None when the caller is within its rate; else the 429 to answer (logged once an
    interval per caller, with how many were refused since the last line)."""
    source = request.client.host if request.client else "unknown"
    limiter = peer_limiter(request)
    verdict = limiter.allow(source, time.monotonic())
    if verdict.allowed:
        return None
    if verdict.log_dropped:
        log.warning(
            "peer %s over %g calls/s on the cluster routes: %d refused (429) since the last line",
            source,
            limiter.rate,
            verdict.log_dropped,
        )
    error = ApiError(
        429,
        f"Too many cluster calls from {source}: at most {limiter.rate:g}/s; slow down.",
        code="rate_limited",
        type="rate_limit_error",
    )
    response = error.response()
    response.headers["retry-after"] = "1"
    return response
