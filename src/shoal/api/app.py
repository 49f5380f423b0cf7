"""The HTTP API of one node: app factory, error handling and health."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from shoal import __version__
from shoal.api import (
    anthropic,
    auth,
    cluster,
    dashboard,
    exo,
    instances,
    limits,
    metrics,
    models,
    ollama,
    openai,
    responses,
)
from shoal.api.host import ModelHost
from shoal.schema.limits import DEFAULT_CLIENT_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from shoal.web.errors import EXCEPTION_HANDLERS, ApiError, CatchUnexpected
from shoal.web.limits import BodyLimit
from shoal.web.signed import SignedPeers

PEER_ONLY = ("/cluster/report", "/cluster/goodbye")  # routes only peers call


def create_app(host: ModelHost) -> FastAPI:
    app = FastAPI(title="shoal", version=__version__, exception_handlers=EXCEPTION_HANDLERS)
    app.state.host = host
    app.add_middleware(CatchUnexpected)
    settings = getattr(host, "settings", None)
    # inside CORS: a preflight needs no key, a 401 gets CORS headers
    auth.install(app, settings, getattr(host, "api_keys", None))
    origins = getattr(settings, "cors_origin_list", ())
    if origins:  # off unless --cors-origins (SHOAL_CORS_ORIGINS) names the browser origins
        app.add_middleware(
            CORSMiddleware, allow_origins=list(origins), allow_methods=["*"], allow_headers=["*"]
        )
    # Outside auth and CORS, so every check inside sees request.state.peer_signed.
    secret = getattr(getattr(host, "cluster_settings", None), "secret", None)
    node_id = getattr(getattr(host, "identity", None), "node_id", "")
    app.add_middleware(SignedPeers, secret=secret, node_id=node_id, peer_only=PEER_ONLY)
    # Outside even that: every body, signed or not, arrives whole within --client-timeout and
    # under --max-body-bytes before anything reads it (413/408 in the route's shape).
    app.add_middleware(
        BodyLimit,
        max_bytes=getattr(settings, "max_body_bytes", DEFAULT_MAX_BODY_BYTES),
        timeout_s=getattr(settings, "client_timeout", DEFAULT_CLIENT_TIMEOUT_S),
        render=limits.refusal,
    )
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(ollama.router, prefix="/api")
    app.include_router(ollama.router, prefix="/ollama/api")
    app.include_router(cluster.router)
    app.include_router(instances.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(exo.router)
    app.include_router(dashboard.router)
    app.mount("/dashboard", dashboard.static_files(), name="dashboard")

    @app.get("/health", response_model=None)
    async def health() -> JSONResponse:
        # Serving truth is a completed request: ready only after the warm-up generation.
        if not host.ready:
            raise ApiError(503, host.not_ready_reason, code="not_ready", type="service_unavailable")
        return JSONResponse({"status": "ok"})

    return app
