"""Signed messages between shoal processes: one HMAC-SHA256 scheme over the cluster secret.

Every node-to-node HTTP request (report polls, goodbyes, forwarded plan changes, fan-out, the
token relay to a rank 0) carries four headers: the sender's node id, a timestamp, a random
nonce and the signature over method, path and query, the body's SHA-256, sender, timestamp and
nonce. The answer to a signed request is signed too, bound to that request's nonce, so a
report cannot be replayed to another poll. UDP probes sign their canonical JSON with `mac`.

A message is refused when its timestamp is outside the window (a replay of an old capture, or
a clock far off), when its nonce was seen within the window (a replay of a fresh one), or when
its signature does not match (another secret, or a message altered on the way). Pure: the
caller passes the clock and keeps the NonceCache.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from typing import Final

HEADER_NODE: Final = "x-shoal-node"
HEADER_TS: Final = "x-shoal-ts"
HEADER_NONCE: Final = "x-shoal-nonce"
HEADER_SIG: Final = "x-shoal-sig"
HEADERS: Final = (HEADER_NODE, HEADER_TS, HEADER_NONCE, HEADER_SIG)
WINDOW_S: Final = 30.0  # a message older or newer than this (by the receiver's clock) is stale
MAX_NONCES: Final = 100_000  # remembered within the window; only validly signed ones count
STREAMED: Final = "streamed"  # the body digest of an answer streamed after its headers

_TS = re.compile(r"\d{1,12}(\.\d{1,6})?")
_NONCE = re.compile(r"[0-9a-f]{16,64}")
_SIG = re.compile(r"[0-9a-f]{64}")
_NODE = re.compile(r"[!-~]{1,128}")  # printable ASCII without spaces: a node id, never text


class SignatureError(ValueError):
    """Why a message was refused: `code` for programs, the text for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def mac(secret: bytes, *parts: str | bytes) -> str:
    """HMAC-SHA256 (hex) over the parts, each length-prefixed so no two lists of parts sign
    alike."""
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(16)


def _request_mac(
    secret: bytes, method: str, target: str, digest: str, node: str, ts: str, nonce: str
) -> str:
    return mac(secret, "shoal-request-1", method.upper(), target, digest, node, ts, nonce)


def _response_mac(
    secret: bytes, request_nonce: str, status: int, digest: str, node: str, ts: str
) -> str:
    return mac(secret, "shoal-response-1", request_nonce, str(status), digest, node, ts)


def sign_request(
    secret: bytes,
    method: str,
    target: str,
    body: bytes,
    node: str,
    now: float,
    nonce: str | None = None,
) -> dict[str, str]:
    """The headers that sign one request; `target` is the path with its query ("/a?b=c")."""
    ts, nonce = f"{now:.3f}", nonce or new_nonce()
    sig = _request_mac(secret, method, target, body_digest(body), node, ts, nonce)
    return {HEADER_NODE: node, HEADER_TS: ts, HEADER_NONCE: nonce, HEADER_SIG: sig}


def sign_response(
    secret: bytes, request_nonce: str, status: int, body: bytes | None, node: str, now: float
) -> dict[str, str]:
    """The headers that sign an answer to a signed request; body None: streamed."""
    ts = f"{now:.3f}"
    digest = STREAMED if body is None else body_digest(body)
    sig = _response_mac(secret, request_nonce, status, digest, node, ts)
    return {HEADER_NODE: node, HEADER_TS: ts, HEADER_SIG: sig}


def _fields(headers: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    values = [headers.get(n) for n in names]
    if all(v is None for v in values):
        raise SignatureError("unsigned", "unsigned: the sender has no cluster secret")
    if any(v is None for v in values):
        raise SignatureError("malformed", "malformed signature headers: some are missing")
    return [v for v in values if v is not None]


def check_fresh(ts: str, now: float, window: float = WINDOW_S) -> None:
    """SignatureError unless the timestamp (seconds, as sent) is within the window of now."""
    if not _TS.fullmatch(ts):
        raise SignatureError("malformed", "malformed signature headers: bad timestamp")
    skew = float(ts) - now
    if skew < -window:
        raise SignatureError(
            "stale",
            f"stale: signed {-skew:.0f} s ago (window {window:.0f} s): a replay, or the "
            "sender's clock is behind; sync the clocks (NTP)",
        )
    if skew > window:
        raise SignatureError(
            "future",
            f"stale: signed {skew:.0f} s in the future (window {window:.0f} s): the sender's "
            "clock is ahead; sync the clocks (NTP)",
        )


def _bad_signature() -> SignatureError:
    return SignatureError(
        "bad_signature",
        "bad signature: the sender has another cluster secret, or the message was altered",
    )


class NonceCache:
    """Nonces seen recently, each until its message would be stale anyway; bounded (the
    oldest go first), and only validly signed messages are added, so only secret holders can
    fill it."""

    def __init__(self, max_entries: int = MAX_NONCES) -> None:
        self.max_entries = max_entries
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, nonce: str) -> bool:
        return nonce in self._expiry

    def add(self, nonce: str, expires: float, now: float) -> bool:
        """Remember a nonce; False if it is remembered already (a replay)."""
        while self._expiry:  # insertion order is expiry order within one window
            oldest, at = next(iter(self._expiry.items()))
            if at >= now and len(self._expiry) < self.max_entries:
                break
            del self._expiry[oldest]
        if nonce in self._expiry:
            return False
        self._expiry[nonce] = expires
        return True


def verify_request(
    secret: bytes,
    method: str,
    target: str,
    body: bytes,
    headers: Mapping[str, str],
    now: float,
    seen: NonceCache,
    window: float = WINDOW_S,
) -> str:
    """The sender's node id of a validly signed, fresh, first-seen request; SignatureError
    otherwise. `headers` is looked up by the lower-case names."""
    node, ts, nonce, sig = _fields(headers, HEADERS)
    if not (_NODE.fullmatch(node) and _NONCE.fullmatch(nonce) and _SIG.fullmatch(sig)):
        raise SignatureError("malformed", "malformed signature headers")
    check_fresh(ts, now, window)
    expected = _request_mac(secret, method, target, body_digest(body), node, ts, nonce)
    if not hmac.compare_digest(sig, expected):
        raise _bad_signature()
    if not seen.add(nonce, float(ts) + window, now):
        raise SignatureError("replayed", "replayed: this message was received before")
    return node


def verify_response(
    secret: bytes,
    request_nonce: str,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    now: float,
    window: float = WINDOW_S,
) -> str:
    """The answering node's id of an answer signed for the request with that nonce (fresh by
    construction: our nonce is new); SignatureError otherwise."""
    node, ts, sig = _fields(headers, (HEADER_NODE, HEADER_TS, HEADER_SIG))
    if not (_NODE.fullmatch(node) and _SIG.fullmatch(sig)):
        raise SignatureError("malformed", "malformed signature headers")
    check_fresh(ts, now, window)
    expected = _response_mac(secret, request_nonce, status, body_digest(body), node, ts)
    if not hmac.compare_digest(sig, expected):
        raise _bad_signature()
    return node
