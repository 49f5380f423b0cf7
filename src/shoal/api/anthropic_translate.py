"""Anthropic Messages as OpenAI chat completions, as pure functions over dicts: errors in
Anthropic's shape, a request -> an OpenAI chat body, a chat completion -> a message, chunks ->
Messages stream events (StreamTranslator). api.anthropic parses, fetches and frames."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from shoal.api.upstream import UpstreamError
from shoal.schema.anthropic import (
    CountTokensRequest,
    MediaBlock,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from shoal.web.errors import RETRY_AFTER_S

Body = TypeVar("Body", bound=BaseModel)


# ---- errors ----------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (the rest: invalid request or api error)."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


class AnthropicError(Exception):
    """An error the client gets back in Anthropic's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type or error_type(status)

    @classmethod
    def of(cls, exc: UpstreamError) -> AnthropicError:
        return cls(exc.status, exc.message)

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def response(self) -> JSONResponse:
        retry = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=retry)


def invalid(message: str) -> AnthropicError:
    return AnthropicError(400, message)


def validation_message(exc: ValidationError) -> str:
    """Pydantic's first error as Anthropic words it: `messages.0.role: Input should be ...`."""
    err = exc.errors(include_url=False)[0]
    path = ".".join(str(part) for part in err["loc"])
    return f"{path}: {err['msg']}" if path else err["msg"]


def parse(model: type[Body], raw: Any) -> Body:
    if not isinstance(raw, dict):
        raise invalid("The request body must be a JSON object.")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid(validation_message(exc)) from None


# ---- request: Messages -> OpenAI chat --------------------------------------------------------


def _text_only(block: MediaBlock, where: str) -> AnthropicError:
    return invalid(f"{where}: this model takes text only; '{block.type}' blocks are not supported.")


def _joined(blocks: Iterable[TextBlock]) -> str:
    return "\n".join(b.text for b in blocks)


def _tool_text(block: ToolResultBlock, where: str) -> str:
    for k, part in enumerate(block.content):
        if isinstance(part, MediaBlock):
            raise _text_only(part, f"{where}.content.{k}")
    text = _joined(p for p in block.content if isinstance(p, TextBlock))
    # OpenAI's tool message has no error flag: the model reads that the tool failed.
    return f"Error: {text}" if block.is_error else text


def _messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _joined(body.system)})
    for i, message in enumerate(body.messages):
        for j, block in enumerate(message.content):
            if isinstance(block, MediaBlock):
                raise _text_only(block, f"messages.{i}.content.{j}")
            misplaced = (ToolResultBlock if message.role == "assistant" else ToolUseBlock,)
            if isinstance(block, misplaced):
                raise invalid(
                    f"messages.{i}.content.{j}: a {block.type} block cannot be in a "
                    f"{message.role} turn."
                )
        if message.role == "assistant":
            text = _joined(b for b in message.content if isinstance(b, TextBlock))
            calls = [
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": json.dumps(b.input)},
                }
                for b in message.content
                if isinstance(b, ToolUseBlock)
            ]
            turn: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                turn["tool_calls"] = calls
            out.append(turn)
            continue
        # A user turn: tool results become tool messages, text between them user messages,
        # in their order (Anthropic puts the results first, as OpenAI needs them right after
        # the assistant's tool calls).
        texts: list[TextBlock] = []
        for j, block in enumerate(message.content):
            if isinstance(block, TextBlock):
                texts.append(block)
                continue
            assert isinstance(block, ToolResultBlock)
            if texts:
                out.append({"role": "user", "content": _joined(texts)})
                texts = []
            content = _tool_text(block, f"messages.{i}.content.{j}")
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        if texts or not message.content:
            out.append({"role": "user", "content": _joined(texts)})
    if body.messages[-1].role == "assistant":
        # The runner's chat template opens a new assistant turn after the messages: it
        # cannot continue a prefilled one, so say so rather than answer something else.
        raise invalid(
            f"messages.{len(body.messages) - 1}: the last message must be a user turn; "
            "this model does not support assistant message prefill."
        )
    return out


def _tools(body: CountTokensRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if body.tools:
        fields["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description is not None else {}),
                    "parameters": t.input_schema,
                },
            }
            for t in body.tools
        ]
    choice = body.tool_choice
    if choice is None:
        return fields
    names = {t.name for t in body.tools}
    if choice.type in ("any", "tool") and not names:
        raise invalid(f"tool_choice: type '{choice.type}' needs tools.")
    if choice.type == "tool" and choice.name not in names:
        raise invalid(f"tool_choice.name: no tool named '{choice.name}' in tools.")
    if choice.type == "tool":
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use and body.tools:
        fields["parallel_tool_calls"] = False
    return fields


def to_openai(body: CountTokensRequest, max_tokens: int | None = None) -> dict[str, Any]:
    """The OpenAI chat request that asks the model what `body` asks (without `stream`)."""
    chat: dict[str, Any] = {"model": body.model, "messages": _messages(body), **_tools(body)}
    if isinstance(body, MessagesRequest):
        chat["max_tokens"] = body.max_tokens
        if body.stop_sequences:
            chat["stop"] = list(body.stop_sequences)
        for name in ("temperature", "top_p", "top_k"):
            if (value := getattr(body, name)) is not None:
                chat[name] = value
    if max_tokens is not None:
        chat["max_tokens"] = max_tokens
    return chat


# ---- response: OpenAI chat -> Messages -------------------------------------------------------


def stop_reason(
    finish_reason: str | None,
    has_tool_calls: bool,
    matched: Any = None,
    stop_sequences: Iterable[str] = (),
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for an OpenAI finish.

    A stop sequence is named only when the upstream says which one matched (vLLM's
    `stop_reason` field on the choice); the runner's bare "stop" cannot tell a stop sequence
    from the end of the turn, so it is end_turn. OpenAI says "stop" after a forced tool call,
    Anthropic says tool_use whenever the answer holds one."""
    if finish_reason == "length":
        return "max_tokens", None
    if has_tool_calls or finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "content_filter":
        return "refusal", None
    if finish_reason == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def tool_input(arguments: str | None, name: str) -> dict[str, Any]:
    """A tool call's arguments (a JSON string) as the object Anthropic's `input` is."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise AnthropicError(
            500, f"The model's call of tool '{name}' has arguments that are not a JSON object."
        )
    return value


def usage_of(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {
        "input_tokens": int(usage.get("prompt_tokens") or 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
    }


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def to_message(
    completion: dict[str, Any],
    model: str,
    stop_sequences: Iterable[str] = (),
    id: str | None = None,
) -> dict[str, Any]:
    """One chat.completion as one Anthropic message."""
    choice = (completion.get("choices") or [{}])[0]
    answer = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if answer.get("content"):
        content.append({"type": "text", "text": answer["content"]})
    calls = answer.get("tool_calls") or []
    for call in calls:
        function = call.get("function") or {}
        name = str(function.get("name") or "")
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                "name": name,
                "input": tool_input(function.get("arguments"), name),
            }
        )
    reason, sequence = stop_reason(
        choice.get("finish_reason"), bool(calls), choice.get("stop_reason"), stop_sequences
    )
    return {
        "id": id or new_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_of(completion.get("usage")),
    }


class StreamTranslator:
    """chat.completion.chunk dicts in, Messages stream events (dicts with `type`) out.

    Anthropic's blocks come one after another: a text block opens at the first text, a
    tool_use block at the first delta of each OpenAI tool call index (id and name), and each
    closes when the next opens or the message ends. message_start carries the usage fed so
    far (the input tokens, when the upstream's first chunk had usage), message_delta the
    final input and output counts (cumulative totals clients overwrite theirs with)."""

    def __init__(self, model: str, stop_sequences: Iterable[str] = (), id: str | None = None):
        self.model, self.stop_sequences, self.id = model, tuple(stop_sequences), id or new_id()
        self.blocks = 0  # content blocks opened so far
        self.open: tuple[str, int] | None = None  # ("text", -1) or ("tool", openai index)
        self.tool_blocks: dict[int, int] = {}  # OpenAI tool call index -> block index
        self.finish: str | None = None
        self.matched: Any = None
        self.usage: dict[str, Any] | None = None

    def start(self) -> list[dict[str, Any]]:
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage_of(self.usage), "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}]

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.blocks - 1}]

    def _open(self, kind: tuple[str, int], block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.open = kind
        events.append({"type": "content_block_start", "index": self.blocks, "content_block": block})
        self.blocks += 1
        return events

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if text := delta.get("content"):
                if self.open != ("text", -1):
                    events += self._open(("text", -1), {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": text}))
            for call in delta.get("tool_calls") or []:
                events += self._tool_delta(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                self.matched = choice.get("stop_reason")
        return events

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> dict[str, Any]:
        at = self.blocks - 1 if index is None else index
        return {"type": "content_block_delta", "index": at, "delta": delta}

    def _tool_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = int(call.get("index") or 0)
        function = call.get("function") or {}
        if index not in self.tool_blocks:
            self.tool_blocks[index] = self.blocks
            block = {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                "name": function.get("name") or "",
                "input": {},
            }
            events += self._open(("tool", index), block)
        if arguments := function.get("arguments"):
            # A call whose block already closed (indices interleaved) still names its block.
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(self._delta(delta, self.tool_blocks[index]))
        return events

    def end(self) -> list[dict[str, Any]]:
        """The closing events, once the upstream stream ended (usage is in its last chunk)."""
        if self.finish is None:
            raise AnthropicError(500, "The model's stream ended without a finish reason.")
        reason, sequence = stop_reason(
            self.finish, bool(self.tool_blocks), self.matched, self.stop_sequences
        )
        usage = usage_of(self.usage)
        return [
            *self._close(),
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": usage,
            },
            {"type": "message_stop"},
        ]


def stream_events(
    chunks: Iterable[dict[str, Any]], model: str, stop_sequences: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """A whole streamed completion's chunks as the Messages events a client receives."""
    translator = StreamTranslator(model, stop_sequences)
    events = translator.start()
    for chunk in chunks:
        events += translator.feed(chunk)
    try:
        return events + translator.end()
    except AnthropicError as exc:
        return [*events, exc.body()]


def frame(event: dict[str, Any]) -> str:
    """One server-sent event with Anthropic's `event:` name (its `type`)."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
