"""A node's bounded history of crashes, failovers and degradations, kept across restarts.

One JSON object per line in `<data dir>/events.jsonl`, the newest `keep` of them. A marker file
written at start and removed at a clean stop tells the next start that the last run crashed.
An event is `{at, kind, message, ...}`; one recorded from a Reason (`record`) also carries the
reason as data (code, nodes, path, measured, facts) and its `parts` for the dashboard, with
`message` its one rendering (schema.reasons).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from shoal.schema.reasons import Reason, event_fields, reason, render

log = logging.getLogger(__name__)

KEEP = 200
QUIET_KINDS = ("recovered", "moved", "node_joined")  # good news is logged at info


class EventLog:
    def __init__(self, folder: Path, boot_id: str, keep: int = KEEP) -> None:
        self.path = folder / "events.jsonl"
        self.marker = folder / "running.json"
        self.boot_id = boot_id
        self.keep = keep
        self._lock = threading.Lock()
        self._events: deque[dict[str, Any]] = deque(maxlen=keep)
        folder.mkdir(parents=True, exist_ok=True)
        self._lines = 0  # lines in the file: compacted back to `keep` past twice that
        with contextlib.suppress(OSError):
            lines = self.path.read_text().splitlines()
            self._lines = len(lines)
            for line in lines[-keep:]:
                with contextlib.suppress(ValueError):
                    self._events.append(json.loads(line))

    def start(self) -> None:
        """Record a crash of the previous run, if it left its marker behind; set ours."""
        with contextlib.suppress(OSError, ValueError):
            last = json.loads(self.marker.read_text())
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("started", 0)))
            boot = str(last.get("boot_id", "?"))[:8]
            self.record("crash", reason("crash", boot=boot, started=started))
        self.marker.write_text(json.dumps({"boot_id": self.boot_id, "started": time.time()}))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.marker.unlink()

    def record(
        self, kind: str, why: Reason, names: dict[str, str] | None = None, **tags: Any
    ) -> dict[str, Any]:
        """An event saying `why`: its sentence (node names from `names` where it names them by
        name), the reason as data, and tags to find it by (node=, instance=, model=)."""
        return self.add(kind, render(why, names), **event_fields(why), **tags)

    def add(self, kind: str, message: str, **fields: Any) -> dict[str, Any]:
        event = {"at": time.time(), "kind": kind, "message": message, **fields}
        level = logging.INFO if kind in QUIET_KINDS else logging.WARNING
        log.log(level, "%s: %s", kind, message)
        with self._lock:
            self._events.append(event)
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(event) + "\n")
                self._lines += 1
                if self._lines > 2 * self.keep:  # compact now and then
                    self.path.write_text("".join(json.dumps(e) + "\n" for e in self._events))
                    self._lines = len(self._events)
            except OSError as exc:
                log.debug("cannot write %s: %s", self.path, exc)
        return event

    def recent(self, n: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)[-n:]

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for e in self._events:
                out[e["kind"]] = out.get(e["kind"], 0) + 1
            return out


def merge_history(by_node: dict[str, Any], limit: int = KEEP) -> list[dict[str, Any]]:
    """Several nodes' recent events as one history, oldest first, each marked with the node
    that recorded it. Peers' lists are network data: anything that is not an event with a
    time, a kind and a message is dropped with a log line."""
    merged = []
    for node_id, events in by_node.items():
        for event in events if isinstance(events, list) else [events]:
            if not _is_event(event):
                log.warning("dropped a malformed event from %s: %.200r", node_id, event)
                continue
            merged.append({**event, "recorded_by": node_id})
    merged.sort(key=lambda e: (e["at"], e["recorded_by"]))
    return merged[-limit:]


def _is_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and isinstance(event.get("at"), int | float)
        and isinstance(event.get("kind"), str)
        and isinstance(event.get("message"), str)
    )
