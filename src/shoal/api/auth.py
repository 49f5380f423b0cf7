"""API keys (`--api-key`, `--api-key-file`): with one set, every route but `/health` (and the
dashboard's page and static files, so the page can ask for the key) needs
`Authorization: Bearer <key>` or `x-api-key: <key>`.

The decision is pure functions (`credentials`, `allowed`, `refusal`); `ApiKeyAuth` is the
thin ASGI shell. A request the cluster-secret middleware verified (`scope["state"]
["peer_signed"]`) passes without a key: that is how peers reach each other's routes. A
refusal is a 401 in the shape of the API the path belongs to (OpenAI, Anthropic, Ollama),
with `WWW-Authenticate: Bearer`. No key is ever logged or echoed back.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.api.anthropic_translate import AnthropicError
from shoal.config import RunSettings, StartupError
from shoal.schema.address import is_loopback
from shoal.web.errors import ApiError

log = logging.getLogger(__name__)

OPEN_PATHS: Final = frozenset({"/health", "/"})  # the dashboard page asks for the key itself
OPEN_PREFIXES: Final = ("/dashboard/",)  # its static files: no data in them
OLLAMA_PREFIXES: Final = ("/api/", "/ollama/api/")
HINT: Final = (
    "send 'Authorization: Bearer <key>' or 'x-api-key: <key>' with a key this node was "
    "started with (shoal run --api-key, env SHOAL_API_KEY)"
)


# ---- keys ------------------------------------------------------------------------------------


def parse_keys(text: str, separator: str = ",") -> tuple[str, ...]:
    """'k1, k2' (or a file's lines with separator '\\n', '#' comments) -> its keys.
    StartupError for a key an HTTP header cannot carry."""
    keys = []
    for raw in text.split(separator):
        key = raw.strip()
        if not key or key.startswith("#"):
            continue
        if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
            raise StartupError(
                "an API key must be printable ASCII without spaces (it travels in an HTTP "
                "header); fix --api-key / SHOAL_API_KEY or the --api-key-file"
            )
        keys.append(key)
    return tuple(dict.fromkeys(keys))


def api_keys(settings: RunSettings) -> tuple[str, ...]:
    """Every key this node accepts: --api-key's, then --api-key-file's lines."""
    keys = parse_keys(settings.api_key)
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise StartupError(
                f"--api-key-file {path}: {exc.strerror}; pass a readable file with one key a line"
            ) from None
        keys += parse_keys(text, "\n")
        if not keys:
            raise StartupError(f"--api-key-file {path} holds no key: write one key a line")
    return tuple(dict.fromkeys(keys))


def open_api_warning(host: str, keys: tuple[str, ...]) -> str | None:
    """The one startup line for an API reachable from other machines with no key."""
    if keys or _loopback(host):
        return None
    return (
        f"the API on --host {host or '0.0.0.0'} is open to anyone who can reach it: set a key "
        "with --api-key (env SHOAL_API_KEY) or --api-key-file, or listen on --host 127.0.0.1"
    )


def _loopback(host: str) -> bool:
    return host == "localhost" or is_loopback(host.strip("[]"))  # not '0.0.0.0'


# ---- the decision ----------------------------------------------------------------------------


def credentials(headers: Mapping[str, str]) -> list[str]:
    """The keys a request presents: its Bearer token and its x-api-key header."""
    found = []
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        found.append(token.strip())
    if key := headers.get("x-api-key", "").strip():
        found.append(key)
    return found


def key_matches(presented: Iterable[str], keys: Iterable[str]) -> bool:
    """Constant-time per comparison; every pair is compared, so timing says nothing of which."""
    match = False
    for given in presented:
        for key in keys:
            match |= hmac.compare_digest(given.encode(), key.encode())
    return match


def exempt(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def allowed(
    path: str, headers: Mapping[str, str], keys: tuple[str, ...], peer_signed: bool = False
) -> bool:
    """May this request through? Yes without keys, for an open path, for a request the
    cluster secret signed, or with one of the keys."""
    if not keys or exempt(path) or peer_signed:
        return True
    return key_matches(credentials(headers), keys)


def refusal(path: str, headers: Mapping[str, str]) -> JSONResponse:
    """The 401 in the shape of the API the path belongs to."""
    given = bool(credentials(headers))
    what = "the API key is not one this node accepts" if given else "this node needs an API key"
    message = f"{what}: {HINT}"
    if path.startswith(OLLAMA_PREFIXES):
        response = JSONResponse({"error": message}, status_code=401)
    elif path.startswith("/v1/messages"):
        response = AnthropicError(401, message).response()
    else:
        code = "invalid_api_key" if given else "missing_api_key"
        response = ApiError(401, message, code=code).response()
    response.headers["WWW-Authenticate"] = 'Bearer realm="shoal"'
    return response


# ---- the shell -------------------------------------------------------------------------------


class ApiKeyAuth:
    """ASGI middleware: refuses a request `allowed` says no to, before any route reads it."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys:  # shoal serves no websocket
            await self.app(scope, receive, send)
            return
        path, headers = scope["path"], Headers(scope=scope)
        state: Any = scope.get("state") or {}
        peer_signed = bool(state.get("peer_signed", False))  # set by the cluster-secret check
        if allowed(path, headers, self.keys, peer_signed):
            await self.app(scope, receive, send)
            return
        await refusal(path, headers)(scope, receive, send)


def install(app: Any, settings: RunSettings | None, keys: tuple[str, ...] | None = None) -> None:
    """Add the key check to the app (a no-op without keys), and say so once if the API is
    open beyond this machine. `keys`: the node's, already read (else read from settings)."""
    if settings is None:
        return
    keys = api_keys(settings) if keys is None else keys
    if warning := open_api_warning(settings.host, keys):
        log.warning(warning)
    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys)
