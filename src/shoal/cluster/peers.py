"""One node's client for everything node-to-node: report polls, goodbyes, leader forwarding,
the token relay, manifest and history fan-out.

One pooled httpx.AsyncClient (connections to a peer are kept and reused, never one client per
request), and per peer every address it may be reached at, ranked the way placement ranks paths
(placement.addressing: measured usable, RTT, interface kind, preferred subnet, address class)
from this node's own probe records, never "the first address that answered" (seed 002). The
address that answered last only breaks ties between equally ranked ones, e.g. before any probe
has been answered. An address a call just failed on goes last at once, until it answers again
(a poll, or a probe reply newer than the failure): a cut cable costs one timeout, not one per
call until the prober's verdict.

Relayed generations use a second pool without keep-alive: each opens its own connection, so a
black-holed path fails at connect (a clean 503) instead of hanging on a dead kept-alive socket.

Both pools authenticate every call the same way (`peer_auth`): with a cluster secret each
request is signed (shoal.web.signing, checked by shoal.web.signed on the other side); without
one, on a node with an API key, calls carry that key, so a keyed cluster still talks.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Final

import httpx

from shoal.placement.addressing import PathOption, options_to, rank_key
from shoal.schema.address import base_url
from shoal.schema.report import PathStats
from shoal.web.signing import HEADER_NONCE, SignatureError, sign_request, verify_response

# Polls and goodbyes must be quick; a call that waits on a model (a relayed answer, a hashing
# manifest) passes its own timeout.
DEFAULT_TIMEOUT: Final = httpx.Timeout(1.0, connect=0.5)
POOL_LIMITS: Final = httpx.Limits(max_connections=256, max_keepalive_connections=32)
RELAY_LIMITS: Final = httpx.Limits(max_connections=256, max_keepalive_connections=0)
RELAY_TIMEOUT: Final = httpx.Timeout(None, connect=5.0)  # an answer takes as long as it takes
# ...but not on a dead path: a relayed answer waits without a byte for as long as a generation
# takes, so TCP keep-alive probes (answered by the peer's kernel, busy or not) find a cut cable
# or a vanished host 2 s + 3 x 1 s after the last byte, and the relay ends with a clean 503.
RELAY_KEEPALIVE: Final = (2, 1, 3)  # idle s, then a probe every s, this many unanswered


def relay_socket_options() -> list[tuple[int, int, int]]:
    """SO_KEEPALIVE and its timings, under the names this OS has (macOS: TCP_KEEPALIVE)."""
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
    names = (idle, getattr(socket, "TCP_KEEPINTVL", None), getattr(socket, "TCP_KEEPCNT", None))
    tcp = [(socket.IPPROTO_TCP, n, v) for n, v in zip(names, RELAY_KEEPALIVE, strict=True) if n]
    return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), *tcp]


Address = tuple[str, int]  # host (no brackets), port


def rank_addresses(
    known: Iterable[Address],
    peer_id: str,
    links: Sequence[PathStats],
    now: float,
    answered: Address | None = None,
    failed: Mapping[Address, float] | None = None,
) -> list[Address]:
    """The known addresses of a peer, best first: an address whose last call failed after its
    last probe reply goes last; then placement's path ranking over this node's outbound
    records to it; the address that answered last breaks ties; then by address."""
    measured = {o.peer_addr: o for o in options_to(peer_id, links)}
    failed = failed or {}

    def key(address: Address) -> tuple[Any, ...]:
        option = measured.get(address[0], PathOption(peer_addr=address[0]))
        failing = failed.get(address, -math.inf) > (option.last_success or -math.inf)
        return (failing, *rank_key(option, now), address != answered, address)

    return sorted(set(known), key=key)


class SignedAuth(httpx.Auth):
    """Signs every request with the cluster secret as this node (the body is read first)."""

    requires_request_body = True

    def __init__(self, secret: bytes, node_id: str, clock: Callable[[], float] = time.time):
        self._secret, self.node_id, self._clock = secret, node_id, clock

    def __repr__(self) -> str:  # never the secret
        return f"SignedAuth(node_id={self.node_id!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        target = request.url.raw_path.decode("latin-1")
        signed = sign_request(self._secret, request.method, target, request.content,
                              self.node_id, self._clock())  # fmt: skip
        request.headers.update(signed)
        yield request

    def verify(self, response: httpx.Response, body: bytes | None = None) -> str:
        """The node id that signed this answer to one of our signed requests (its body: read,
        or given when streamed in); SignatureError if it is not signed with our secret."""
        nonce = response.request.headers.get(HEADER_NONCE, "")
        if not nonce:
            raise SignatureError("unsigned", "the request was not signed")
        content = response.content if body is None else body
        return verify_response(self._secret, nonce, response.status_code, content,
                               response.headers, self._clock())  # fmt: skip


class BearerAuth(httpx.Auth):
    """Calls carry this node's API key (a keyed cluster without a secret)."""

    def __init__(self, key: str) -> None:
        self._key = key

    def __repr__(self) -> str:  # never the key
        return "BearerAuth()"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.setdefault("Authorization", f"Bearer {self._key}")
        yield request


def first_key(api_key: object) -> str | None:
    """The first of the node's API keys: a comma-separated string or a sequence of them."""
    if isinstance(api_key, str):
        keys = api_key.split(",")
    elif isinstance(api_key, (list, tuple)):
        keys = [str(k) for k in api_key]
    else:
        return None
    return next((k.strip() for k in keys if k.strip()), None)


def peer_auth(secret: bytes | None, node_id: str, api_key: object = None) -> httpx.Auth | None:
    """How this node's calls to peers and runners authenticate: signed with the cluster secret,
    else with its first API key, else not at all."""
    if secret:
        return SignedAuth(secret, node_id)
    key = first_key(api_key)
    return BearerAuth(key) if key else None


class PeerUnknown(Exception):
    """No address is known for the node."""

    def __init__(self, node_id: str) -> None:
        super().__init__(f"no known address for node {node_id}")
        self.node_id = node_id


class PeerClient:
    """Where each peer is reached, and the one pool every call to a peer goes through."""

    def __init__(
        self,
        links: Callable[[], Sequence[PathStats]],
        clock: Callable[[], float] = time.time,
        auth: httpx.Auth | None = None,
    ) -> None:
        self.auth = auth
        self._links = links  # this node's own path records (the prober's snapshot)
        self._clock = clock
        self._known: dict[str, set[Address]] = {}
        self._answered: dict[str, Address] = {}
        self._failed: dict[Address, float] = {}  # address -> when a call to it last failed
        self.http = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, limits=POOL_LIMITS, auth=auth)
        relaying = httpx.AsyncHTTPTransport(
            limits=RELAY_LIMITS, socket_options=relay_socket_options()
        )
        self.relay = httpx.AsyncClient(timeout=RELAY_TIMEOUT, transport=relaying, auth=auth)

    @property
    def signed(self) -> bool:
        return isinstance(self.auth, SignedAuth)

    def verify(self, response: httpx.Response, body: bytes | None = None) -> str | None:
        """Who signed an answer (read, or its streamed `body`): None when this node has no
        secret (nothing to check); SignatureError when it has one and the answer is not
        signed with it."""
        if not isinstance(self.auth, SignedAuth):
            return None
        return self.auth.verify(response, body)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.relay.aclose()

    # -- addresses -----------------------------------------------------------------------

    def learn(self, node_id: str, addresses: Iterable[Address]) -> None:
        self._known.setdefault(node_id, set()).update(addresses)

    def answered(self, node_id: str, address: Address) -> None:
        """That address answered as that node (a report poll): a tiebreak, not a ranking."""
        self.learn(node_id, [address])
        self._answered[node_id] = address
        self._failed.pop(address, None)

    def failed(self, address: Address) -> None:
        """A call to that address failed: it goes last until it answers again."""
        self._failed[address] = self._clock()

    def peers(self) -> list[str]:
        return sorted(self._known)

    def hosts(self, node_id: str) -> list[str]:
        return sorted({host for host, _ in self._known.get(node_id, ())})

    def addresses(self, node_id: str) -> list[Address]:
        """Every known address of the peer, best first."""
        known = self._known.get(node_id, ())
        answered = self._answered.get(node_id)
        return rank_addresses(known, node_id, self._links(), self._clock(), answered, self._failed)

    def best(self, node_id: str) -> Address | None:
        ranked = self.addresses(node_id)
        return ranked[0] if ranked else None

    def url(self, node_id: str, path: str = "") -> str:
        best = self.best(node_id)
        if best is None:
            raise PeerUnknown(node_id)
        return base_url(*best) + path

    # -- calls ---------------------------------------------------------------------------

    async def request(self, node_id: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call to the node at its best address; httpx errors pass through (and demote
        that address)."""
        address = self.best(node_id)
        if address is None:
            raise PeerUnknown(node_id)
        try:
            return await self.http.request(method, base_url(*address) + path, **kwargs)
        except httpx.TransportError:
            self.failed(address)
            raise

    async def get(self, node_id: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request(node_id, "GET", path, **kwargs)

    async def post(self, node_id: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request(node_id, "POST", path, **kwargs)
