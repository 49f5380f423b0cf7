"""Ollama's API bodies (/api/chat, /api/generate, /api/show) and their translation to and from
the OpenAI chat and text completions the model's rank 0 serves.

Everything here is pure: api.ollama feeds it parsed bodies and OpenAI chunks, and renders the
Ollama lines it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from shoal.schema.report import HeldModel

TEXT_ONLY = "this model takes text only: images are not supported"


class Refused(ValueError):
    """Input shoal cannot serve as asked: a 400 whose message says what to change."""


class _Body(BaseModel):
    # Strict: a wrong JSON type is a 400, never coerced; unknown fields (Ollama's many load
    # options, keep_alive, think, ...) are ignored as Ollama ignores what it does not use.
    model_config = ConfigDict(strict=True, extra="ignore")


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _or(default: Any) -> BeforeValidator:
    """A JSON null means the default, as in Ollama (its Go fields are pointers)."""
    return BeforeValidator(lambda v: default() if v is None else v)


class Options(_Body):
    """The `options` Ollama applies per request; the ones shoal's sampler has are mapped."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = Field(None, ge=-2)  # -1: no limit, -2: fill the context
    stop: Annotated[list[str] | None, BeforeValidator(_stop_list)] = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None  # the served context is fixed when the model is placed


class ToolCallFunction(_Body):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(_Body):
    function: ToolCallFunction


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None  # which tool a role "tool" message answers


class ToolFunction(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: ToolFunction


class _Generation(_Body):
    model: str = Field(min_length=1)
    stream: Annotated[bool, _or(lambda: True)] = True  # Ollama streams unless told not to
    format: str | dict[str, Any] | None = None
    options: Annotated[Options, _or(dict)] = Field(default_factory=Options)


class ChatRequest(_Generation):
    messages: Annotated[list[Message], _or(list)] = Field(default_factory=list)
    tools: Annotated[list[Tool], _or(list)] = Field(default_factory=list)


class GenerateRequest(_Generation):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None


class ShowRequest(_Body):
    model: str | None = None
    name: str | None = None  # the older spelling Ollama still accepts

    @property
    def wanted(self) -> str:
        return self.model or self.name or ""


# ---- requests: Ollama -> OpenAI ---------------------------------------------------------------


def check_format(format: str | dict[str, Any] | None) -> None:
    """Structured output needs constrained decoding, which shoal's sampler does not do yet:
    a request for it is refused rather than answered with unconstrained text."""
    if format in (None, ""):
        return
    kind = (
        "JSON mode" if format == "json" else "a JSON schema" if isinstance(format, dict) else None
    )
    if kind is None:
        raise Refused(f"format must be 'json', a JSON schema or empty, not {format!r}")
    raise Refused(
        f"format ({kind}) is not supported: shoal does not constrain decoding yet; "
        "leave format out and ask for JSON in the prompt"
    )


def check_generate(body: GenerateRequest) -> None:
    """What /api/generate cannot serve, refused by name instead of dropped."""
    check_format(body.format)
    if body.images:
        raise Refused(TEXT_ONLY)
    if body.suffix:
        raise Refused("suffix (fill-in-the-middle) is not supported")
    if body.template:
        raise Refused("template overrides are not supported: the model's chat template applies")
    if body.context:
        raise Refused("context (token history) is not supported: send the history with /api/chat")


_SAME = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty")


def openai_sampling(options: Options, unlimited: int | None = None) -> dict[str, Any]:
    """Ollama's options as OpenAI request fields. num_predict <= 0 (Ollama: -1 no limit, -2
    fill the context) sends no max_tokens, or `unlimited` where the endpoint's default is a
    cap (text completions stop at 16 tokens unless told)."""
    out: dict[str, Any] = {k: v for k in _SAME if (v := getattr(options, k)) is not None}
    if options.repeat_penalty is not None:
        out["repetition_penalty"] = options.repeat_penalty
    if options.stop:
        out["stop"] = list(options.stop)
    if options.num_predict is not None and options.num_predict > 0:
        out["max_tokens"] = options.num_predict
    elif unlimited:
        out["max_tokens"] = unlimited
    return out


def openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI's. Ollama's tool calls carry no ids: each gets one here, and a
    role "tool" message answers the oldest unanswered call (of its tool_name, when given)."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    made = 0
    for i, message in enumerate(messages):
        if message.images:
            raise Refused(TEXT_ONLY)
        if message.role == "tool":
            match = next(
                (c for c in pending if message.tool_name in (None, c[1])),
                None,
            )
            if match is None:
                wanted = f" for '{message.tool_name}'" if message.tool_name else ""
                raise Refused(
                    f"messages[{i}]: a tool message{wanted} must answer a tool call of an "
                    "earlier assistant message"
                )
            pending.remove(match)
            out.append({"role": "tool", "tool_call_id": match[0], "content": message.content})
        elif message.role == "assistant" and message.tool_calls:
            calls = []
            for call in message.tool_calls:
                call_id = f"call_{made}"
                made += 1
                pending.append((call_id, call.function.name))
                arguments = json.dumps(call.function.arguments)
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            out.append(
                {"role": "assistant", "content": message.content or None, "tool_calls": calls}
            )
        else:
            out.append({"role": message.role, "content": message.content})
    return out


def openai_tools(tools: list[Tool]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools]


# ---- answers: OpenAI -> Ollama ----------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """What one OpenAI chunk (chat or text completion) adds to the answer."""

    text: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()  # delta.tool_calls fragments
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


def part_of(chunk: dict[str, Any]) -> Part:
    usage = chunk.get("usage")
    choices = chunk.get("choices") or []
    if not choices:
        return Part(usage=usage)
    choice = choices[0]
    delta = choice.get("delta")
    if delta is None:  # a text completion's chunk
        return Part(choice.get("text") or "", (), choice.get("finish_reason"), usage)
    return Part(
        delta.get("content") or "",
        tuple(delta.get("tool_calls") or ()),
        choice.get("finish_reason"),
        usage,
    )


def ollama_tool_calls(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    """OpenAI's calls ({name, arguments: JSON text}) in Ollama's shape (arguments an object)."""
    out = []
    for call in calls:
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ValueError(
                f"the model called '{call['name']}' with arguments that are not a JSON object: "
                f"{call['arguments']!r}"
            )
        out.append({"function": {"name": call["name"], "arguments": arguments}})
    return out


def done_reason(finish_reason: str | None) -> str:
    """Ollama ends a tool-calling turn with "stop" too; "length" is the token limit."""
    return "length" if finish_reason == "length" else "stop"


@dataclass
class Answer:
    """One answer being assembled from Parts, with its timing (perf_counter ns): `started`
    when the request arrived, `first` when the first token came back, `ended` at the end."""

    started: int
    text: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    first: int | None = None
    ended: int | None = None

    def feed(self, part: Part, now: int) -> None:
        if self.first is None and (part.text or part.tool_calls or part.finish_reason):
            self.first = now
        self.text.append(part.text)
        for fragment in part.tool_calls:
            call = self.calls.setdefault(
                fragment.get("index", len(self.calls)), {"name": "", "arguments": ""}
            )
            function = fragment.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
        self.finish_reason = part.finish_reason or self.finish_reason
        self.usage = part.usage or self.usage
        self.ended = now

    def tool_calls(self) -> list[dict[str, Any]]:
        return ollama_tool_calls([self.calls[i] for i in sorted(self.calls)])

    def stats(self) -> dict[str, Any]:
        """The final line's counts and durations (ns). The model is resident, so nothing is
        loaded per request; prompt evaluation is the wait for the first token."""
        ended = self.ended if self.ended is not None else self.started
        first = self.first if self.first is not None else ended
        return {
            "done_reason": done_reason(self.finish_reason),
            "total_duration": ended - self.started,
            "load_duration": 0,
            "prompt_eval_count": int(self.usage.get("prompt_tokens", 0)),
            "prompt_eval_duration": first - self.started,
            "eval_count": int(self.usage.get("completion_tokens", 0)),
            "eval_duration": ended - first,
        }


def rfc3339(timestamp: float | None = None) -> str:
    """Ollama's timestamps: UTC, RFC 3339 with a Z."""
    moment = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def parameter_size(count: int) -> str:
    """A parameter count as Ollama writes it (format.HumanNumber): 7B, 7.6B, 134.52M, 500K."""
    if count <= 0:
        return ""
    for scale, unit, decimals in ((10**9, "B", 1), (10**6, "M", 2)):
        if count >= scale:
            number = count / scale
            return f"{number:.0f}{unit}" if number.is_integer() else f"{number:.{decimals}f}{unit}"
    return f"{count / 1000:.0f}K" if count >= 1000 else str(count)


# ---- models: what /api/tags, /api/show and /api/ps report --------------------------------------


@dataclass(frozen=True)
class FileFacts:
    """Read from the model's files: what Ollama's details and model_info report."""

    format: str = ""
    parameter_count: int = 0
    quantization: str = ""
    template: str = ""
    license: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFacts:
    held: HeldModel | None = None
    path: str = ""
    disk_bytes: int = 0
    modified: float | None = None
    files: FileFacts = FileFacts()

    @property
    def digest(self) -> str:
        """Of its files' paths and sizes (what placement compares across nodes)."""
        return (self.held.files_digest or "") if self.held else ""

    @property
    def family(self) -> str:
        return self.held.arch if self.held else ""

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.files.format,
            "family": self.family,
            "families": [self.family] if self.family else None,
            "parameter_size": parameter_size(self.files.parameter_count),
            "quantization_level": self.files.quantization,
        }

    def model_info(self) -> dict[str, Any]:
        held, info = self.held, dict(self.files.info)
        if held is not None and held.arch:
            arch = held.arch
            info.setdefault("general.architecture", arch)
            for key, value in (
                ("context_length", held.context_length),
                ("embedding_length", held.hidden_size),
                ("block_count", held.num_layers),
                ("attention.head_count", held.num_heads),
                ("attention.head_count_kv", held.num_kv_heads),
            ):
                info.setdefault(f"{arch}.{key}", value)
        if self.files.parameter_count:
            info["general.parameter_count"] = self.files.parameter_count
        return info
