"""Tool calling as text: how tools and tool messages reach a model's chat template, and how
the calls a model writes are found in its output.

Three formats cover the supported families: Hermes/Qwen (`<tool_call>{json}</tool_call>`),
Llama 3 (a bare `{"name": ..., "parameters": ...}` object, or after `<|python_tag|>`) and
Mistral (`[TOOL_CALLS] [{"name": ..., "arguments": ...}]`). A template that renders `tools`
itself gets them; one that does not (SmolLM2's) gets them as a Hermes-style system message,
its tool results as user turns: the model reads the same words either way. Output that does
not parse as calls stays text: a small model's malformed call is its answer, never a 500.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)
    id: str = ""

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def tool_format(chat_template: str | None) -> str:
    """The call format a model was trained on, read from its chat template."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template  # type: ignore[operator]


# ---- into the prompt -------------------------------------------------------------------------


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    """Hermes-style tool instructions, for templates that do not render `tools`."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You can call functions to help with the user's request. The functions, as JSON "
        f"schemas:\n<tools>\n{listed}\n</tools>\n"
        "To call one, answer with a JSON object naming the function and its arguments inside "
        "<tool_call></tool_call> tags, one per call:\n"
        '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>'
    )


def template_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, renders_tools: bool
) -> list[dict[str, Any]]:
    """OpenAI chat messages as a chat template takes them: `developer` as system, null content
    as "", and, for a template that knows no tools, tool calls and results written out as text
    (the tools themselves as a system message)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content") or ""
        if renders_tools:
            message = {"role": role, "content": content}
            if m.get("tool_calls"):
                message["tool_calls"] = [_template_call(c) for c in m["tool_calls"]]
            if m.get("tool_call_id"):
                message["tool_call_id"] = m["tool_call_id"]
            if m.get("name"):
                message["name"] = m["name"]
            out.append(message)
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps(_template_call(c)["function"]) + "\n</tool_call>"
                for c in m["tool_calls"]
            )
            out.append({"role": role, "content": f"{content}\n{calls}".strip()})
        else:
            out.append({"role": role, "content": content})
    if tools and not renders_tools:
        instructions = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instructions}".strip()}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """A call as templates read it: arguments as an object (Qwen's, Llama's do `| tojson`)."""
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"])
    except (TypeError, ValueError):
        arguments = function["arguments"]
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def forced_prefix(fmt: str, tool_choice: Any) -> str:
    """Text the answer starts with so the model must call (`required`) or call a named tool:
    prefilled after the generation prompt, and given back to the parser with the output."""
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if tool_choice != "required" and name is None:
        return ""
    if fmt == MISTRAL:
        return "[TOOL_CALLS]" + (f' [{{"name": {json.dumps(name)}, "arguments": ' if name else "")
    if fmt == LLAMA3:
        return f'{{"name": {json.dumps(name)}, "parameters": ' if name else ""
    return "<tool_call>\n" + (f'{{"name": {json.dumps(name)}, "arguments": ' if name else "")


# ---- out of the output -----------------------------------------------------------------------

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    """(the text before the calls, the calls) if `text` holds well-formed calls in `fmt`,
    else (text, [])."""
    if fmt == MISTRAL:
        head, marker, rest = text.partition("[TOOL_CALLS]")
        calls = _calls_from(_json_prefix(rest.strip())) if marker else None
    elif fmt == LLAMA3:
        head, marker, rest = text.partition("<|python_tag|>")
        if not marker:
            head, rest = "", text
        calls = _calls_from(_json_prefix(rest.strip()))
    else:
        head, marker, _ = text.partition("<tool_call>")
        bodies = _HERMES_CALL.findall(text) if marker else []
        parsed = [_json_prefix(b) for b in bodies]
        calls = None if not parsed or None in parsed else _calls_from(parsed)
    if not calls:
        return text, []
    return head.strip(), calls


def _json_prefix(text: str) -> Any:
    """The JSON value at the start of `text` (trailing words, e.g. a second call, ignored)."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return value


def _calls_from(value: Any) -> list[ToolCall] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


# ---- while streaming -------------------------------------------------------------------------

_MARKERS = {HERMES: ("<tool_call>",), MISTRAL: ("[TOOL_CALLS]",), LLAMA3: ("<|python_tag|>", "{")}


class ToolStream:
    """Streams text until a call may be starting, then holds everything for `finish`.

    A marker split across chunks is held back as it arrives (as stop strings are); Llama 3's
    bare JSON call counts only at the start of the answer."""

    def __init__(self, fmt: str, prefix: str = "") -> None:
        self.fmt = fmt
        self._text = prefix  # everything generated so far, the forced prefix included
        self._sent = 0  # _text[:_sent] went out as content
        self._holding = bool(prefix)
        self._held_at = 0  # where the call (or the forced prefix) begins in _text

    def feed(self, chunk: str) -> str:
        """The part of `chunk` that is content for sure."""
        self._text += chunk
        if self._holding:
            return ""
        pending = self._text[self._sent :]
        for marker in _MARKERS[self.fmt]:
            at = pending.find(marker)
            bare_json = marker == "{"
            if at >= 0 and (not bare_json or not self._text[: self._sent + at].strip()):
                self._holding, self._held_at = True, self._sent + at
                return self._emit(self._held_at)
        keep = max(_partial_marker(pending, m) for m in _MARKERS[self.fmt] if m != "{")
        if self.fmt == LLAMA3 and not self._text.strip():
            keep = len(pending)  # the answer has not started: it may be a bare call
        return self._emit(len(self._text) - keep)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet sent, the calls) at the end of the generation."""
        if self._holding:
            _, calls = parse_tool_calls(self._text[self._held_at :], self.fmt)
            if calls:
                return "", calls
        return self._text[self._sent :], []

    def _emit(self, upto: int) -> str:
        out, self._sent = self._text[self._sent : upto], max(self._sent, upto)
        return out


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
