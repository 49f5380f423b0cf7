"""OpenAI Responses (`/v1/responses`): the translation as tables, then the real `openai`
client against a live node (bundled SmolLM2)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from shoal.api import responses as rs
from shoal.api import responses_translate as rt
from shoal.api.upstream import UpstreamError
from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL
from shoal.schema.responses import ResponsesRequest
from shoal.web.errors import ApiError

from conftest import LiveServer

pytestmark = pytest.mark.timeout(180)  # the first e2e test also waits for the model's warm-up

FRANCE = "What is the capital of France?"
EVENTS = TypeAdapter(ResponseStreamEvent)  # the client's own union of stream event types
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


JSON_SCHEMA = {"format": {"type": "json_schema", "name": "x", "schema": {}}}
IMAGE = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
FORCED = {"type": "function", "name": "get_weather"}


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def counter_ids() -> rt.NewId:
    """Deterministic ids (msg_1, fc_2, ...) so tables can spell whole items."""
    numbers = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(numbers)}"


def call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# ---- input items -> chat messages -----------------------------------------------------------


@pytest.mark.parametrize(
    "instructions, items, messages",
    [
        ("", "Hello", [{"role": "user", "content": "Hello"}]),
        (
            "Be brief.",
            [{"role": "developer", "content": "Use French."}, {"role": "user", "content": "Hi"}],
            [
                {"role": "system", "content": "Be brief."},
                {"role": "system", "content": "Use French."},
                {"role": "user", "content": "Hi"},
            ],
        ),
        (
            None,
            [
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "one"},
                        {"type": "input_text", "text": "two"},
                    ],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_x",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "three", "annotations": []}],
                },
            ],
            [
                {"role": "user", "content": "one\ntwo"},
                {"role": "assistant", "content": "three"},
            ],
        ),
        (  # calls join the assistant turn before them; outputs become tool messages
            None,
            [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Looking."},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"a":1}'},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "rain"}],
                },
            ],
            [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": "Looking.",
                    "tool_calls": [call("c1", "w", "{}"), call("c2", "w", '{"a":1}')],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "rain"},
            ],
        ),
        (  # a call with no assistant text before it: content null, as chat wants
            None,
            [
                {"role": "user", "content": "Weather?"},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            ],
            [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call("c1", "w", "{}")]},
            ],
        ),
    ],
)
def test_input_items_become_chat_messages(instructions, items, messages) -> None:
    body = request(input=items, instructions=instructions)
    assert rt.chat_messages(body.instructions, body.input) == messages


def test_chat_request_carries_options_history_and_tools() -> None:
    history = request(input="first").input
    body = request(
        input="second",
        instructions="sys",
        max_output_tokens=7,
        temperature=0,
        top_p=0.5,
        tools=[WEATHER_TOOL],
        tool_choice=FORCED,
        parallel_tool_calls=False,
    )
    assert rt.chat_request(body, history) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "first"},
            {"role": "user", "content": "second"},
        ],
        "max_tokens": 7,
        "temperature": 0,
        "top_p": 0.5,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": WEATHER_TOOL["description"],
                    "parameters": WEATHER_TOOL["parameters"],
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    # Without tools no tool fields at all; unset sampling options are left to the runner.
    assert rt.chat_request(request()) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
    }


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"text": JSON_SCHEMA}, "text.format.type"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format.type"),
        (
            {"input": [{"role": "user", "content": [IMAGE]}]},
            "input[0].content[0]",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "a"},
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [
                            {"type": "input_text", "text": "b"},
                            {"type": "input_file", "file_id": "f"},
                        ],
                    },
                ]
            },
            "input[1].output[1]",
        ),  # fmt: skip
        ({"tool_choice": {**FORCED, "name": "nope"}, "tools": [WEATHER_TOOL]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_unsupported_options_are_refused_by_name(fields: dict, param: str) -> None:
    with pytest.raises(ApiError) as caught:
        rt.refuse_unsupported(request(**fields))
    assert (caught.value.status, caught.value.param) == (400, param)
    if "input_image" in json.dumps(fields):
        assert "this model takes text only" in caught.value.message


def test_plain_text_format_and_known_forced_tool_pass() -> None:
    rt.refuse_unsupported(
        request(
            text={"format": {"type": "text"}},
            tools=[WEATHER_TOOL],
            tool_choice=FORCED,
        )
    )


# ---- chat completion -> response -------------------------------------------------------------


@pytest.mark.parametrize(
    "finish_reason, status, details",
    [
        ("stop", "completed", None),
        ("tool_calls", "completed", None),
        ("length", "incomplete", {"reason": "max_output_tokens"}),
    ],
)
def test_finish_reason_gives_status(finish_reason, status, details) -> None:
    assert rt.status_of(finish_reason) == (status, details)


def text_item(item_id: str, text: str, status: str = "completed") -> dict:
    return rt.message_item(item_id, text, status)


@pytest.mark.parametrize(
    "message, finish_reason, items",
    [
        ({"role": "assistant", "content": "Paris."}, "stop", [text_item("msg_1", "Paris.")]),
        (
            {"role": "assistant", "content": "Par"},
            "length",
            [text_item("msg_1", "Par", "incomplete")],
        ),
        ({"role": "assistant", "content": ""}, "stop", [text_item("msg_1", "")]),
        (
            {"role": "assistant", "content": None, "tool_calls": [call("c1", "w", '{"x":1}')]},
            "tool_calls",
            [rt.call_item("fc_1", "c1", "w", '{"x":1}', "completed")],
        ),
        (
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [call("c1", "w", "{}"), call("c2", "v", "{}")],
            },
            "tool_calls",
            [
                text_item("msg_1", "Checking."),
                rt.call_item("fc_2", "c1", "w", "{}", "completed"),
                rt.call_item("fc_3", "c2", "v", "{}", "completed"),
            ],
        ),
    ],
)
def test_chat_message_becomes_output_items(message, finish_reason, items) -> None:
    assert rt.output_items(message, finish_reason, counter_ids()) == items


def test_whole_response_is_the_clients_response_type() -> None:
    body = request(instructions="sys", tools=[WEATHER_TOOL], metadata={"k": "v"})
    completion = {
        "choices": [{"message": {"content": "Paris"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }
    response = rt.response_of(rt.skeleton(body, "resp_1", 1700000000), completion)
    parsed = Response.model_validate(response)
    assert (parsed.status, parsed.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert parsed.output_text == "Paris"
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens) == (10, 3)
    assert parsed.usage.total_tokens == 13
    assert parsed.usage.input_tokens_details.cached_tokens == 0
    assert parsed.usage.output_tokens_details.reasoning_tokens == 0
    assert (parsed.instructions, parsed.metadata) == ("sys", {"k": "v"})
    assert parsed.tools[0].name == "get_weather"
    assert (parsed.temperature, parsed.top_p, parsed.tool_choice) == (1.0, 1.0, "auto")


# ---- chunks -> stream events -----------------------------------------------------------------


def chunk(content: str | None = None, finish: str | None = None, calls=None, role=None) -> dict:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = calls
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"object": "chat.completion.chunk", "choices": [choice]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def call_delta(index: int, call_id: str = "", name: str = "", args: str = "") -> dict:
    function: dict[str, Any] = {"arguments": args}
    if name:
        function["name"] = name
    delta: dict[str, Any] = {"index": index, "function": function}
    if call_id:
        delta.update(id=call_id, type="function")
    return delta


@pytest.mark.parametrize(
    "chunks, types, final_status",
    [
        (
            [chunk("", role="assistant"), chunk("Par"), chunk("is"), chunk(finish="stop"), USAGE],
            [*TEXT_EVENTS, "response.completed"],
            "completed",
        ),
        (
            [chunk("", role="assistant"), chunk("Par"), chunk("is", finish="length"), USAGE],
            [*TEXT_EVENTS, "response.incomplete"],
            "incomplete",
        ),
        (  # nothing said: still one (empty) message, as the whole response has
            [chunk("", role="assistant"), chunk(finish="stop"), USAGE],
            [*TEXT_EVENTS[:4], *TEXT_EVENTS[6:], "response.completed"],
            "completed",
        ),
        (
            [
                chunk(None, role="assistant"),
                chunk(calls=[call_delta(0, "c1", "w", "")]),
                chunk(calls=[call_delta(0, args='{"x"')]),
                chunk(calls=[call_delta(0, args=":1}")]),
                chunk(calls=[call_delta(1, "c2", "v", "{}")]),
                chunk(finish="tool_calls"),
                USAGE,
            ],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ],
            "completed",
        ),
        (  # the runner's stream ended without saying why: that is a failure, not an answer
            [chunk("", role="assistant"), chunk("Par")],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "error",
                "response.failed",
            ],
            "failed",
        ),
    ],
)
def test_chunks_become_events(chunks, types, final_status) -> None:
    base = rt.skeleton(request(), "resp_1", 1700000000)
    events = rt.stream_events(base, chunks, counter_ids())
    assert [e["type"] for e in events] == types
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        EVENTS.validate_python(event)  # every event parses as the client's own type
    last = events[-1]["response"]
    assert last["status"] == final_status
    if final_status != "failed":
        assert last["usage"]["total_tokens"] == 7


def test_streamed_output_is_the_whole_responses_output() -> None:
    """The same answer streamed and whole gives the same output items."""
    chunks = [
        chunk("", role="assistant"),
        chunk("Look"),
        chunk("ing."),
        chunk(calls=[call_delta(0, "c1", "w", '{"city":')]),
        chunk(calls=[call_delta(0, args=' "Paris"}')]),
        chunk(finish="tool_calls"),
        USAGE,
    ]
    base = rt.skeleton(request(), "resp_1", 0)
    streamed = rt.stream_events(base, chunks, counter_ids())[-1]["response"]["output"]
    message = {"content": "Looking.", "tool_calls": [call("c1", "w", '{"city": "Paris"}')]}
    assert streamed == rt.output_items(message, "tool_calls", counter_ids())


def test_text_deltas_add_up_to_the_done_text() -> None:
    chunks = [chunk("", role="assistant"), chunk("The "), chunk("capital"), chunk(finish="stop")]
    events = rt.stream_events(rt.skeleton(request(), "r", 0), chunks)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert deltas == done["text"] == "The capital"
    assert events[-1]["response"]["usage"] is None  # no usage chunk: none made up


def test_an_error_mid_stream_is_an_error_event_then_failed() -> None:
    async def chunks() -> AsyncIterator[dict]:
        yield chunk("Par")
        raise UpstreamError(503, "The model's rank 0 went away mid-answer.")

    kept: list[dict] = []
    translator = rt.StreamTranslator(rt.skeleton(request(), "resp_1", 0), counter_ids())

    async def run() -> list[str]:
        source = chunks()
        first = await anext(source)
        return [frame async for frame in rs._events(translator, first, source, kept.append)]

    frames = asyncio.run(run())
    names = [frame.split("\n")[0] for frame in frames]
    assert names[-2:] == ["event: error", "event: response.failed"]
    error = json.loads(frames[-2].split("data: ", 1)[1])
    assert "went away" in error["message"]
    assert kept[0]["status"] == "failed" and kept[0]["error"]["code"] == "server_error"


# ---- the store -------------------------------------------------------------------------------


def stored_response(response_id: str) -> dict:
    return {"id": response_id, "output": [text_item("msg_" + response_id, "a")]}


def test_store_keeps_the_last_n_and_a_read_refreshes() -> None:
    store = rs.ResponseStore(capacity=3)
    for n in range(3):
        store.put(stored_response(f"r{n}"), (), ())
    assert store.get("r0") is not None  # r0 is now the most recent; r1 the oldest
    store.put(stored_response("r3"), (), ())
    store.put(stored_response("r4"), (), ())
    assert len(store) == 3
    assert [store.get(r) is not None for r in ("r0", "r1", "r2", "r3", "r4")] == [
        True, False, False, True, True,
    ]  # fmt: skip
    assert store.delete("r3") and not store.delete("r3") and len(store) == 2


def test_stored_conversation_is_history_inputs_then_outputs() -> None:
    store = rs.ResponseStore()
    first = request(input="one")
    store.put(stored_response("r1"), (), first.input)
    second = request(input="two")
    history = store.get("r1").conversation
    store.put(stored_response("r2"), history, second.input)
    messages = rt.chat_messages(None, store.get("r2").conversation)
    assert messages == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "a"},
    ]


# ---- end to end: the real openai client against a live node ---------------------------------


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, **fields: Any) -> Response:
    fields = {"model": MODEL, "temperature": 0, "max_output_tokens": 24, **fields}
    return client.responses.create(**fields)


def test_string_input_greedy_knows_paris(client: openai.OpenAI) -> None:
    response = ask(client, input=FRANCE)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == MODEL
    assert "Paris" in response.output_text
    [item] = response.output
    assert (item.type, item.role, item.status) == ("message", "assistant", "completed")
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_instructions_are_the_system_message(client: openai.OpenAI) -> None:
    instructions = "You are a geography teacher. Answer in one short sentence."
    response = ask(client, input=FRANCE, instructions=instructions, max_output_tokens=4)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": instructions},
            {"role": "user", "content": FRANCE},
        ],
        max_tokens=1,
    )
    assert response.instructions == instructions
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_message_list_input_is_the_same_chat(client: openai.OpenAI) -> None:
    """Developer and text-part messages answer exactly as the chat they translate to."""
    system = "You are a helpful assistant."
    response = ask(
        client,
        input=[
            {"role": "developer", "content": system},
            {"role": "user", "content": [{"type": "input_text", "text": FRANCE}]},
        ],
        max_output_tokens=12,
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": FRANCE}],
        temperature=0,
        max_tokens=12,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_streaming_deltas_make_the_completed_response(client: openai.OpenAI) -> None:
    deltas: list[str] = []
    with client.responses.stream(
        model=MODEL, input=FRANCE, temperature=0, max_output_tokens=24
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert final.status == "completed"
    assert "".join(deltas) == final.output_text and "Paris" in final.output_text
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    # The stored response is the one streamed.
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_raw_stream_is_numbered_and_ends_incomplete_at_the_limit(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL, input=FRANCE, temperature=0, max_output_tokens=2, stream=True
        )
    )
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.usage.output_tokens == 2
    assert last.response.output[0].status == "incomplete"


def test_whole_answer_at_the_limit_is_incomplete(client: openai.OpenAI) -> None:
    response = ask(client, input=FRANCE, max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 2


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = ask(client, input=FRANCE, max_output_tokens=12)
    follow_up = "And of Italy?"
    second = ask(client, input=follow_up, previous_response_id=first.id, max_output_tokens=4)
    alone = ask(client, input=follow_up, max_output_tokens=1)
    assert second.previous_response_id == first.id
    # The second turn's prompt holds the first turn: more than the new message alone ...
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.input_tokens // 2
    # ... exactly the chat conversation of both turns.
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": FRANCE},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": follow_up},
        ],
        max_tokens=1,
    )
    assert second.usage.input_tokens == chat.usage.prompt_tokens


def test_stored_response_can_be_read_and_deleted(client: openai.OpenAI) -> None:
    response = ask(client, input=FRANCE, max_output_tokens=4, metadata={"case": "store"})
    again = client.responses.retrieve(response.id)
    assert (again.id, again.output_text, again.metadata) == (
        response.id,
        response.output_text,
        {"case": "store"},
    )
    client.responses.delete(response.id)
    for gone in (
        lambda: client.responses.retrieve(response.id),
        lambda: client.responses.delete(response.id),
        lambda: ask(client, input="Hi", previous_response_id=response.id),
    ):
        with pytest.raises(openai.NotFoundError):
            gone()


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    response = ask(client, input=FRANCE, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, input="Hi", previous_response_id=response.id)
    assert caught.value.body["code"] == "previous_response_not_found"
    assert caught.value.body["param"] == "previous_response_id"


WEATHER_ASK = "What is the weather in Paris?"
CALL_TOKENS = 64  # a forced call is ~46 tokens of JSON from this model: 24 would cut it off
CHAT_WEATHER_TOOL = {
    "type": "function",
    "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"},
}


def forced_call(client: openai.OpenAI) -> Response:
    return ask(
        client, input=WEATHER_ASK, tools=[WEATHER_TOOL], tool_choice=FORCED,
        max_output_tokens=CALL_TOKENS,
    )  # fmt: skip


def test_function_tool_round_trip(client: openai.OpenAI) -> None:
    response = forced_call(client)
    assert response.status == "completed", response.output
    [called] = response.output
    assert called.type == "function_call" and called.status == "completed"
    assert called.name == "get_weather" and called.call_id and called.id.startswith("fc_")
    assert isinstance(json.loads(called.arguments), dict)
    assert response.output_text == ""  # a call only: no message item
    result = '{"sky": "sunny", "celsius": 21}'
    answer = ask(
        client,
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": called.call_id, "output": result}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=16,
    )
    assert answer.output_text.strip() and answer.output[0].type == "message"
    # The model saw the whole exchange: exactly the chat conversation with the call and result.
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": WEATHER_ASK},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": called.call_id,
                        "type": "function",
                        "function": {"name": called.name, "arguments": called.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": called.call_id, "content": result},
        ],
        tools=[CHAT_WEATHER_TOOL],
        tool_choice="none",
        max_tokens=1,
    )
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_streamed_function_call_matches_the_whole_one(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL, input=WEATHER_ASK, tools=[WEATHER_TOOL], tool_choice=FORCED,
        temperature=0, max_output_tokens=CALL_TOKENS,
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [called] = final.output
    whole = forced_call(client).output[0]
    assert (
        (called.name, called.arguments) == (whole.name, whole.arguments) == ("get_weather", deltas)
    )


GOOD = {"model": MODEL, "input": FRANCE, "max_output_tokens": 2}


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": FRANCE}, 400, "model"),
        ({"model": MODEL}, 400, "input"),
        ({**GOOD, "input": 5}, 400, "input"),
        ({**GOOD, "input": []}, 400, "input"),
        ({**GOOD, "input": [{"type": "reasoning", "summary": []}]}, 400, "input[0]"),
        ({**GOOD, "input": [{"role": "robot", "content": "x"}]}, 400, None),
        ({**GOOD, "input": [{"role": "user", "content": [IMAGE]}]}, 400, "input[0].content[0]"),
        ({**GOOD, "text": JSON_SCHEMA}, 400, "text.format.type"),
        ({**GOOD, "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        (
            {**GOOD, "tools": [WEATHER_TOOL], "tool_choice": {**FORCED, "name": "x"}},
            400,
            "tool_choice",
        ),
        ({**GOOD, "temperature": 5}, 400, "temperature"),
        ({**GOOD, "max_output_tokens": "8"}, 400, "max_output_tokens"),
        ({**GOOD, "stream": "yes"}, 400, "stream"),
        ({**GOOD, "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
        ({**GOOD, "model": "no-such-model"}, 404, "model"),
        ({**GOOD, "model": "no-such-model", "stream": True}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_node_keeps_serving(
    server: LiveServer, body: dict, status: int, param: str | None
) -> None:
    reply = httpx.post(f"{server.base_url}/responses", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert httpx.post(f"{server.base_url}/responses", json=GOOD, timeout=60).status_code == 200


def test_unknown_fields_are_ignored(server: LiveServer) -> None:
    body = {**GOOD, "user": "u1", "reasoning": {"effort": "low"}, "truncation": "auto"}
    reply = httpx.post(f"{server.base_url}/responses", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["object"] == "response"


def test_unknown_response_id_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_unknown")
    assert caught.value.body["code"] == "response_not_found"
