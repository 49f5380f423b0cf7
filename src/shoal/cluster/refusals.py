"""Why a polled peer is refused when the cluster secret (or an API key) stands between us: the
sentence for the view's `refused` list, from what its answer said. Pure: the poll loop passes
the answer's parts in."""

from __future__ import annotations

import json
from collections.abc import Mapping

from shoal.web.signing import HEADER_NODE, SignatureError

MAX_REASON_CHARS = 300  # a peer's own words are cut here: it is not ours to print at length
_FIX = "give every node the same --cluster-secret (or SHOAL_CLUSTER_SECRET)"


def unsigned_answer(why: SignatureError) -> str:
    """The reason for a report that did not come signed with our secret."""
    if why.code == "unsigned":
        return f"its answers are not signed: it has no cluster secret; {_FIX}"
    if why.code == "bad_signature":
        return f"its answers are signed with another cluster secret (or altered); {_FIX}"
    return f"its answer was refused: {why}"


def refused_poll(status: int, body: bytes, headers: Mapping[str, str]) -> tuple[str | None, str]:
    """(the node id the refusal names, if any; the reason) for a 401/403 answer to our poll:
    e.g. it has a cluster secret and we have none or another, or it wants an API key."""
    node = headers.get(HEADER_NODE) or None
    try:
        error = json.loads(body)["error"]
        said = f"{error.get('message') or ''}".strip()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        said = ""
    said = said[:MAX_REASON_CHARS] or f"HTTP {status}"
    if node is not None and len(node) > 128:
        node = None
    return node, f"it refused our poll with HTTP {status}: {said}"
