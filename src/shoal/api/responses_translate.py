"""The Responses API as chat completions, as pure functions over dicts: input items -> chat
messages, a chat completion -> output items, chunks -> Responses stream events
(StreamTranslator). api.responses fetches, stores and frames; this module only translates."""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from shoal.schema.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    MediaPart,
    MessageItem,
    ResponsesRequest,
    TextPart,
)
from shoal.web.errors import invalid_request

NewId = Callable[[str], str]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# ---- request: items -> chat messages -------------------------------------------------------


def refuse_unsupported(body: ResponsesRequest) -> None:
    """The options a client would notice us ignoring are refused, naming them."""
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type != "text":
        raise invalid_request(
            f"text.format type '{fmt.type}' is not supported: this node generates free text "
            "only (no structured output); send {'type': 'text'} or leave text out.",
            param="text.format.type",
            code="unsupported_value",
        )
    for i, item in enumerate(body.input):
        parts = item.content if isinstance(item, MessageItem) else getattr(item, "output", [])
        for j, part in enumerate(parts):
            if isinstance(part, MediaPart):
                where = "content" if isinstance(item, MessageItem) else "output"
                raise invalid_request(
                    f"'{part.type}' parts are not supported: this model takes text only.",
                    param=f"input[{i}].{where}[{j}]",
                    code="unsupported_content",
                )
    names = {tool.name for tool in body.tools}
    choice = body.tool_choice
    if not isinstance(choice, str) and choice.name not in names:
        raise invalid_request(
            f"tool_choice names the function '{choice.name}', which is not among the tools "
            f"({', '.join(sorted(names)) or 'none given'}).",
            param="tool_choice",
        )
    if choice == "required" and not names:
        raise invalid_request("tool_choice 'required' needs tools.", param="tool_choice")


def _text(parts: Iterable[TextPart | MediaPart]) -> str:
    # refuse_unsupported already turned media away; a stored history holds text only.
    return "\n".join(part.text for part in parts if isinstance(part, TextPart))


def chat_messages(instructions: str | None, items: Iterable[InputItem]) -> list[dict[str, Any]]:
    """Responses input items -> OpenAI chat messages.

    Function calls join the assistant turn before them (a chat assistant message carries its
    text and its tool_calls together); developer becomes system, which every chat template
    knows; instructions lead as a system message."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                if not last["content"]:
                    last["content"] = None
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)}
            )
    return messages


def chat_tools(body: ResponsesRequest) -> dict[str, Any]:
    """Responses' flat function tools and tool_choice -> the chat request's fields."""
    if not body.tools:
        return {}
    tools = []
    for tool in body.tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        if tool.strict is not None:
            function["strict"] = tool.strict
        tools.append({"type": "function", "function": function})
    choice = body.tool_choice
    return {
        "tools": tools,
        "tool_choice": choice
        if isinstance(choice, str)
        else {"type": "function", "function": {"name": choice.name}},
        "parallel_tool_calls": body.parallel_tool_calls,
    }


def chat_request(body: ResponsesRequest, history: Iterable[InputItem] = ()) -> dict[str, Any]:
    """The chat completion request that answers `body` after the stored `history`."""
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body.instructions, [*history, *body.input]),
    }
    if body.max_output_tokens is not None:
        chat["max_tokens"] = body.max_output_tokens
    if body.temperature is not None:
        chat["temperature"] = body.temperature
    if body.top_p is not None:
        chat["top_p"] = body.top_p
    return {**chat, **chat_tools(body)}


# ---- response: chat completion -> response object --------------------------------------------


def skeleton(body: ResponsesRequest, response_id: str, created_at: int) -> dict[str, Any]:
    """The response before any output: the request echo fields OpenAI's Response carries."""
    choice = body.tool_choice
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
        "tools": [tool.model_dump() for tool in body.tools],
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": body.metadata or {},
    }


def status_of(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """A chat finish_reason -> the response's status and incomplete_details."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def usage_of(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(
    message: dict[str, Any], finish_reason: str | None, make_id: NewId = new_id
) -> list[dict[str, Any]]:
    """A chat completion's message -> Responses output items: its text as a message item
    (even when empty, unless the model only called tools), then one item per tool call."""
    status = "incomplete" if finish_reason == "length" else "completed"
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    items = [message_item(make_id("msg"), text, status)] if text or not calls else []
    for call in calls:
        function = call.get("function") or {}
        items.append(
            call_item(
                make_id("fc"),
                call.get("id") or make_id("call"),
                function.get("name", ""),
                function.get("arguments") or "",
                status,
            )
        )
    return items


def finished(
    base: dict[str, Any],
    output: list[dict[str, Any]],
    finish_reason: str | None,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    status, details = status_of(finish_reason)
    return {
        **base,
        "status": status,
        "incomplete_details": details,
        "output": output,
        "usage": usage_of(usage),
    }


def response_of(
    base: dict[str, Any], completion: dict[str, Any], make_id: NewId = new_id
) -> dict[str, Any]:
    """A chat.completion -> the finished response."""
    choice = (completion.get("choices") or [{}])[0]
    reason = choice.get("finish_reason")
    output = output_items(choice.get("message") or {}, reason, make_id)
    return finished(base, output, reason, completion.get("usage"))


# ---- streaming: chunks -> events -----------------------------------------------------------


class StreamTranslator:
    """chat.completion.chunk dicts -> Responses stream events, numbered in order.

    Text opens a message item at its first non-empty delta; each tool call index opens a
    function_call item; a new item closes the one before. `finish` closes what is open and
    ends with response.completed (or response.incomplete); `fail` with error + response.failed.
    """

    def __init__(self, base: dict[str, Any], make_id: NewId = new_id) -> None:
        self.base = base
        self.make_id = make_id
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: int | None = None  # the output index of the item being written
        self.text: list[str] = []
        self.calls: dict[int, int] = {}  # chat tool call index -> its output index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.response: dict[str, Any] = {**base}

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **copy.deepcopy(fields)}
        self.sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.base),
            self._event("response.in_progress", response=self.base),
        ]

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.open = index = len(self.output)
        self.output.append(item)
        events.append(self._event("response.output_item.added", output_index=index, item=item))
        if item["type"] == "message":
            self.text = []
            part = item["content"][0]
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append(self._event("response.content_part.added", **ids, part=part))
        return events

    def _close(self) -> list[dict[str, Any]]:
        index, self.open = self.open, None
        if index is None:
            return []
        item = self.output[index]
        item["status"] = "incomplete" if self.finish_reason == "length" else "completed"
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            part["text"] = "".join(self.text)
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events += [
                self._event("response.output_text.done", **ids, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **ids, part=part),
            ]
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.open is None or self.output[self.open]["type"] != "message":
                    events += self._add(message_item(self.make_id("msg"), "", "in_progress"))
                self.text.append(delta["content"])
                events.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=self.output[self.open]["id"],
                        output_index=self.open,
                        content_index=0,
                        delta=delta["content"],
                        logprobs=[],
                    )
                )
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        function = call.get("function") or {}
        index = call.get("index", 0)
        position = self.calls.get(index)
        if position is None:
            call_id = call.get("id") or self.make_id("call")
            item = call_item(
                self.make_id("fc"), call_id, function.get("name") or "", "", "in_progress"
            )
            events += self._add(item)
            self.calls[index] = position = self.open
        item = self.output[position]
        if function.get("name") and not item["name"]:
            item["name"] = function["name"]
        arguments = function.get("arguments") or ""
        if arguments:
            item["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=position,
                    delta=arguments,
                )
            )
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The stream ended: close what is open and send the whole response."""
        if self.finish_reason is None:
            return self.fail("The model's stream ended without a finish reason.", "server_error")
        events = []
        if not self.output:  # an empty answer is still a message, as in the whole response
            events += self._add(message_item(self.make_id("msg"), "", "in_progress"))
        events += self._close()
        self.response = finished(self.base, self.output, self.finish_reason, self.usage)
        incomplete = self.response["status"] == "incomplete"
        kind = "response.incomplete" if incomplete else "response.completed"
        events.append(self._event(kind, response=self.response))
        return events

    def fail(self, message: str, code: str | None) -> list[dict[str, Any]]:
        """Headers are sent: the error travels as an `error` event, then response.failed."""
        self.response = {
            **self.base,
            "status": "failed",
            "output": self.output,
            "error": {"code": "server_error", "message": message},
        }
        return [
            self._event("error", code=code, message=message, param=None),
            self._event("response.failed", response=self.response),
        ]


def stream_events(
    base: dict[str, Any], chunks: Iterable[dict[str, Any]], make_id: NewId = new_id
) -> list[dict[str, Any]]:
    """The whole event sequence of a stream of chunks that ended normally."""
    translator = StreamTranslator(base, make_id)
    events = translator.start()
    for chunk in chunks:
        events += translator.feed(chunk)
    return events + translator.finish()


def sse_event(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
