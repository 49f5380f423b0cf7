"""Ollama's API under /api/ (and /ollama/api/, as exo serves it), translated to the model's
OpenAI chat and text completions (api.upstream) and back.

Bodies are validated here from the raw request (not by FastAPI), so that every error has
Ollama's shape `{"error": "..."}` instead of the node's OpenAI one. Streams are NDJSON: one
object per line, a final line with `done: true` and the counts, or `{"error"}` mid-stream.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from shoal import __version__
from shoal.api import upstream
from shoal.api.host import (
    ModelHost,
    controller_of,
    held_models_of,
    library_of,
    request_limits_of,
)
from shoal.api.router import ServedCard
from shoal.api.upstream import UpstreamError
from shoal.models.local import LocalModel
from shoal.schema.limits import OLLAMA, OLLAMA_GENERATE
from shoal.schema.ollama import (
    Answer,
    ChatRequest,
    FileFacts,
    GenerateRequest,
    ModelFacts,
    Refused,
    ShowRequest,
    check_format,
    check_generate,
    openai_messages,
    openai_sampling,
    openai_tools,
    part_of,
    rfc3339,
)
from shoal.schema.report import HeldModel
from shoal.web.errors import RETRY_AFTER_S, field_path

router = APIRouter()

NDJSON = "application/x-ndjson"
# shoal never unloads a served model; Ollama's own clients show an expiry more than 20 years
# out as "Forever".
NEVER = "9999-12-31T23:59:59Z"
Body = TypeVar("Body", bound=BaseModel)


class OllamaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    retry = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None  # a move, a load
    return JSONResponse({"error": message}, status_code=status, headers=retry)


def _ollama_errors(route: Callable[[Request], Awaitable[Response]]):
    """Every refusal of a route, or of the model's runner, in Ollama's shape and status."""

    @functools.wraps(route)
    async def answered(request: Request) -> Response:
        try:
            return await route(request)
        except OllamaError as exc:
            return _error(exc.status, exc.message)
        except Refused as exc:
            return _error(400, str(exc))
        except UpstreamError as exc:
            return _error(exc.status, exc.message)

    return answered


async def _parse(request: Request, model: type[Body]) -> Body:
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise OllamaError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OllamaError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = field_path(err["loc"])
        raise OllamaError(400, f"invalid {where}: {err['msg']}" if where else err["msg"]) from None


def _host(request: Request) -> ModelHost:
    return request.app.state.host


def _served(host: ModelHost, name: str) -> ServedCard:
    """The served model a name means; Ollama's clients may add the default tag `:latest`."""
    models = host.models
    for candidate in (name, name.removesuffix(":latest")):
        if candidate in models:
            return models[candidate]
    served = ", ".join(sorted(models)) or "none yet"
    raise OllamaError(404, f"model '{name}' not found; served here: {served}")


# ---- what the node knows about a model ------------------------------------------------------


def _gguf_facts(path: Path) -> FileFacts:
    import gguf

    from shoal.engine.gguf_file import GGUFFile

    reader = GGUFFile(path)
    meta = reader.metadata
    try:
        quant = gguf.LlamaFileType(int(meta["general.file_type"])).name
        quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (KeyError, ValueError):
        quant = ""
    info = {
        k: v
        for k, v in meta.items()
        if not k.startswith("tokenizer.") and not k.endswith(".length") and k != "general.license"
    }
    return FileFacts(
        "gguf",
        sum(t.n_elements for t in reader.tensors),
        quant,
        str(meta.get("tokenizer.chat_template", "")),
        str(meta.get("general.license", "")),
        info,
    )


def _safetensors_facts(path: Path) -> FileFacts:
    count, dtypes = 0, {}
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:  # the header alone: 8-byte length, then JSON
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                n = 1
                for d in tensor["shape"]:
                    n *= d
                count += n
                dtypes[tensor["dtype"]] = dtypes.get(tensor["dtype"], 0) + n
    config = _json_file(path / "config.json")
    quant = max(dtypes, key=dtypes.__getitem__) if dtypes else ""
    if isinstance(config.get("quantization"), dict):  # mlx-lm's packing: counts are of words
        count, quant = 0, f"Q{config['quantization'].get('bits', '')}"
    template = _json_file(path / "tokenizer_config.json").get("chat_template") or ""
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template", "") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), "")
    return FileFacts("safetensors", count, quant, str(template))


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=32)
def _file_facts(path: str, stamp: tuple[int, int]) -> FileFacts:
    """Cached per file and its (mtime, size): the GGUF header is read once, not per request."""
    where = Path(path)
    return _gguf_facts(where) if where.suffix == ".gguf" else _safetensors_facts(where)


async def facts_of(host: object, model_id: str) -> ModelFacts:
    """What the node knows of a model: its own files (headers read in a thread, once per file
    version), else what the report of a node holding it says; nothing is filled in when the
    node does not know it."""
    held = held_models_of(host).get(model_id)
    library = library_of(host)
    local = library.models.get(model_id) if library is not None else None
    if held is None:
        controller = controller_of(host)
        reports = controller.reports() if controller is not None else []
        held = next((m for r in reports for m in r.models if m.model_id == model_id), None)
    if local is None:
        return ModelFacts(held)
    return await asyncio.to_thread(_read_facts, held, local)


def _read_facts(held: HeldModel | None, local: LocalModel) -> ModelFacts:
    stat = local.path.stat()
    files = _file_facts(str(local.path), (stat.st_mtime_ns, stat.st_size))
    return ModelFacts(held, str(local.path), local.manifest().total_bytes, stat.st_mtime, files)


async def _all_facts(host: ModelHost) -> list[tuple[ServedCard, ModelFacts]]:
    return [(card, await facts_of(host, card.id)) for _, card in sorted(host.models.items())]


# ---- models: version, tags, show, ps ---------------------------------------------------------


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    models = []
    for card, facts in await _all_facts(_host(request)):
        models.append(
            {
                "name": card.id,
                "model": card.id,
                "modified_at": rfc3339(facts.modified or card.created),
                "size": facts.disk_bytes,
                "digest": facts.digest,
                "details": facts.details(),
            }
        )
    return {"models": models}


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    models = []
    for card, facts in await _all_facts(_host(request)):
        models.append(
            {
                "name": card.id,
                "model": card.id,
                "size": facts.held.weight_bytes if facts.held else 0,  # resident, not on disk
                "digest": facts.digest,
                "details": facts.details(),
                "expires_at": NEVER,
                "size_vram": 0,
                "context_length": card.context_length or 0,
            }
        )
    return {"models": models}


@router.post("/show")
@_ollama_errors
async def show(request: Request) -> Response:
    body = await _parse(request, ShowRequest)
    if not body.wanted:
        raise OllamaError(400, "model is required")
    card = _served(_host(request), body.wanted)
    facts = await facts_of(_host(request), card.id)
    template = facts.files.template
    modelfile = [f"# Modelfile generated by shoal for {card.id}", f"FROM {facts.path or card.id}"]
    if template:
        modelfile.append(f'TEMPLATE """{template}"""')
    parameters = f"num_ctx {card.context_length}" if card.context_length else ""
    if parameters:
        modelfile.append(f"PARAMETER {parameters}")
    if facts.files.license:
        modelfile.append(f'LICENSE """{facts.files.license}"""')
    return JSONResponse(
        {
            "modelfile": "\n".join(modelfile) + "\n",
            "parameters": parameters,
            "template": template,
            "license": facts.files.license,
            "details": facts.details(),
            "model_info": facts.model_info(),
            "capabilities": ["completion"] + (["tools"] if "tools" in template else []),
            "modified_at": rfc3339(facts.modified or card.created),
        }
    )


# ---- generation: chat and generate ----------------------------------------------------------

Chunks = AsyncGenerator[dict[str, Any], None]
Render = Callable[[str, list[dict[str, Any]] | None, bool], dict[str, Any]]


def _chat_render(model: str) -> Render:
    def render(text: str, calls: list[dict[str, Any]] | None, done: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return {"model": model, "created_at": rfc3339(), "message": message, "done": done}

    return render


def _generate_render(model: str) -> Render:
    def render(text: str, calls: list[dict[str, Any]] | None, done: bool) -> dict[str, Any]:
        return {"model": model, "created_at": rfc3339(), "response": text, "done": done}

    return render


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _loaded(render: Render, stream: bool) -> Response:
    """Ollama answers an empty prompt by loading the model: here it is already resident."""
    obj = {**render("", None, True), "done_reason": "load"}
    return Response(_line(obj), media_type=NDJSON if stream else "application/json")


async def _answer(chunks: Chunks, render: Render, stream: bool, started: int) -> Response:
    """The runner's chunks as Ollama's answer. The first chunk is awaited before any header is
    sent, so a refusal (bad sampling value, prompt too long) keeps its status."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = {}
    except BaseException:
        await chunks.aclose()
        raise
    answer = Answer(started)
    if not stream:
        try:
            answer.feed(part_of(first), time.perf_counter_ns())
            async for chunk in chunks:
                answer.feed(part_of(chunk), time.perf_counter_ns())
            calls = answer.tool_calls()
        except ValueError as exc:  # tool call arguments that are not an object
            raise OllamaError(502, str(exc)) from None
        finally:
            await chunks.aclose()
        return JSONResponse({**render("".join(answer.text), calls, True), **answer.stats()})
    return StreamingResponse(_lines(first, chunks, answer, render), media_type=NDJSON)


async def _lines(
    first: dict[str, Any], chunks: Chunks, answer: Answer, render: Render
) -> AsyncIterator[bytes]:
    async def all_chunks() -> AsyncIterator[dict[str, Any]]:
        yield first
        async for chunk in chunks:
            yield chunk

    try:
        async for chunk in all_chunks():
            part = part_of(chunk)
            answer.feed(part, time.perf_counter_ns())
            if part.text:
                yield _line(render(part.text, None, False))
        calls = answer.tool_calls()
        if calls:  # Ollama sends a turn's tool calls whole, in a line before the last
            yield _line(render("", calls, False))
        yield _line({**render("", None, True), **answer.stats()})
    except (UpstreamError, ValueError) as exc:  # headers are out: the error is the last line
        yield _line({"error": getattr(exc, "message", None) or str(exc)})
    finally:
        await chunks.aclose()


@router.post("/chat")
@_ollama_errors
async def chat(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await _parse(request, ChatRequest)
    host = _host(request)
    card = _served(host, body.model)
    check_format(body.format)
    messages = openai_messages(body.messages)
    render = _chat_render(body.model)
    if not messages:
        return _loaded(render, body.stream)
    payload: dict[str, Any] = {
        "model": card.id,
        "messages": messages,
        **openai_sampling(body.options),
    }
    if body.tools:
        payload["tools"] = openai_tools(body.tools)
    return await _answer(
        upstream.stream(host, payload, fields=OLLAMA), render, body.stream, started
    )


@router.post("/generate")
@_ollama_errors
async def generate(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await _parse(request, GenerateRequest)
    host = _host(request)
    card = _served(host, body.model)
    check_generate(body)
    render = _generate_render(body.model)
    if not body.prompt:
        return _loaded(render, body.stream)
    if body.raw:  # no template: the prompt is the model's input as written
        payload = {
            "model": card.id,
            "prompt": body.prompt,
            # no num_predict: up to the context, within the node's cap
            **openai_sampling(body.options, unlimited=_most_tokens(host, card)),
        }
        chunks = upstream.stream(host, payload, upstream.COMPLETIONS_PATH, OLLAMA_GENERATE)
        return await _answer(chunks, render, body.stream, started)
    system = [{"role": "system", "content": body.system}] if body.system else []
    payload = {
        "model": card.id,
        "messages": [*system, {"role": "user", "content": body.prompt}],
        **openai_sampling(body.options),
    }
    chunks = upstream.stream(host, payload, fields=OLLAMA_GENERATE)
    return await _answer(chunks, render, body.stream, started)


def _most_tokens(host: ModelHost, card: ServedCard) -> int:
    cap = request_limits_of(host).max_tokens
    return min(card.context_length, cap) if card.context_length else cap


# ---- anything else under /api ---------------------------------------------------------------

ROUTES = {
    "version": "GET",
    "tags": "GET",
    "ps": "GET",
    "show": "POST",
    "chat": "POST",
    "generate": "POST",
}


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def not_served(rest: str, request: Request) -> JSONResponse:
    """Ollama's shape for the rest too (pull, embed, create, ...: shoal does not serve them)."""
    if rest in ROUTES:
        return _error(405, f"{request.method} is not allowed here: use {ROUTES[rest]}")
    served = ", ".join(f"{m} /api/{r}" for r, m in ROUTES.items())
    return _error(404, f"{request.url.path} is not served by shoal; it serves {served}")
