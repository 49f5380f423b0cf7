"""A fake Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub 2.4 uses to pull a repo.

- `GET /api/models/{repo}/revision/{rev}`: repo info; only `sha` (the commit) is read.
- `GET /api/models/{repo}/tree/{rev}?recursive=true`: the file listing, with `lfs` for big files.
- `HEAD /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag` (git blob sha1) or, for LFS
  files, `X-Linked-Etag` (sha256) and `X-Linked-Size`; huggingface_hub refuses a file without
  a commit header or an ETag.
- `GET /{repo}/resolve/{rev}/{path}`: the bytes, honouring `Range: bytes=N-`.

Unknown repos get 404 with `X-Error-Code: RepoNotFound` and unknown revisions
`RevisionNotFound`, as the Hub answers. `cut()` drops one file's body part-way, and `down`
makes every request fail with 503, as if the network went away. `requests` logs what came in.

    with FakeHub({"org/name": {"config.json": b"{}"}}) as hub:
        pull("org/name", tmp_path, endpoint=hub.url)
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # without the query
    range: str | None

    @property
    def range_start(self) -> int | None:
        match = RANGE.match(self.range or "")
        return int(match.group(1)) if match else None


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[Seen] = []
        self.down = False
        self._cuts: dict[tuple[str, str], tuple[int, bool]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def cut(self, repo_id: str, path: str, after_bytes: int, then_down: bool = False) -> None:
        """The next GET of this file sends `after_bytes` of its body, then drops the connection;
        with `then_down`, the hub also goes down (503) until `down` is set back to False."""
        self._cuts[(repo_id, path)] = (after_bytes, then_down)

    def commit(self, repo_id: str) -> str:
        files = self.repos[repo_id]
        return hashlib.sha1(b"".join(p.encode() + files[p] for p in sorted(files))).hexdigest()

    def tree(self, repo_id: str) -> list[dict]:
        entries = []
        for path, data in sorted(self.repos[repo_id].items()):
            entry = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
            if is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
                entry["lfs"]["pointerSize"] = 134
            entries.append(entry)
        return entries


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass  # the test reads hub.requests instead

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append(Seen(self.command, path, self.headers.get("Range")))
            if hub.down:
                return self._error(503, "")
            if match := API.match(path):
                return self._api(unquote(match["repo"]), unquote(match["rev"]), match["kind"])
            if match := RESOLVE.match(path):
                repo, rev, file = (
                    unquote(match["repo"]),
                    unquote(match["rev"]),
                    unquote(match["file"]),
                )
                return self._resolve(repo, rev, file, body)
            self._error(404, "")

        def _check(self, repo: str, rev: str) -> bool:
            if repo not in hub.repos:
                self._error(404, "RepoNotFound")
            elif rev not in ("main", hub.commit(repo)):
                self._error(404, "RevisionNotFound")
            else:
                return True
            return False

        def _api(self, repo: str, rev: str, kind: str) -> None:
            if not self._check(repo, rev):
                return
            if kind == "tree":
                payload: object = hub.tree(repo)
            else:
                siblings = [{"rfilename": p} for p in sorted(hub.repos[repo])]
                payload = {"id": repo, "sha": hub.commit(repo), "siblings": siblings}
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _resolve(self, repo: str, rev: str, file: str, body: bool) -> None:
            if not self._check(repo, rev):
                return
            data = hub.repos[repo].get(file)
            if data is None:
                return self._error(404, "EntryNotFound")
            start, end = 0, len(data)
            match = RANGE.match(self.headers.get("Range") or "")
            if match:
                start, end = int(match[1]), int(match[2]) + 1 if match[2] else len(data)
                if start >= len(data):
                    return self._error(416, "")
            self.send_response(206 if match else 200)
            self.send_header("X-Repo-Commit", hub.commit(repo))
            if is_lfs(file):
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{git_blob_sha(data)}"')
            self.send_header("Accept-Ranges", "bytes")
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not body:
                return
            cut = hub._cuts.pop((repo, file), None)
            if cut is None:
                self.wfile.write(data[start:end])
                return
            after, then_down = cut
            self.wfile.write(data[start : start + after])
            self.wfile.flush()
            hub.down = then_down
            self.close_connection = True  # the client sees the body end early

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
