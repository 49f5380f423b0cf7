"""Request bodies of the OpenAI Responses API (`POST /v1/responses`).

Only what the node can honour is modelled; a field it cannot honour in a way the client would
notice (images, structured output, hosted tools) is recognised so the refusal can say why,
and everything else unknown is ignored, as OpenAI's clients send options we do not implement.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag


class _Body(BaseModel):
    # Strict: a wrong JSON type is a 400, never silently coerced ("1" for an int).
    model_config = ConfigDict(strict=True, extra="ignore")


def _kind(default: str | None):
    """The `type` tag of a JSON object (or model); `default` for an object without one."""

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            kind = value.get("type", default)
            return kind if isinstance(kind, str) else None
        return getattr(value, "type", None)

    return tag


def _text_to_parts(value: Any) -> Any:
    # A string is one text part; keeping one type (a list) gives errors about the list's
    # items rather than "should be a valid string" for a malformed list.
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


def _text_to_items(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise ValueError("input must be a string or a list of input items")
    return value


# ---- content parts ---------------------------------------------------------------------------


class TextPart(_Body):
    """input_text (what users send) or output_text (an earlier answer sent back)."""

    type: Literal["input_text", "output_text"]
    text: str


class MediaPart(_Body):
    """Images, files and audio: recognised only to be refused by name."""

    type: Literal["input_image", "input_file", "input_audio"]


_Part = Annotated[
    Annotated[TextPart, Tag("input_text")]
    | Annotated[TextPart, Tag("output_text")]
    | Annotated[MediaPart, Tag("input_image")]
    | Annotated[MediaPart, Tag("input_file")]
    | Annotated[MediaPart, Tag("input_audio")],
    Discriminator(
        _kind(None),
        custom_error_type="invalid_part",
        custom_error_message="a content part must be {'type': 'input_text', 'text': ...} "
        "(or output_text, input_image, input_file, input_audio)",
    ),
]


Parts = Annotated[list[_Part], BeforeValidator(_text_to_parts)]


# ---- input items -----------------------------------------------------------------------------


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Parts


class FunctionCallItem(_Body):
    """A call the model made earlier, sent back with its output."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: Parts


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _kind("message"),  # {role, content} without a type is a message (EasyInputMessage)
        custom_error_type="invalid_item",
        custom_error_message="an input item must be a message ({'role', 'content'}), "
        "a function_call or a function_call_output",
    ),
]


# ---- tools and options -----------------------------------------------------------------------


class FunctionTool(_Body):
    """Responses' flat function tool; hosted tools (web_search, ...) fail on `type`."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: str  # any name parses, so json_schema/json_object get a refusal that names them


class TextConfig(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    model: str
    input: Annotated[list[InputItem], BeforeValidator(_text_to_items)]  # a string: one user turn
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionTool] = []
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceFunction = "auto"
    parallel_tool_calls: bool = True
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    text: TextConfig | None = None
