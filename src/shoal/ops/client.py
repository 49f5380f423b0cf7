"""One typed client of a node's public API for the `shoal` subcommands.

`ApiClient` wraps one `httpx.Client` with a base URL and timeouts; `AsyncApiClient` is its
asyncio sibling (for `shoal bench`). Documents come back parsed (shoal.schema, models.parity);
streams are read with httpx-sse and handed out chunk by chunk. A connection that cannot be opened is
`ApiUnreachable`; an answer other than the expected status is `ApiError` with one line of
text; any other httpx error passes through for the command to word.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, ServerSentEvent
from pydantic import BaseModel, TypeAdapter

from shoal.models.parity import ManifestsDocument
from shoal.schema.documents import (
    ChatReply,
    CompletionReply,
    CreatedInstance,
    ModelList,
    NodesDocument,
    Reach,
    StateDocument,
    StoreDocument,
)
from shoal.schema.exo import InstanceBody, InstanceDocument, instance_body
from shoal.schema.report import StoreState

DEFAULT_API: Final = "http://127.0.0.1:52415"
SSE_DONE: Final = "[DONE]"
START_HINT: Final = "start a node with `shoal run` (or `make run`)"
API_KEY_ENV: Final = "SHOAL_API_KEY"
KEY_HINT: Final = f"this node needs its API key: pass --api-key KEY (env {API_KEY_ENV})"
# Connecting must be quick; reading may wait on a long prefill or a busy batch.
DEFAULT_TIMEOUT: Final = httpx.Timeout(300.0, connect=5.0)
PROBE_TIMEOUT: Final = httpx.Timeout(3.0)

Doc = TypeVar("Doc", bound=BaseModel)
INSTANCE_DOCUMENT: Final = TypeAdapter(InstanceDocument)


# ---- pure helpers ----------------------------------------------------------------------------


def api_base(url: str) -> str:
    """Normalise what a user types (`host:port`, `http://host:port/`, `.../v1`) to a base URL."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def first_key(text: str | None) -> str | None:
    """The key a client sends out of SHOAL_API_KEY, which may list several (as the node's)."""
    keys = [k.strip() for k in (text or "").split(",") if k.strip()]
    return keys[0] if keys else None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def add_api_key_flag(parser: argparse.ArgumentParser) -> None:
    """--api-key for the commands that talk to a node; the default comes from the environment
    and is never shown in --help."""
    parser.add_argument(
        "--api-key",
        default=first_key(os.environ.get(API_KEY_ENV)),
        help=f"the node's API key, if it was started with one (env {API_KEY_ENV})",
    )


def error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or json.dumps(error))
    return str(error)


def error_message(status: int, body: bytes) -> str:
    """One line out of an error response: OpenAI `{"error": {"message"}}`, FastAPI
    `{"detail": ...}`, or the raw text."""
    message = ""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and "error" in data:
        message = error_text(data["error"])
    elif isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        message = detail if isinstance(detail, str) else json.dumps(detail)
    else:
        message = body.decode("utf-8", "replace").strip()
    message = " ".join(message.split()) or "(empty body)"
    if status == 401:  # the node's own words name its flag; the user needs this command's
        return f"HTTP 401: {KEY_HINT} ({message[:300]})"
    return f"HTTP {status}: {message[:500]}"


def event_payload(data: str) -> dict[str, Any] | str:
    """One SSE event's data: a JSON object, or SSE_DONE."""
    if data.strip() == SSE_DONE:
        return SSE_DONE
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed SSE data: {data[:120]!r}") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"SSE data is not a JSON object: {data[:120]!r}")
    return payload


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One line of an SSE stream: a JSON payload (dict), SSE_DONE, or None for anything else
    (blank separators, `:` keep-alive comments, `event:`/`id:` fields)."""
    line = line.rstrip("\r")
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :]
    return event_payload(data[1:] if data.startswith(" ") else data)


@dataclass(frozen=True)
class ChunkDelta:
    """What one streamed chunk carries, for chat and text completions alike."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None


def read_chunk(payload: dict[str, Any]) -> ChunkDelta:
    if "error" in payload:
        return ChunkDelta(error=error_text(payload["error"]))
    usage = payload.get("usage") or None
    choices = payload.get("choices") or []
    if not choices:  # the include_usage chunk has an empty choices list
        return ChunkDelta(usage=usage)
    choice = choices[0]
    delta = choice.get("delta")
    text = (delta or {}).get("content") if delta is not None else choice.get("text")
    return ChunkDelta(text or "", choice.get("finish_reason"), usage)


# ---- errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    """The API answered with an error; the message is one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiUnreachable(Exception):
    """Nothing accepts a connection at base; cause is the httpx error."""

    def __init__(self, base: str, cause: Exception | None = None) -> None:
        super().__init__(f"cannot reach the shoal API at {base}: {START_HINT}")
        self.base = base
        self.cause = cause


def transport_cause(exc: Exception) -> Exception:
    """The httpx error behind an ApiUnreachable; any other error as it is."""
    return exc.cause if isinstance(exc, ApiUnreachable) and exc.cause is not None else exc


def cannot_reach(base: str, exc: Exception) -> str:
    """`cannot reach BASE: <httpx's words>. <how to start a node>` (audit, models pull)."""
    return f"cannot reach {base}: {transport_cause(exc)}. {START_HINT}"


def failure_text(exc: Exception) -> str:
    """`ConnectError: ...`: a request that got no answer, as one line."""
    cause = transport_cause(exc)
    return f"{type(cause).__name__}: {cause}"


def check(response: httpx.Response, expect: int = 200) -> httpx.Response:
    """The response if its status is `expect`; else ApiError with the body's one line."""
    if response.status_code != expect:
        raise ApiError(error_message(response.status_code, response.content), response.status_code)
    return response


def parse(response: httpx.Response, doc: type[Doc], expect: int = 200) -> Doc:
    return doc.model_validate(check(response, expect).json())


class _EventSource(EventSource):
    """Takes a 200 without any Content-Type as SSE too (minimal servers, test doubles); a
    declared type other than text/event-stream is still an error."""

    def _check_content_type(self) -> None:
        if "content-type" in self.response.headers:
            super()._check_content_type()


def _chunks(event: ServerSentEvent) -> ChunkDelta | None:
    """One event as a chunk; None at the end of the stream."""
    payload = event_payload(event.data)
    if payload == SSE_DONE:
        return None
    assert isinstance(payload, dict)
    return read_chunk(payload)


SSE_HEADERS: Final = {"Accept": "text/event-stream", "Cache-Control": "no-store"}


# ---- the clients -----------------------------------------------------------------------------


class ApiClient:
    """A node's API at one base URL over one pooled httpx.Client (shared by `at()`)."""

    def __init__(
        self,
        base: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        http: httpx.Client | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base = api_base(base)
        self.http = http if http is not None else httpx.Client(timeout=timeout)
        self.http.headers.update(auth_headers(api_key))  # the pool's: at() shares it
        self._owns_http = http is None

    def at(self, base: str) -> ApiClient:
        """The same pool, another node."""
        return ApiClient(base, http=self.http)

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, self.base + path, **kwargs)
        except httpx.ConnectError as exc:
            raise ApiUnreachable(self.base, exc) from exc

    def get(self, path: str, doc: type[Doc], **kwargs: Any) -> Doc:
        return parse(self.request("GET", path, **kwargs), doc)

    def state(self) -> StateDocument:
        return self.get("/state", StateDocument)

    def cluster_nodes(self) -> NodesDocument:
        return self.get("/cluster/nodes", NodesDocument)

    def instances(self) -> dict[str, InstanceBody]:
        """Every instance of the plan this node holds, by id (from /state)."""
        return self.state().instance_bodies()

    def instance(self, instance_id: str) -> InstanceBody:
        return instance_body(check(self.request("GET", f"/instance/{quote(instance_id)}")).json())

    def models(self, status: str | None = None) -> list[str]:
        params = {"status": status} if status else None
        return [m.id for m in self.get("/v1/models", ModelList, params=params).data]

    def node_id(self, timeout: httpx.Timeout | float = PROBE_TIMEOUT) -> str:
        """The node id this API answers with (ApiError for any other answer than 200)."""
        return check(self.request("GET", "/node_id", timeout=timeout)).text.strip('"')

    def manifests(
        self,
        model_id: str,
        nodes: list[str] | None = None,
        hash: bool = False,
        timeout: httpx.Timeout | float | None = None,
    ) -> ManifestsDocument:
        """Every node's manifest of the model, collected by this node; `hash` reads every byte
        on every node, so such a call wants a long timeout of its own (None: the client's)."""
        params = {"hash": "true" if hash else "false"}
        if nodes:
            params["nodes"] = ",".join(nodes)
        path = f"/cluster/manifests/{quote(model_id)}"
        own = {"timeout": timeout} if timeout is not None else {}
        return self.get(path, ManifestsDocument, params=params, **own)

    def placement(self, **query: Any) -> InstanceDocument:
        """GET /instance/placement: the instance document to post back."""
        response = check(self.request("GET", "/instance/placement", params=query))
        return INSTANCE_DOCUMENT.validate_python(response.json())

    def create_instance(self, instance: InstanceDocument, allow_blocked: bool = False) -> str:
        """POST /instance: the new instance's id."""
        wire = {meta: body.wire() for meta, body in instance.items()}
        body = {"instance": wire, "allow_blocked": allow_blocked}
        return parse(self.request("POST", "/instance", json=body), CreatedInstance).instance_id

    def reach(self, host: str, port: int) -> Reach:
        return self.get("/cluster/reach", Reach, params={"host": host, "port": port})

    def start_pull(self, model_id: str, include: list[str], revision: str) -> None:
        body = {"model": model_id, "include": include, "revision": revision}
        check(self.request("POST", "/models/pull", json=body), expect=202)

    def store(self) -> StoreState:
        return self.get("/models", StoreDocument).store

    def chat(self, body: dict[str, Any], **kwargs: Any) -> ChatReply:
        return parse(self.request("POST", "/v1/chat/completions", json=body, **kwargs), ChatReply)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[ChunkDelta]:
        """POST a streaming request; its chunks as they arrive, until [DONE]. Closing the
        iterator (or an exception in the caller's loop, Ctrl-C too) closes the response, so
        the server sees the disconnect and stops generating."""
        try:
            with self.http.stream(
                "POST", self.base + path, json=body, headers=SSE_HEADERS
            ) as response:
                if response.status_code != 200:
                    message = error_message(response.status_code, response.read())
                    raise ApiError(message, response.status_code)
                for event in _EventSource(response).iter_sse():
                    chunk = _chunks(event)
                    if chunk is None:
                        return
                    yield chunk
        except httpx.ConnectError as exc:
            raise ApiUnreachable(self.base, exc) from exc

    def chat_stream(self, body: dict[str, Any]) -> Iterator[ChunkDelta]:
        return self.stream("/v1/chat/completions", body)


class AsyncApiClient:
    """ApiClient's asyncio sibling over one httpx.AsyncClient (shared by `at()`)."""

    def __init__(
        self,
        base: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        limits: httpx.Limits | None = None,
        http: httpx.AsyncClient | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base = api_base(base)
        if http is None:
            http = httpx.AsyncClient(timeout=timeout, limits=limits or httpx.Limits())
            self._owns_http = True
        else:
            self._owns_http = False
        http.headers.update(auth_headers(api_key))
        self.http = http

    def at(self, base: str) -> AsyncApiClient:
        return AsyncApiClient(base, http=self.http)

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.http.request(method, self.base + path, **kwargs)
        except httpx.ConnectError as exc:
            raise ApiUnreachable(self.base, exc) from exc

    async def get(self, path: str, doc: type[Doc], **kwargs: Any) -> Doc:
        return parse(await self.request("GET", path, **kwargs), doc)

    async def state(self) -> StateDocument:
        return await self.get("/state", StateDocument)

    async def models(self) -> list[str]:
        return [m.id for m in (await self.get("/v1/models", ModelList)).data]

    async def healthy(self, timeout: float) -> bool:
        """/health answers 200 within timeout (any failure to answer is a no)."""
        try:
            response = await self.http.get(f"{self.base}/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def complete(self, body: dict[str, Any]) -> CompletionReply:
        return parse(await self.request("POST", "/v1/completions", json=body), CompletionReply)

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[ChunkDelta]:
        """ApiClient.stream for asyncio; use under contextlib.aclosing."""
        try:
            async with self.http.stream(
                "POST", self.base + path, json=body, headers=SSE_HEADERS
            ) as response:
                if response.status_code != 200:
                    message = error_message(response.status_code, await response.aread())
                    raise ApiError(message, response.status_code)
                async for event in _EventSource(response).aiter_sse():
                    chunk = _chunks(event)
                    if chunk is None:
                        return
                    yield chunk
        except httpx.ConnectError as exc:
            raise ApiUnreachable(self.base, exc) from exc

    def complete_stream(self, body: dict[str, Any]) -> AsyncIterator[ChunkDelta]:
        return self.stream("/v1/completions", body)
