"""One node's models: what it holds (store, --model, bundled), their cards, manifests and
downloads. The node's API and report read it; the worker loads from `models`."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shoal.models.cards import ModelCard, card_for
from shoal.models.local import LocalModel, local_models
from shoal.models.manifest import Manifest, build_manifest
from shoal.models.store import ModelStore
from shoal.schema.report import DownloadState, StoreState

log = logging.getLogger(__name__)


class PullRefused(Exception):
    """A pull that cannot start (already running, bad id); the message says why."""


@dataclass
class Library:
    store: ModelStore
    cards: dict[str, ModelCard]
    configured: tuple[str, Path] | None = None  # --model, with the id clients use
    device: str = "cpu"
    quantize: str = "auto"  # how the torch engine holds weights: what they cost in memory
    offline: bool = False
    backends: tuple[str, ...] = ("gloo", "nccl")  # what this node can run (node_capabilities)
    models: dict[str, LocalModel] = field(default_factory=dict)  # held; updated in place
    _downloads: dict[str, DownloadState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def scan(self) -> dict[str, LocalModel]:
        """Read every held model's metadata again (after a download, say)."""
        return local_models(
            self.configured, self.device, self.store, self.cards, self.backends, self.quantize
        )

    def refresh(self) -> None:
        self._adopt(self.scan())

    def card(self, model_id: str) -> ModelCard:
        return card_for(self.cards, model_id)

    def location(self, model_id: str) -> Path | None:
        """What a manifest of this model lists here: held models first, then any store dir,
        partial ones included (an incomplete download is exactly what an audit must see)."""
        if (held := self.models.get(model_id)) is not None:
            return held.source or held.path
        stored = self.store.find(model_id)
        return stored.path if stored else None

    def manifest(self, model_id: str, hash: bool = False) -> Manifest | None:
        path = self.location(model_id)
        return build_manifest(model_id, path, hash=hash) if path is not None else None

    # -- downloads -----------------------------------------------------------------------

    def downloads(self) -> tuple[DownloadState, ...]:
        with self._lock:
            return tuple(self._downloads.values())

    def start_pull(
        self, model_id: str, include: Sequence[str] = (), revision: str = "main"
    ) -> DownloadState:
        """Download in a thread; progress shows in `downloads()`, and the model is served once
        complete. One pull per model at a time."""
        try:
            target = self.store.dir_for(model_id)
        except ValueError as exc:
            raise PullRefused(str(exc)) from None
        with self._lock:
            running = self._downloads.get(model_id)
            if running is not None and running.status == "downloading":
                raise PullRefused(f"{model_id} is already downloading on this node")
            state = DownloadState(model_id=model_id, started_at=time.time())
            self._downloads[model_id] = state
        loop = asyncio.get_running_loop()  # held models change on the loop the API reads on
        patterns = tuple(include) or self.card(model_id).include
        threading.Thread(
            target=self._pull,
            args=(model_id, target, patterns, revision, loop),
            name=f"pull-{model_id}",
            daemon=True,
        ).start()
        return state

    def _pull(
        self,
        model_id: str,
        target: Path,
        include: tuple[str, ...],
        revision: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        from shoal.models.download import PullError, pull

        def progress(state: DownloadState) -> None:
            with self._lock:
                self._downloads[model_id] = state

        try:
            pull(
                model_id,
                target,
                include=include,
                revision=revision,
                offline=self.offline,
                on_progress=progress,
            )
        except PullError as exc:
            self._finish(model_id, "failed", str(exc))
            return
        except Exception as exc:  # a bug must show in /state, not vanish with the thread
            log.exception("pull of %s failed", model_id)
            self._finish(model_id, "failed", f"{type(exc).__name__}: {exc}")
            return
        found = self.scan()
        loop.call_soon_threadsafe(self._adopt, found)
        self._finish(model_id, "done", None)

    def _adopt(self, found: dict[str, LocalModel]) -> None:
        for gone in self.models.keys() - found.keys():
            del self.models[gone]
        self.models.update(found)

    def _finish(self, model_id: str, status: str, error: str | None) -> None:
        with self._lock:
            state = self._downloads[model_id]
            self._downloads[model_id] = state.model_copy(
                update={"status": status, "error": error, "finished_at": time.time()}
            )
        if error:
            log.warning("pull of %s failed: %s", model_id, error)
        else:
            log.info("pulled %s into %s", model_id, self.store.dir_for(model_id))

    def state(self) -> StoreState:
        free = total = 0
        where = self.store.root
        while not where.exists() and where != where.parent:  # not created until a download
            where = where.parent
        try:
            usage = shutil.disk_usage(where)
            free, total = usage.free, usage.total
        except OSError:
            pass
        return StoreState(
            root=str(self.store.root),
            readonly=tuple(str(p) for p in self.store.readonly),
            disk_free=free,
            disk_total=total,
            downloads=self.downloads(),
        )
