"""Request and response bodies of the OpenAI-compatible API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _text_content(value: Any) -> Any:
    """A message's content: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if not isinstance(value, list):
        return value  # strings pass; anything else fails as "should be a valid string"
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError(
                "content parts must be {'type': 'text', 'text': ...}; only text is supported"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError("a text part needs a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


def _stop_list(value: Any) -> Any:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


class _Request(BaseModel):
    # Strict: a wrong JSON type is a 400, never silently coerced ("1" for an int). Unknown
    # fields are ignored, as clients send OpenAI options we do not implement (user, ...).
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class Sampling(_Request):
    """Sampling options shared by chat and text completions."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extension (vLLM, llama.cpp): 0 = no limit
    min_p: float = Field(0.0, ge=0, le=1)  # extension
    max_tokens: int | None = Field(None, ge=1)
    stop: Annotated[tuple[str, ...], BeforeValidator(_stop_list)] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # extension: generate exactly max_tokens (benchmarks)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_text_content)]


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name of max_tokens


class CompletionRequest(Sampling):
    prompt: str


# ---- responses -----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    # A delta carries only what changed: role in the first chunk, content after it.
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=lambda v: v is None)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    """Both the whole answer and, with object "text_completion" too, each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=lambda v: v is None)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shoal"
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
