"""exo's routes that fit no other module: GET /events, POST /v1/cancel/{command_id} and
POST /bench/chat/completions.

The bench route is a chat completion with EOS ignored (the runner's `ignore_eos`), answered
with exo's `generation_stats` {prompt_tps, generation_tps, prompt_tokens, generation_tokens,
peak_memory_usage}: in the body when not streamed, as a `: generation_stats {...}` SSE
comment before `data: [DONE]` when streamed. The node measures the times itself around the
rank 0's stream (api.upstream): prompt_tps is prompt tokens over the time to the first
generated token (so it includes the hop to rank 0 and any wait for a batch slot), and
generation_tps is (tokens - 1) over the time from the first to the last token, as exo counts.

Each bench generation has a command id (also the completion's `id`): POST
/v1/cancel/{command_id} ends it. shoal's other generation routes relay byte for byte and have
no command ids, so only bench generations can be cancelled; any other id is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from shoal.api import upstream
from shoal.api.host import controller_of
from shoal.api.upstream import UpstreamError
from shoal.schema.exo import memory
from shoal.schema.openai import ChatCompletionRequest
from shoal.web.errors import ApiError
from shoal.web.sse import DONE, EventStream, sse

router = APIRouter()

# keys of a bench request that the node decides, not the client
BENCH_OWN_KEYS = ("stream", "stream_options", "use_prefix_cache", "ignore_eos")


# ---- the node's event log ---------------------------------------------------------------------


@router.get("/events")
async def events(request: Request) -> JSONResponse:
    """exo's event log, as shoal keeps one: this node's history of crashes, joins, failovers,
    placements and degradations (cluster.events), oldest first."""
    controller = controller_of(request.app.state.host)
    log = controller.events if controller is not None else None
    return JSONResponse(log.recent(log.keep) if log is not None else [])


# ---- commands: the bench generations in flight ------------------------------------------------


@dataclass
class Command:
    command_id: str
    model: str
    started: float = field(default_factory=time.time)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


def commands_of(request: Request) -> dict[str, Command]:
    """The app's generations in flight, by command id."""
    state = request.app.state
    if not hasattr(state, "exo_commands"):
        state.exo_commands = {}
    return state.exo_commands


@router.post("/v1/cancel/{command_id}")
async def cancel(command_id: str, request: Request) -> JSONResponse:
    command = commands_of(request).get(command_id)
    if command is None:
        raise ApiError(
            404,
            f"No generation {command_id} in flight here: it finished, or it is not a bench "
            "generation (only POST /bench/chat/completions has command ids on shoal).",
            code="command_not_found",
        )
    command.cancelled.set()
    return JSONResponse({"message": "Command cancelled.", "command_id": command_id})


# ---- the measurements -----------------------------------------------------------------------


@dataclass
class Timing:
    """When the request went out and when the first and last generated tokens came back."""

    start: float
    first: float | None = None
    last: float | None = None

    def token(self, at: float) -> None:
        self.first = at if self.first is None else self.first
        self.last = at


def generation_stats(
    timing: Timing, prompt_tokens: int, generation_tokens: int, peak_bytes: int
) -> dict[str, Any]:
    """exo's GenerationStats from the measured times (rates are 0 where unmeasurable)."""
    prefill = (timing.first - timing.start) if timing.first is not None else 0.0
    decode = (timing.last - timing.first) if timing.first is not None and timing.last else 0.0
    return {
        "prompt_tps": prompt_tokens / prefill if prefill > 0 else 0.0,
        "generation_tps": (generation_tokens - 1) / decode
        if generation_tokens > 1 and decode > 0
        else 0.0,
        "prompt_tokens": prompt_tokens,
        "generation_tokens": generation_tokens,
        "peak_memory_usage": memory(peak_bytes),
    }


def peak_rss(pid: int) -> int:
    """A process's peak resident memory in bytes (Linux VmHWM), else its current RSS."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).memory_info().rss
    return 0


def rank0_peak(request: Request, model: str) -> int:
    """The peak memory of the model's rank 0 runner where it runs on this node; 0 where it
    runs on another node (its process is not ours to read)."""
    controller = controller_of(request.app.state.host)
    if controller is None:
        return 0
    for state in controller.worker.states():
        if state.model_id == model and state.rank == 0 and state.pid:
            return peak_rss(state.pid)
    return 0


def has_token(chunk: dict[str, Any]) -> bool:
    return any(
        (c.get("delta") or {}).get("content") or (c.get("delta") or {}).get("tool_calls")
        for c in chunk.get("choices") or ()
    )


# ---- the stream, cancellable ----------------------------------------------------------------


async def chunks(
    request: Request, body: dict[str, Any], command: Command, timing: Timing
) -> AsyncIterator[dict[str, Any]]:
    """The rank 0's chunks, stamped with the command id and timed; ends when cancelled."""
    source = upstream.stream(request.app.state.host, body).__aiter__()
    stop = asyncio.ensure_future(command.cancelled.wait())
    try:
        while True:
            step = asyncio.ensure_future(source.__anext__())
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():  # cancelled: stop waiting, close the stream to rank 0
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
                return
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            if has_token(chunk):
                timing.token(time.perf_counter())
            yield {**chunk, "id": command.command_id}
    finally:
        stop.cancel()
        with contextlib.suppress(BaseException):
            await source.aclose()


def _error_body(exc: UpstreamError) -> dict[str, Any]:
    return ApiError(exc.status, exc.message, code=exc.code, type=exc.type).body()


# ---- POST /bench/chat/completions -----------------------------------------------------------


@router.post("/bench/chat/completions", response_model=None)
async def bench_chat(body: ChatCompletionRequest, request: Request) -> Response:
    raw = await request.json()  # validated above; relayed as sent, with ignore_eos set
    payload = {k: v for k, v in raw.items() if k not in BENCH_OWN_KEYS} | {"ignore_eos": True}
    registry = commands_of(request)
    command = Command(f"chatcmpl-{uuid.uuid4().hex}", body.model)
    registry[command.command_id] = command
    timing = Timing(time.perf_counter())
    stream = chunks(request, payload, command, timing)
    try:
        first = await anext(stream, None)  # a refusal before any chunk keeps its HTTP status
    except UpstreamError as exc:
        registry.pop(command.command_id, None)
        await stream.aclose()
        raise ApiError(exc.status, exc.message, code=exc.code, type=exc.type) from None
    if body.stream:
        return EventStream(_streamed(request, stream, first, command, timing, body.include_usage))
    try:
        return JSONResponse(await _collected(request, stream, first, command, timing))
    except UpstreamError as exc:
        raise ApiError(exc.status, exc.message, code=exc.code, type=exc.type) from None
    finally:
        registry.pop(command.command_id, None)
        await stream.aclose()


async def _streamed(
    request: Request,
    stream: AsyncIterator[dict[str, Any]],
    first: dict[str, Any] | None,
    command: Command,
    timing: Timing,
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    usage: dict[str, Any] = {}
    try:
        chunk = first
        while chunk is not None:
            usage = chunk.get("usage") or usage
            if chunk.get("choices") or include_usage:  # the usage-only chunk if asked for
                yield sse(chunk)
            chunk = await anext(stream, None)
        stats = generation_stats(
            timing,
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            rank0_peak(request, command.model),
        )
        yield f": generation_stats {json.dumps(stats)}\n\n"
    except UpstreamError as exc:  # headers are out: the error travels in the stream
        yield sse(_error_body(exc))
    finally:
        commands_of(request).pop(command.command_id, None)
        await stream.aclose()
    yield DONE


async def _collected(
    request: Request,
    stream: AsyncIterator[dict[str, Any]],
    first: dict[str, Any] | None,
    command: Command,
    timing: Timing,
) -> dict[str, Any]:
    """The streamed chunks as one chat.completion, with generation_stats."""
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish, usage, head = None, {}, first or {}
    chunk = first
    while chunk is not None:
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or ():
                slot = calls.setdefault(
                    call.get("index", 0), {"type": "function", "function": {"arguments": ""}}
                )
                slot["id"] = call.get("id") or slot.get("id")
                function = call.get("function") or {}
                if function.get("name"):
                    slot["function"]["name"] = function["name"]
                slot["function"]["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
        chunk = await anext(stream, None)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
        message["content"] = message["content"] or None
    stats = generation_stats(
        timing,
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
        rank0_peak(request, command.model),
    )
    return {
        "id": command.command_id,
        "object": "chat.completion",
        "created": head.get("created", int(command.started)),
        "model": head.get("model", command.model),
        "system_fingerprint": head.get("system_fingerprint"),
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        ],  # finish_reason null: cancelled before the end
        "usage": usage or None,
        "generation_stats": stats,
    }
