"""The receiving side of signed node-to-node calls (shoal.web.signing), as ASGI middleware:
the node's API and each rank 0's generation endpoint put it in front of their routes.

With a cluster secret: a request carrying signature headers is verified (method, path and
query, body, sender, freshness, nonce) or refused with 401; a valid one is marked
`request.state.peer_signed = True` (and `peer_node`), for the API-key check to let it through,
and its answer is signed back, bound to the request's nonce. An unsigned request to a
peer-only route is refused with 401 (on a rank 0's endpoint every route is peer-only: only
the node's relay calls it); other routes are left to their own checks. Without a
secret nothing is checked or marked. A refusal is logged once a minute per sender and reason,
never with the secret.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.web.errors import ApiError
from shoal.web.limits import replay
from shoal.web.signing import (
    HEADER_NODE,
    HEADER_NONCE,
    HEADER_SIG,
    NonceCache,
    SignatureError,
    sign_response,
    verify_request,
)

log = logging.getLogger(__name__)

MAX_SIGNED_BODY: Final = 32 * 1024 * 1024  # a signed body is read whole before it is verified
LOG_EVERY_S: Final = 60.0
_LOGGED_KEPT: Final = 256


class SignedPeers:
    def __init__(
        self,
        app: ASGIApp,
        secret: bytes | None,
        node_id: str,
        peer_only: Collection[str] | None = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """peer_only: the paths only peers call; None: every path."""
        self.app = app
        self.secret = secret
        self.node_id = node_id
        self.peer_only = None if peer_only is None else frozenset(peer_only)
        self.clock = clock
        self.nonces = NonceCache()
        self._logged: dict[tuple[str, str], float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.secret is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if HEADER_SIG not in headers and HEADER_NONCE not in headers:
            if self.peer_only is None or scope["path"] in self.peer_only:
                why = SignatureError(
                    "unsigned", "unsigned: this route answers cluster peers only, and this "
                    "node has a cluster secret; give the caller the same --cluster-secret",
                )  # fmt: skip
                await self._refuse(scope, send, headers, why)
                return
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive, MAX_SIGNED_BODY)
        if body is None:
            error = ApiError(413, f"A signed request body is over {MAX_SIGNED_BODY} bytes.")
            await error.response()(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        target = scope.get("raw_path") or scope["path"].encode()
        target = (target + b"?" + query if query else target).decode("latin-1")
        try:
            node = verify_request(
                self.secret, scope["method"], target, body, headers, self.clock(), self.nonces
            )
        except SignatureError as why:
            await self._refuse(scope, send, headers, why)
            return
        state = scope.setdefault("state", {})
        state["peer_signed"], state["peer_node"] = True, node
        await self.app(scope, replay(body, receive), self._signing(send, headers[HEADER_NONCE]))

    def _signing(self, send: Send, nonce: str) -> Send:
        """Sign the answer: its headers wait for the first body message, which holds the whole
        body unless the answer streams (then signed as streamed)."""
        start: Message | None = None
        assert self.secret is not None
        secret = self.secret

        async def signed_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] == "http.response.body" and start is not None:
                whole = not message.get("more_body", False)
                body = message.get("body", b"") if whole else None
                added = sign_response(secret, nonce, start["status"], body, self.node_id,
                                      self.clock())  # fmt: skip
                extra = [(k.encode(), v.encode()) for k, v in added.items()]
                await send({**start, "headers": [*start.get("headers", []), *extra]})
                start = None
            await send(message)

        return signed_send

    async def _refuse(
        self, scope: Scope, send: Send, headers: dict[str, str], why: SignatureError
    ) -> None:
        client = scope.get("client")
        sender = headers.get(HEADER_NODE, "")[:64] or "no node id"
        where = f"{client[0]}" if client else "an unknown address"
        self._log_once(f"{sender} at {where}", why)
        error = ApiError(401, f"Refused by node {self.node_id}: {why}.", code=f"peer_{why.code}")
        response = error.response()
        response.headers[HEADER_NODE] = self.node_id

        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, no_body, send)

    def _log_once(self, sender: str, why: SignatureError) -> None:
        now = time.monotonic()
        key = (sender, why.code)
        if now - self._logged.get(key, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        self._logged[key] = now
        if len(self._logged) > _LOGGED_KEPT:
            self._logged.pop(next(iter(self._logged)))
        log.warning("refused a peer call from %s: %s", sender, why)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None past `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
