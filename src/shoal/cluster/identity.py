"""Who this node is: a node id that survives restarts, a friendly name, and a boot id.

The node id lives in `<data dir>/node.json` so a restarted machine is the same node (exo makes a
new id per start, so a restart looks like a stranger joining). The boot id is new per process
start: together with `boot_started` it orders reports across restarts of the same node.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from shoal.config import StartupError

NODE_FILE = "node.json"
NODE_FILE_FORMAT = 1
NODE_ID_HEX_CHARS = 16  # 64 random bits: no collision in any plausible cluster, still readable
_NODE_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")  # URL-safe: it appears in API paths


class IdentityError(StartupError):
    """node.json is unreadable or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    name: str
    boot_id: str  # fresh per process start
    boot_started: float  # unix time this process started
    joined_at: float  # unix time this node id first started (persisted): leader tiebreak


def new_node_id() -> str:
    return uuid.uuid4().hex[:NODE_ID_HEX_CHARS]


def default_name() -> str:
    """The hostname without its domain ("mac-studio.local" -> "mac-studio")."""
    return socket.gethostname().split(".")[0].strip() or "shoal-node"


def load_identity(
    data_dir: Path, name: str | None = None, *, now: float | None = None
) -> NodeIdentity:
    """This process's identity; creates `data_dir/node.json` on the very first start.

    `now` is the process start time (tests pass a fixed one).
    """
    started = time.time() if now is None else now
    path = Path(data_dir) / NODE_FILE
    if path.exists():
        node_id, joined_at = _read_node_file(path)
    else:
        node_id, joined_at = new_node_id(), started
        _write_node_file(path, node_id, joined_at)
    return NodeIdentity(
        node_id=node_id,
        name=(name or "").strip() or default_name(),
        boot_id=uuid.uuid4().hex,
        boot_started=started,
        joined_at=joined_at,
    )


def _read_node_file(path: Path) -> tuple[str, float]:
    fix = (
        f"fix it, or delete {path} to start as a new node (this node gets a new id and the "
        "cluster forgets the old one)"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IdentityError(f"cannot read node identity {path}: {exc}; {fix}") from exc
    if not isinstance(data, dict):
        raise IdentityError(f"node identity {path} is not a JSON object; {fix}")
    node_id, joined_at = data.get("node_id"), data.get("joined_at")
    if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
        raise IdentityError(
            f"node identity {path} has no valid node_id (8-64 of A-Z a-z 0-9 _ -): "
            f"{node_id!r}; {fix}"
        )
    # bool is an int subclass; a joined_at of true is corruption, not a timestamp
    if isinstance(joined_at, bool) or not isinstance(joined_at, int | float) or joined_at <= 0:
        raise IdentityError(f"node identity {path} has no valid joined_at: {joined_at!r}; {fix}")
    return node_id, float(joined_at)


def _write_node_file(path: Path, node_id: str, joined_at: float) -> None:
    """Write temp + rename, so a crash mid-write never leaves a half file behind."""
    body = json.dumps(
        {"format": NODE_FILE_FORMAT, "node_id": node_id, "joined_at": joined_at}, indent=2
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".node-", suffix=".json.tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(body + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise IdentityError(
            f"cannot create node identity {path}: {exc}; make {path.parent} writable or point "
            "SHOAL_HOME / XDG_DATA_HOME at a writable directory"
        ) from exc
