"""Pull a model from the Hugging Face Hub into a dir of the store, resumably.

huggingface_hub 2.4 lists the repo and fetches each file, but `hf_hub_download` streams into a
process-unique temp file that it deletes on any failure, so an interrupted pull of a 10 GB shard
starts over. Here huggingface_hub still does the talking (repo info, tree listing, the HEAD that
gives a file's ETag, the ranged GET with its in-process retries), while the partial file is ours:
`<dir>/.cache/huggingface/download/<hash>.<etag>.incomplete`, named by content, so the next pull
appends to it with a `Range` request. Finished files get huggingface_hub's own local-dir metadata,
so a dir pulled here and one from `hf download --local-dir` are interchangeable.

Files go over plain HTTP (`/resolve` and its redirect), never through hf_xet: resuming needs a
byte stream to append to the partial.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub._local_folder import (
    get_local_download_paths,
    read_download_metadata,
    write_download_metadata,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import WeakFileLock, build_hf_headers, filter_repo_objects

from shoal.models.manifest import is_partial
from shoal.models.store import looks_like_model
from shoal.schema.report import DownloadState

DEFAULT_ENDPOINT = "https://huggingface.co"
PROGRESS_INTERVAL_S = 0.1  # on_progress at most ~10 times a second, plus the final call
RESUME_HINT = "run the same command again to resume"


class PullError(Exception):
    """A pull that cannot go on; the message says what happened and what to do next."""


ProgressCallback = Callable[[DownloadState], None]


def pull(
    model_id: str,
    target_dir: Path | str,
    *,
    include: Sequence[str] = (),
    revision: str = "main",
    offline: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Download `model_id` at `revision` into `target_dir` (only files matching `include` globs,
    when given) and return the dir; files already there at that commit are kept.

    `offline` never touches the network: it returns the dir if it holds a complete model.
    `endpoint` defaults to env HF_ENDPOINT, read now (huggingface_hub reads it once, at import);
    `token` to huggingface_hub's own lookup (HF_TOKEN, then `hf auth login`'s file).
    `on_progress` gets a `DownloadState` as bytes arrive, throttled, and always a last one
    (status done or failed). Every expected failure is a `PullError`.
    """
    target = Path(target_dir)
    if offline:
        return stored_model(model_id, target)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    tracker = _Tracker(model_id, on_progress)
    try:
        commit, files = _list_files(model_id, revision, include, endpoint, token)
        tracker.start(files)
        target.mkdir(parents=True, exist_ok=True)
        _check_free_space(model_id, target, files)
        for file in files:
            _fetch(model_id, file, commit, target, endpoint, token, tracker)
    except BaseException as exc:
        error = _explain(exc, model_id, revision, endpoint, target, tracker)
        tracker.finish(error=str(error or exc) or type(exc).__name__)
        if error is None or error is exc:
            raise
        raise error from exc
    tracker.finish()
    return target


def stored_model(model_id: str, target: Path) -> Path:
    """The model dir if it holds a complete model (no partial download anywhere under it)."""
    partials = target.is_dir() and any(is_partial(p.name) for p in target.rglob("*"))
    if looks_like_model(target) and not partials:
        return target
    state = "only partly downloaded" if partials else "not in the store"
    raise PullError(
        f"{model_id} is {state} at {target} and offline mode is on: run without --offline "
        "(and unset SHOAL_OFFLINE) to download it, or copy its files there"
    )


# ---- the steps -------------------------------------------------------------------------------


def _list_files(
    model_id: str, revision: str, include: Sequence[str], endpoint: str, token: str | None
) -> tuple[str, list[RepoFile]]:
    """The commit `revision` points at, and the files to fetch (as snapshot_download lists them:
    repo info for the commit, then the recursive tree at that commit)."""
    api = HfApi(endpoint=endpoint, token=token, library_name="shoal")
    commit = api.model_info(model_id, revision=revision).sha
    if commit is None:
        raise PullError(f"{endpoint} gave no commit for {model_id}@{revision}: is it a Hub?")
    tree = api.list_repo_tree(model_id, revision=commit, recursive=True)
    files = {f.path: f for f in tree if isinstance(f, RepoFile)}
    chosen = list(filter_repo_objects(files, allow_patterns=list(include) or None))
    if not chosen:
        wanted = " ".join(include) if include else "anything"
        names = ", ".join(sorted(files)[:8]) or "no files at all"
        raise PullError(f"no file of {model_id} matches {wanted} (the repo has: {names})")
    return commit, [files[path] for path in chosen]


def _check_free_space(model_id: str, target: Path, files: list[RepoFile]) -> None:
    """Fail before the first byte rather than at 95% with a full disk."""
    needed = sum(f.size for f in files if not (target / f.path).is_file())
    free = shutil.disk_usage(target).free
    if needed > free:
        raise PullError(
            f"not enough disk space for {model_id} at {target}: it needs "
            f"{human_bytes(needed)} more, {human_bytes(free)} is free; free some space or pull "
            "into another store (--models-dir or SHOAL_MODELS_DIR)"
        )


def _fetch(
    model_id: str,
    file: RepoFile,
    commit: str,
    target: Path,
    endpoint: str,
    token: str | None,
    tracker: _Tracker,
) -> None:
    tracker.file_started(file.path)
    paths = get_local_download_paths(target, file.path)
    local = read_download_metadata(target, file.path)
    if paths.file_path.is_file() and local is not None and local.commit_hash == commit:
        tracker.file_done(skipped_bytes=file.size)  # pulled before at this commit
        return
    url = hf_hub_url(model_id, file.path, revision=commit, endpoint=endpoint)
    # HEAD: the ETag (names the partial), the size, and where the bytes are (maybe a CDN)
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=True)
    etag = meta.etag
    if not etag:
        raise PullError(f"{url} came without an ETag: is {endpoint} a Hugging Face Hub?")
    if paths.file_path.is_file() and local is not None and local.etag == etag:
        write_download_metadata(target, file.path, commit_hash=commit, etag=etag)
        tracker.file_done(skipped_bytes=file.size)  # same content, newer commit
        return

    partial = paths.incomplete_path(etag)
    headers = build_hf_headers(token=token, library_name="shoal")
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
    with WeakFileLock(paths.lock_path):  # two pulls of one model must not append to one partial
        resume = partial.stat().st_size if partial.is_file() else 0
        if meta.size is not None and resume > meta.size:
            partial.unlink()  # longer than the file: not ours to trust
            resume = 0
        with partial.open("ab") as out:
            http_get(
                meta.location,
                out,
                resume_size=resume,
                headers=headers,
                expected_size=meta.size,
                displayed_filename=file.path,
                tqdm_class=tracker.bar,
            )
        os.replace(partial, paths.file_path)
        for stale in partial.parent.glob(partial.name.split(".")[0] + ".*.incomplete"):
            stale.unlink(missing_ok=True)  # partials of an older version of this file
    write_download_metadata(target, file.path, commit_hash=commit, etag=etag)
    tracker.file_done()


def _explain(
    exc: BaseException,
    model_id: str,
    revision: str,
    endpoint: str,
    target: Path,
    tracker: _Tracker,
) -> PullError | None:
    """The PullError an expected failure becomes; None for a bug or an interrupt (re-raised)."""
    progress = tracker.progress
    current = progress.current_file
    done = f"{human_bytes(progress.bytes_done)} of {human_bytes(progress.bytes_total)}"
    where = f" at {current} ({done} done)" if current else ""
    resume = f"the download of {model_id} stopped{where}: {RESUME_HINT}"
    match exc:
        case PullError():
            return exc
        case OfflineModeIsEnabled():
            return PullError(
                "HF_HUB_OFFLINE is set, so huggingface_hub refuses to download: unset it, or pass "
                "--offline to use only what is in the store"
            )
        case RevisionNotFoundError():
            return PullError(f"{model_id} has no revision {revision!r} on {endpoint}")
        case RemoteEntryNotFoundError():
            return PullError(f"{current} of {model_id} is gone from {endpoint}: {RESUME_HINT}")
        case HfHubHTTPError() if _status(exc) in (401, 403, 404):
            return PullError(
                f"no such model on {endpoint}: {model_id} (or it is gated: set HF_TOKEN to a "
                "token that has access)"
            )
        case HfHubHTTPError():
            return PullError(f"{endpoint} answered HTTP {_status(exc)}; {resume}")
        case httpx2.TransportError() if current is None:
            return PullError(f"cannot reach {endpoint} ({exc}): check the network or HF_ENDPOINT")
        case httpx2.TransportError():
            return PullError(f"the connection to {endpoint} broke ({exc}); {resume}")
        case OSError() if exc.errno == errno.ENOSPC:
            return PullError(f"the disk at {target} is full; free some space, then {RESUME_HINT}")
        case OSError() if current is not None:
            return PullError(f"{exc}; {resume}")
        case OSError():
            return PullError(
                f"cannot write to {target} ({exc}): pick another store with --models-dir"
            )
    return None


def _status(exc: HfHubHTTPError) -> int | None:
    return exc.response.status_code if exc.response is not None else None


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the Hub shows sizes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---- progress --------------------------------------------------------------------------------


class _Tracker:
    """Counts a pull's files and bytes and hands throttled snapshots to the callback."""

    def __init__(self, model_id: str, on_progress: ProgressCallback | None) -> None:
        self.progress = DownloadState(model_id=model_id, started_at=time.time())
        self._on_progress = on_progress
        self._last_emit = 0.0

    def start(self, files: list[RepoFile]) -> None:
        self._update(files_total=len(files), bytes_total=sum(f.size for f in files))

    def file_started(self, path: str) -> None:
        self._update(current_file=path)

    def file_done(self, skipped_bytes: int = 0) -> None:
        p = self.progress
        self._update(
            current_file=None,
            files_done=p.files_done + 1,
            bytes_done=p.bytes_done + skipped_bytes,
        )

    def add_bytes(self, n: int) -> None:
        self._update(bytes_done=self.progress.bytes_done + n)

    def finish(self, error: str | None = None) -> None:
        status = "failed" if error else "done"
        self._update(force=True, status=status, error=error, finished_at=time.time())

    def bar(self, **kwargs: Any) -> _ByteCounter:
        """What http_get takes as its `tqdm_class`: bytes go into this pull's progress."""
        return _ByteCounter(self, initial=kwargs.get("initial") or 0)

    def _update(self, force: bool = False, **changes: Any) -> None:
        self.progress = self.progress.model_copy(update=changes)
        now = time.monotonic()
        if self._on_progress and (force or now - self._last_emit >= PROGRESS_INTERVAL_S):
            self._last_emit = now
            self._on_progress(self.progress)


class _ByteCounter:
    """The part of tqdm that http_get uses: a context manager whose update() counts bytes
    (negative when a server ignored the Range and the resumed bytes were thrown away)."""

    def __init__(self, tracker: _Tracker, initial: int) -> None:
        self._tracker = tracker
        tracker.add_bytes(initial)  # a resumed file's bytes already on disk

    def __enter__(self) -> _ByteCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        self._tracker.add_bytes(int(n or 0))
