"""Anthropic Messages (`/v1/messages`, `/v1/messages/count_tokens`): the translation as tables,
then the real `anthropic` client against a live node (bundled SmolLM2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from shoal.api import anthropic as an
from shoal.api import anthropic_translate as at
from shoal.api.upstream import UpstreamError
from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL
from shoal.schema.anthropic import CountTokensRequest, MessagesRequest

from conftest import LiveServer

pytestmark = pytest.mark.timeout(180)  # the first e2e test also waits for the model's warm-up

FRANCE = "What is the capital of France?"
EVENTS = TypeAdapter(RawMessageStreamEvent)  # the client's own union of stream event types
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
# The 135M model writes a clean call within 24 tokens when the words name the arguments.
CALL_PARIS = 'Call get_weather with {"city": "Paris"}.'
OPENAI_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": WEATHER_TOOL["input_schema"],
    },
}


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 8, "messages": [_user(FRANCE)], **fields}


# ---- request: Messages -> OpenAI chat --------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        (  # the plainest request: a string, max_tokens, nothing else sent
            {},
            {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": FRANCE}]},
        ),
        (  # system as a string, sampling and stop sequences; metadata ignored
            {
                "system": "Be brief.",
                "temperature": 0,
                "top_p": 0.5,
                "top_k": 3,
                "stop_sequences": ["\n\n", "END"],
                "metadata": {"user_id": "u1"},
            },
            {
                "model": MODEL,
                "max_tokens": 8,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": FRANCE},
                ],
                "temperature": 0,
                "top_p": 0.5,
                "top_k": 3,
                "stop": ["\n\n", "END"],
            },
        ),
        (  # system and content as text blocks (cache_control ignored), joined by lines
            {
                "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                "messages": [
                    _user([{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]),
                    {"role": "assistant", "content": [{"type": "text", "text": "y"}]},
                    _user([{"type": "text", "text": "z1"}, {"type": "text", "text": "z2"}]),
                ],
            },
            {
                "model": MODEL,
                "max_tokens": 8,
                "messages": [
                    {"role": "system", "content": "A\nB"},
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z1\nz2"},
                ],
            },
        ),
    ],
)
def test_request_translates_to_an_openai_chat(fields: dict, expected: dict) -> None:
    assert at.to_openai(at.parse(MessagesRequest, _body(**fields))) == expected


def test_tool_use_and_results_become_tool_calls_and_tool_messages() -> None:
    body = _body(
        messages=[
            _user("Weather in Paris and Rome?"),
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "P"}},
                    {"type": "tool_use", "id": "t2", "name": "get_weather", "input": {}},
                ],
            },
            _user(
                [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "Thanks; summarize."},
                ]
            ),
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t3", "name": "n", "input": {"a": [1]}}],
            },
            _user([{"type": "tool_result", "tool_use_id": "t3"}]),
        ],
        tools=[WEATHER_TOOL, {"name": "n", "input_schema": {"type": "object"}}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )

    def call(id: str, name: str, arguments: dict) -> dict:
        return {
            "id": id,
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }

    chat = at.to_openai(at.parse(MessagesRequest, body))
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                call("t1", "get_weather", {"city": "P"}),
                call("t2", "get_weather", {}),
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: no such city"},
        {"role": "user", "content": "Thanks; summarize."},
        {"role": "assistant", "content": None, "tool_calls": [call("t3", "n", {"a": [1]})]},
        {"role": "tool", "tool_call_id": "t3", "content": ""},
    ]
    assert chat["tools"] == [
        OPENAI_WEATHER_TOOL,
        {"type": "function", "function": {"name": "n", "parameters": {"type": "object"}}},
    ]
    assert chat["tool_choice"] == "auto" and chat["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    "choice, expected",
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
def test_tool_choice_translates(choice: dict, expected: Any) -> None:
    chat = at.to_openai(at.parse(MessagesRequest, _body(tools=[WEATHER_TOOL], tool_choice=choice)))
    assert chat["tool_choice"] == expected and chat["tools"] == [OPENAI_WEATHER_TOOL]
    assert "parallel_tool_calls" not in chat


def test_count_tokens_asks_for_one_greedy_token_of_the_same_prompt() -> None:
    raw = {"model": MODEL, "system": "S", "messages": [_user(FRANCE)], "tools": [WEATHER_TOOL]}
    chat = at.to_openai(at.parse(CountTokensRequest, raw), max_tokens=1)
    full = at.to_openai(at.parse(MessagesRequest, {**raw, "max_tokens": 99}))
    assert chat == {**full, "max_tokens": 1}


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"max_tokens": "8"}, "max_tokens: Input should be a valid integer"),
        ({"model": None}, "model: Field required"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role: Input should be"),
        ({"messages": [_user(5)]}, "messages.0.content: Input should be a valid list"),
        ({"messages": [_user([{"type": "text"}])]}, "messages.0.content.0.text.text: Field"),
        ({"messages": [_user([{"type": "audio"}])]}, "messages.0.content.0: Input tag 'audio'"),
        (
            {"messages": [_user([{"type": "image", "source": {"type": "base64", "data": "x"}}])]},
            "messages.0.content.0: this model takes text only; 'image' blocks",
        ),
        (
            {"messages": [_user([{"type": "document", "source": {}}])]},
            "messages.0.content.0: this model takes text only; 'document' blocks",
        ),
        (
            {
                "messages": [
                    _user(
                        [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "image", "source": {}}],
                            }
                        ]
                    )
                ]
            },
            "messages.0.content.0.content.0: this model takes text only",
        ),
        (
            {"messages": [_user([{"type": "tool_use", "id": "t", "name": "n", "input": {}}])]},
            "messages.0.content.0: a tool_use block cannot be in a user turn",
        ),
        (
            {"messages": [_user("a"), {"role": "assistant", "content": "The answer is"}]},
            "messages.1: the last message must be a user turn",
        ),
        ({"temperature": 1.5}, "temperature: Input should be less than or equal to 1"),
        ({"temperature": "0"}, "temperature: Input should be a valid number"),
        ({"stop_sequences": "END"}, "stop_sequences: Input should be a valid list"),
        ({"stream": "yes"}, "stream: Input should be a valid boolean"),
        ({"system": 3}, "system: Input should be a valid list"),
        ({"tools": [{"name": "x"}]}, "tools.0.input_schema: Field required"),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "input_schema": {}}]},
            "tools.0.type: Input should be 'custom'",
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice: type 'any' needs tools"),
        ({"tool_choice": {"type": "tool"}}, "a tool_choice of type 'tool' needs the tool's 'name'"),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "other"}},
            "tool_choice.name: no tool named 'other' in tools",
        ),
    ],
)
def test_bad_requests_are_400s_naming_the_field(fields: dict, words: str) -> None:
    raw = {k: v for k, v in _body(**fields).items() if v is not None}
    with pytest.raises(at.AnthropicError) as caught:
        at.to_openai(at.parse(MessagesRequest, raw))
    assert caught.value.status == 400 and caught.value.type == "invalid_request_error"
    assert words in caught.value.message


@pytest.mark.parametrize("raw", [[], "x", None, 3])
def test_a_body_that_is_not_an_object_is_a_400(raw: Any) -> None:
    with pytest.raises(at.AnthropicError, match="must be a JSON object"):
        at.parse(MessagesRequest, raw)


# ---- response: OpenAI chat -> Messages -------------------------------------------------------


@pytest.mark.parametrize(
    "finish, tools, matched, reason",
    [
        ("stop", False, None, ("end_turn", None)),
        ("stop", False, "END", ("stop_sequence", "END")),  # vLLM names the matched stop
        ("stop", False, "NOT-ASKED", ("end_turn", None)),
        ("stop", False, 2, ("end_turn", None)),  # a stop token id is the end of the turn
        ("length", False, None, ("max_tokens", None)),
        ("length", True, None, ("max_tokens", None)),  # a call cut off is still max_tokens
        ("tool_calls", True, None, ("tool_use", None)),
        ("stop", True, None, ("tool_use", None)),  # OpenAI's "stop" after a forced call
        ("content_filter", False, None, ("refusal", None)),
        (None, False, None, ("end_turn", None)),
    ],
)
def test_finish_reasons_map_to_stop_reasons(
    finish: str | None, tools: bool, matched: Any, reason: tuple
) -> None:
    assert at.stop_reason(finish, tools, matched, ["END", "\n\n"]) == reason


def _completion(message: dict, finish: str, prompt: int = 7, completion: int = 3) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


@pytest.mark.parametrize(
    "message, finish, content, reason",
    [
        (
            {"role": "assistant", "content": "Paris."},
            "stop",
            [{"type": "text", "text": "Paris."}],
            "end_turn",
        ),
        (
            {"role": "assistant", "content": "The capital"},
            "length",
            [{"type": "text", "text": "The capital"}],
            "max_tokens",
        ),
        ({"role": "assistant", "content": ""}, "stop", [], "end_turn"),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "n", "arguments": ""},
                    },
                ],
            },
            "tool_calls",
            [
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "call_2", "name": "n", "input": {}},
            ],
            "tool_use",
        ),
        (
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "n", "arguments": "{}"}}
                ],
            },
            "stop",
            [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "c", "name": "n", "input": {}},
            ],
            "tool_use",
        ),
    ],
)
def test_completion_translates_to_a_message(
    message: dict, finish: str, content: list, reason: str
) -> None:
    out = at.to_message(_completion(message, finish), "my-model", id="msg_1")
    assert out == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "my-model",
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 3},
    }
    Message.model_validate(out)  # the client's own type accepts it
    assert at.to_message(_completion(message, finish), "m")["id"].startswith("msg_")


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
def test_tool_arguments_that_are_not_an_object_are_an_api_error(arguments: str) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "n", "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    with pytest.raises(at.AnthropicError) as caught:
        at.to_message(_completion(message, "tool_calls"), "m")
    assert caught.value.status == 500 and caught.value.type == "api_error"


@pytest.mark.parametrize(
    "status, type",
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
    ],
)
def test_upstream_statuses_map_to_error_types(status: int, type: str) -> None:
    error = at.AnthropicError.of(UpstreamError(status, "why"))
    assert error.status == status
    assert error.body() == {"type": "error", "error": {"type": type, "message": "why"}}


# ---- streaming: chunks -> events -------------------------------------------------------------


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None):
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "object": "chat.completion.chunk",
        "choices": choices,
        **({"usage": usage} if usage else {}),
    }


USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
START = {
    "type": "message_start",
    "message": {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    },
}


def _end(reason: str, stop_sequence: str | None = None) -> list[dict]:
    return [
        {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
            "usage": {"input_tokens": 11, "output_tokens": 2},
        },
        {"type": "message_stop"},
    ]


def _text(index: int, text: str) -> dict:
    delta = {"type": "text_delta", "text": text}
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _json(index: int, partial: str) -> dict:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _start(index: int, block: dict) -> dict:
    return {"type": "content_block_start", "index": index, "content_block": block}


def _stop(index: int) -> dict:
    return {"type": "content_block_stop", "index": index}


TEXT_BLOCK = {"type": "text", "text": ""}


def _tool_chunk(index: int, id: str | None = None, name: str | None = None, arguments: str = ""):
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if id:
        call |= {"id": id, "type": "function"}
        call["function"]["name"] = name
    return _chunk({"tool_calls": [call]})


@pytest.mark.parametrize(
    "chunks, events",
    [
        (  # text: role chunk, content, finish, usage
            [
                _chunk({"role": "assistant", "content": ""}),
                _chunk({"content": "Par"}),
                _chunk({"content": "is"}),
                _chunk({}, "stop"),
                _chunk(None, usage=USAGE),
            ],
            [
                START,
                _start(0, TEXT_BLOCK),
                _text(0, "Par"),
                _text(0, "is"),
                _stop(0),
                *_end("end_turn"),
            ],
        ),
        (  # cut off at max_tokens
            [_chunk({"content": "The"}), _chunk({}, "length"), _chunk(None, usage=USAGE)],
            [START, _start(0, TEXT_BLOCK), _text(0, "The"), _stop(0), *_end("max_tokens")],
        ),
        (  # no text at all: no block
            [_chunk({"role": "assistant", "content": ""}), _chunk({}, "stop", usage=USAGE)],
            [START, *_end("end_turn")],
        ),
        (  # text, then two tool calls whose arguments come in pieces
            [
                _chunk({"content": "Checking."}),
                _tool_chunk(0, "call_a", "get_weather"),
                _tool_chunk(0, arguments='{"city": '),
                _tool_chunk(0, arguments='"Paris"}'),
                _tool_chunk(1, "call_b", "n", "{}"),
                _chunk({}, "tool_calls"),
                _chunk(None, usage=USAGE),
            ],
            [
                START,
                _start(0, TEXT_BLOCK),
                _text(0, "Checking."),
                _stop(0),
                _start(1, {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}),
                _json(1, '{"city": '),
                _json(1, '"Paris"}'),
                _stop(1),
                _start(2, {"type": "tool_use", "id": "call_b", "name": "n", "input": {}}),
                _json(2, "{}"),
                _stop(2),
                *_end("tool_use"),
            ],
        ),
        (  # a forced call ends with OpenAI's "stop": still tool_use
            [_tool_chunk(0, "c", "n", '{"a": 1}'), _chunk({}, "stop"), _chunk(None, usage=USAGE)],
            [
                START,
                _start(0, {"type": "tool_use", "id": "c", "name": "n", "input": {}}),
                _json(0, '{"a": 1}'),
                _stop(0),
                *_end("tool_use"),
            ],
        ),
        (  # the upstream names the stop sequence that matched
            [
                _chunk({"content": "A"}),
                {
                    "choices": [
                        {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}
                    ]
                },
                _chunk(None, usage=USAGE),
            ],
            [START, _start(0, TEXT_BLOCK), _text(0, "A"), _stop(0), *_end("stop_sequence", "END")],
        ),
        (  # the stream ended without a finish: an error event, never a made-up stop
            [_chunk({"content": "A"})],
            [
                START,
                _start(0, TEXT_BLOCK),
                _text(0, "A"),
                {
                    "type": "error",
                    "error": {
                        "type": "api_error",
                        "message": "The model's stream ended without a finish reason.",
                    },
                },
            ],
        ),
    ],
)
def test_chunks_translate_to_the_event_sequence(chunks: list[dict], events: list[dict]) -> None:
    out = at.stream_events(chunks, "m", ["END"])
    for event in out:
        if event["type"] == "message_start":
            assert event["message"]["id"].startswith("msg_")
            event["message"]["id"] = "msg_x"
        # each is one of the client's own event types, or its error shape
        if event["type"] == "error":
            ErrorResponse.model_validate(event)
        else:
            EVENTS.validate_python(event)
    assert out == events


def test_an_upstream_failure_mid_stream_is_an_error_event() -> None:
    async def chunks() -> AsyncIterator[dict]:
        yield _chunk({"content": "Par"})
        raise UpstreamError(503, "The model's rank 0 went away mid-answer.")

    async def frames() -> list[str]:
        stream = chunks()
        first = await anext(stream)
        return [f async for f in an._events(at.StreamTranslator("m"), first, stream)]

    out = asyncio.run(frames())
    names = [f.split("\n", 1)[0] for f in out]
    assert names == [
        "event: message_start",
        "event: content_block_start",
        "event: content_block_delta",
        "event: error",
    ]
    error = json.loads(out[-1].split("data: ", 1)[1])
    assert error == {
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "message": "The model's rank 0 went away mid-answer.",
        },
    }


def test_frames_carry_the_event_name() -> None:
    frame = at.frame({"type": "message_stop"})
    assert frame == 'event: message_stop\ndata: {"type": "message_stop"}\n\n'


# ---- end to end with the anthropic client ----------------------------------------------------


@pytest.fixture(scope="module")
def client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def _text_of(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_greedy_answer_with_temperature_in_extra_body(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=12,
        messages=[{"role": "user", "content": FRANCE}],
        extra_body={"temperature": 0},
    )
    assert "Paris" in _text_of(message)
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == MODEL
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12


def test_greedy_answer_with_plain_fields_and_anthropic_headers(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.url}/v1/messages",
        headers={"x-api-key": "x", "anthropic-version": "2023-06-01"},
        json={**_body(max_tokens=12), "temperature": 0, "top_k": 1, "top_p": 1.0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    message = Message.model_validate(response.json())
    assert "Paris" in _text_of(message)


def test_greedy_is_greedy_whichever_way_temperature_came(
    client: anthropic.Anthropic, server: LiveServer
) -> None:
    via_client = client.messages.create(
        model=MODEL, max_tokens=12, messages=[_user(FRANCE)], extra_body={"temperature": 0}
    )
    plain = httpx.post(
        f"{server.url}/v1/messages", json={**_body(max_tokens=12), "temperature": 0}, timeout=60
    ).json()
    assert _text_of(via_client) == _text_of(Message.model_validate(plain))


def test_multi_turn_with_system(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=16,
        system=[{"type": "text", "text": "You are a helpful geography assistant."}],
        messages=[
            {"role": "user", "content": "What is the capital of Italy?"},
            {"role": "assistant", "content": "The capital of Italy is Rome."},
            {"role": "user", "content": [{"type": "text", "text": FRANCE}]},
        ],
        extra_body={"temperature": 0},
    )
    assert "Paris" in _text_of(message)
    alone = client.messages.count_tokens(model=MODEL, messages=[_user(FRANCE)])
    assert message.usage.input_tokens > alone.input_tokens  # the history reached the model


def test_streaming_with_the_client_helper(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL, max_tokens=12, messages=[_user(FRANCE)], extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" in text and _text_of(final) == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    counted = client.messages.count_tokens(model=MODEL, messages=[_user(FRANCE)])
    assert final.usage.input_tokens == counted.input_tokens
    assert 0 < final.usage.output_tokens <= 12
    whole = client.messages.create(
        model=MODEL, max_tokens=12, messages=[_user(FRANCE)], extra_body={"temperature": 0}
    )
    assert _text_of(whole) == text and whole.usage.output_tokens == final.usage.output_tokens


def test_raw_stream_has_the_event_names_in_order(server: LiveServer) -> None:
    names, events = [], []
    with httpx.stream(
        "POST",
        f"{server.url}/v1/messages",
        json={**_body(max_tokens=6), "stream": True, "temperature": 0},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert names == [e["type"] for e in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1:-2] == [
        "content_block_start",
        *["content_block_delta"] * (len(names) - 5),
        "content_block_stop",
    ]
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2]["usage"]["output_tokens"] == 6


def test_count_tokens_is_the_prompt_the_model_reads(client: anthropic.Anthropic) -> None:
    plain = client.messages.count_tokens(model=MODEL, messages=[_user(FRANCE)])
    message = client.messages.create(
        model=MODEL, max_tokens=4, messages=[_user(FRANCE)], extra_body={"temperature": 0}
    )
    assert plain.input_tokens == message.usage.input_tokens > 0
    # SmolLM2's template adds its own system prompt when there is none: compare two systems.
    short, long = (
        client.messages.count_tokens(model=MODEL, system=system, messages=[_user(FRANCE)])
        for system in ("Be brief.", "Be brief. " * 10)
    )
    assert long.input_tokens > short.input_tokens > 0
    with_tools = client.messages.count_tokens(
        model=MODEL, messages=[_user(FRANCE)], tools=[WEATHER_TOOL]
    )
    assert with_tools.input_tokens > plain.input_tokens


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    question = _user(CALL_PARIS)
    first = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[question],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    calls = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and len(calls) >= 1, first
    call = calls[0]
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id
    answer = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[
            question,
            {"role": "assistant", "content": [c.model_dump() for c in first.content]},
            _user(
                [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 C."},
                    {"type": "text", "text": "Now answer in words."},
                ]
            ),
        ],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
        extra_body={"temperature": 0},
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert _text_of(answer).strip() and not [b for b in answer.content if b.type == "tool_use"]


def test_forced_tool_call_streams_as_input_json(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL,
        max_tokens=24,
        messages=[_user(CALL_PARIS)],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    calls = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and calls and calls[0].name == "get_weather"
    assert calls[0].input == {"city": "Paris"}  # the streamed partial_json parsed whole
    assert any(e.type == "input_json" for e in events)  # the client saw input_json_delta
    whole = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[_user(CALL_PARIS)],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    assert [b.input for b in whole.content if b.type == "tool_use"] == [c.input for c in calls]


# ---- bad input over HTTP: 4xx in Anthropic's shape, and the node keeps serving ---------------


def _error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["message"]
    return body["error"]


BAD = "invalid_request_error"
LONG = [_user("word " * 3000)]  # past the test node's 2048-token context


def _raw(**fields: Any) -> bytes:
    return json.dumps({k: v for k, v in _body(**fields).items() if v is not None}).encode()


@pytest.mark.parametrize(
    "content, status, type, words",
    [
        (b"{not json", 400, BAD, "not valid JSON"),
        (b"", 400, BAD, "needs a JSON body"),
        (b"[1, 2]", 400, BAD, "must be a JSON object"),
        (_raw(max_tokens=None), 400, BAD, "max_tokens: Field required"),
        (_raw(messages=[{"role": "system", "content": "x"}]), 400, BAD, "messages.0.role"),
        (_raw(messages=[_user([{"type": "image", "source": {}}])]), 400, BAD, "takes text only"),
        (_raw(max_tokens=1.5), 400, BAD, "max_tokens: Input should be a valid integer"),
        (_raw(model="no-such-model"), 404, "not_found_error", "no-such-model"),
        (_raw(model="no-such-model", stream=True), 404, "not_found_error", "no-such-model"),
        (_raw(messages=LONG), 400, BAD, "ontext"),
        (_raw(messages=LONG, stream=True), 400, BAD, "ontext"),  # refused before the headers
    ],
)
def test_bad_requests_answer_in_anthropic_shape(
    server: LiveServer, content: bytes, status: int, type: str, words: str
) -> None:
    response = httpx.post(
        f"{server.url}/v1/messages",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = _error_of(response)
    assert error["type"] == type and words in error["message"]
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200


@pytest.mark.parametrize(
    "raw, status, type",
    [
        ({"messages": [_user(FRANCE)]}, 400, "invalid_request_error"),
        ({"model": MODEL}, 400, "invalid_request_error"),
        ({"model": "no-such-model", "messages": [_user(FRANCE)]}, 404, "not_found_error"),
    ],
)
def test_bad_count_tokens_answer_in_anthropic_shape(
    server: LiveServer, raw: dict, status: int, type: str
) -> None:
    response = httpx.post(f"{server.url}/v1/messages/count_tokens", json=raw, timeout=60)
    assert response.status_code == status and _error_of(response)["type"] == type


def test_client_raises_its_own_errors_and_the_node_serves_on(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=[_user(FRANCE)])
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as image:
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=[
                _user(
                    [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA"},
                        }
                    ]
                )
            ],
        )
    assert "messages.0.content.0: this model takes text only" in str(image.value)
    with pytest.raises(anthropic.NotFoundError):
        with client.messages.stream(
            model="no-such-model", max_tokens=4, messages=[_user(FRANCE)]
        ) as stream:
            list(stream)
    message = client.messages.create(
        model=MODEL, max_tokens=12, messages=[_user(FRANCE)], extra_body={"temperature": 0}
    )
    assert "Paris" in _text_of(message)


def test_message_start_counts_the_input_and_a_stop_sequence_is_named(
    client: anthropic.Anthropic,
) -> None:
    ask = dict(model=MODEL, max_tokens=24, messages=[_user(FRANCE)], stop_sequences=["Paris"])
    counted = client.messages.count_tokens(model=MODEL, messages=[_user(FRANCE)])
    whole = client.messages.create(**ask, extra_body={"temperature": 0})
    assert (whole.stop_reason, whole.stop_sequence) == ("stop_sequence", "Paris")
    assert "Paris" not in _text_of(whole)
    events = list(client.messages.create(**ask, stream=True, extra_body={"temperature": 0}))
    assert events[0].type == "message_start"
    assert events[0].message.usage.input_tokens == counted.input_tokens
    delta = next(e for e in events if e.type == "message_delta")
    assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("stop_sequence", "Paris")
