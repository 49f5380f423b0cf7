"""The caps on one generation request, in one place for every API shape.

Every API (OpenAI chat and text completions, Anthropic Messages, OpenAI Responses, Ollama)
reaches a model as an OpenAI chat or text completion body: the OpenAI routes check their
parsed body, the others the body they translated to (api.upstream), each answering the
refusal in its own error shape. `Fields` names the capped fields as the client's API calls
them, so the message points at what the client sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_CLIENT_TIMEOUT_S = 60.0  # for a request's head, then for its body
DEFAULT_MAX_TOKENS_CAP = 65536  # above Claude Code's 32000/64000 asks; the context bounds too
DEFAULT_MAX_MESSAGES = 2048
DEFAULT_MAX_PROMPT_CHARS = 2_000_000  # ~500k tokens of English


@dataclass(frozen=True)
class RequestLimits:
    max_tokens: int = DEFAULT_MAX_TOKENS_CAP
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS


@dataclass(frozen=True)
class Fields:
    """How the client's API names the capped fields."""

    max_tokens: str = "max_tokens"
    messages: str = "messages"
    prompt: str = "messages"  # where the prompt's text is


OPENAI = Fields()
COMPLETIONS = Fields(prompt="prompt")
RESPONSES = Fields("max_output_tokens", "input", "input")
OLLAMA = Fields("options.num_predict", "messages", "messages")
OLLAMA_GENERATE = Fields("options.num_predict", "messages", "prompt")


@dataclass(frozen=True)
class OverLimit:
    """Why a request is refused (a 400): the field, a code, and a message naming the flag."""

    param: str
    code: str
    message: str


def text_chars(value: Any) -> int:
    """Characters of every string in a message (its content, parts, tool-call arguments)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(text_chars(v) for v in value)
    return 0


def _message_chars(message: Any) -> int:
    if not isinstance(message, Mapping):
        return 0
    return text_chars(message.get("content")) + text_chars(message.get("tool_calls"))


def over_limit(
    limits: RequestLimits, body: Mapping[str, Any], fields: Fields = OPENAI
) -> OverLimit | None:
    """The first cap an OpenAI chat (`messages`) or text completion (`prompt`) body breaks."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list | tuple) else []
    if len(messages) > limits.max_messages:
        return OverLimit(
            fields.messages,
            "too_many_messages",
            f"'{fields.messages}' holds {len(messages)} messages, over this node's cap of "
            f"{limits.max_messages} (--max-messages); send at most {limits.max_messages}.",
        )
    asked = [body.get(k) for k in ("max_completion_tokens", "max_tokens")]
    most = max((n for n in asked if isinstance(n, int) and not isinstance(n, bool)), default=0)
    if most > limits.max_tokens:
        return OverLimit(
            fields.max_tokens,
            "max_tokens_too_large",
            f"'{fields.max_tokens}' is {most}, over this node's cap of {limits.max_tokens} "
            f"output tokens (--max-tokens-cap); ask for {limits.max_tokens} or fewer.",
        )
    chars = sum(_message_chars(m) for m in messages) + text_chars(body.get("prompt"))
    if chars > limits.max_prompt_chars:
        return OverLimit(
            fields.prompt,
            "prompt_too_long",
            f"The prompt in '{fields.prompt}' is {chars} characters, over this node's cap of "
            f"{limits.max_prompt_chars} (--max-prompt-chars); shorten it.",
        )
    return None
