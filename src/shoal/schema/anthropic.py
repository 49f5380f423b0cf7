"""Request bodies of the Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`).

Strict like the OpenAI schemas: a wrong JSON type is a 400, never coerced; unknown fields
(metadata, cache_control, service_tier, ...) are ignored. Image and document blocks parse, so
the translation can refuse them by name ("this model takes text only") rather than with a
confusing "unknown tag" message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _blocks(value: Any) -> Any:
    """A bare string is shorthand for one text block."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class MediaBlock(_Body):
    """An image or document block: accepted by the schema, refused by the translation."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["image", "document"]


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ToolResultContent = Annotated[
    list[Annotated[TextBlock | MediaBlock, Field(discriminator="type")]],
    BeforeValidator(_blocks),
]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: ToolResultContent = []
    is_error: bool = False


ContentBlock = Annotated[
    TextBlock | MediaBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")
]


class Message(_Body):
    role: Literal["user", "assistant"]
    content: Annotated[list[ContentBlock], BeforeValidator(_blocks)]


class Tool(_Body):
    """A client tool; server tools (web search, code execution, ...) have another `type`."""

    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("a tool_choice of type 'tool' needs the tool's 'name'")
        return self


class CountTokensRequest(_Body):
    """What the prompt is made of: /v1/messages/count_tokens takes just this."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: Annotated[list[TextBlock], BeforeValidator(_blocks)] = []
    tools: list[Tool] = []
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] = []
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
