"""Tool calling in /v1/chat/completions: the formats as tables, and the real openai client
against the bundled model (a forced call, a full round trip, streaming)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL
from shoal.runner.tools import (
    HERMES,
    LLAMA3,
    MISTRAL,
    ToolCall,
    ToolStream,
    forced_prefix,
    parse_tool_calls,
    template_messages,
    tool_format,
)

from conftest import LiveServer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PARIS = '{"city": "Paris"}'

# ---- parsing: (format, model output, content, calls) ----------------------------------------

PARSE_CASES = [
    ("hermes", HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     "</tool_call>", "", [("get_weather", PARIS)]),
    ("hermes_text_before", HERMES, 'Let me check.\n<tool_call>{"name": "get_weather", '
     '"arguments": {"city": "Paris"}}</tool_call>', "Let me check.", [("get_weather", PARIS)]),
    ("hermes_two_calls", HERMES, '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
     '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>', "",
     [("a", "{}"), ("b", '{"x": 1}')]),
    ("hermes_unclosed_at_the_end", HERMES, '<tool_call>\n{"name": "a", "arguments": {}}', "",
     [("a", "{}")]),
    ("hermes_arguments_as_a_string", HERMES, '<tool_call>{"name": "get_weather", "arguments": '
     '"{\\"city\\": \\"Paris\\"}"}</tool_call>', "", [("get_weather", PARIS)]),
    ("llama3_bare", LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [("get_weather", PARIS)]),
    ("llama3_python_tag", LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": '
     '{"city": "Paris"}}', "", [("get_weather", PARIS)]),
    ("mistral", MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": '
     '"Paris"}}]', "", [("get_weather", PARIS)]),
    ("mistral_two", MISTRAL, '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", '
     '"arguments": {}}]', "", [("a", "{}"), ("b", "{}")]),
    # malformed or no calls: the text is the answer
    ("plain_text", HERMES, "Paris is sunny.", "Paris is sunny.", []),
    ("hermes_bad_json", HERMES, '<tool_call>{"name": "a", "arguments": {</tool_call>',
     '<tool_call>{"name": "a", "arguments": {</tool_call>', []),
    ("hermes_no_name", HERMES, '<tool_call>{"arguments": {}}</tool_call>',
     '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes_arguments_not_an_object", HERMES, '<tool_call>{"name": "a", "arguments": [1]}'
     "</tool_call>", '<tool_call>{"name": "a", "arguments": [1]}</tool_call>', []),
    ("llama3_prose_with_braces", LLAMA3, "Use {x} here", "Use {x} here", []),
    ("mistral_marker_without_json", MISTRAL, "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "output", "content", "calls"),
    [c[1:] for c in PARSE_CASES],
    ids=[c[0] for c in PARSE_CASES],
)
def test_tool_calls_are_parsed_per_format(fmt, output, content, calls):
    got_content, got = parse_tool_calls(output, fmt)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls


@pytest.mark.parametrize(("name", "fmt", "output", "content", "calls"), PARSE_CASES)
def test_streaming_in_any_chunking_gives_the_same_answer(name, fmt, output, content, calls):
    for size in (1, 3, 7, len(output)):
        stream = ToolStream(fmt)
        sent = "".join(stream.feed(output[i : i + size]) for i in range(0, len(output), size))
        rest, got = stream.finish()
        assert [(c.name, c.arguments) for c in got] == calls, size
        if calls:
            assert sent.strip() == content  # only the text before the call went out
        else:
            assert sent + rest == output  # no call: every character is content, in order


def test_streamed_text_goes_out_before_the_answer_ends():
    stream = ToolStream(HERMES)
    assert stream.feed("The weather ") == "The weather "
    assert stream.feed("is <tool") == "is "  # a marker may be starting: held
    assert stream.feed("bar> nice") == "<toolbar> nice"  # it was not


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        (None, HERMES),
        ("{{ '<tool_call>' }}{% for t in tools %}{% endfor %}", HERMES),
        ("{{ '[TOOL_CALLS]' }}", MISTRAL),
        ("{{ '<|python_tag|>' }}", LLAMA3),
        ("{% if message.role == 'ipython' %}{% endif %}", LLAMA3),
    ],
)
def test_the_format_is_read_from_the_template(template, fmt):
    assert tool_format(template) == fmt


@pytest.mark.parametrize(
    ("fmt", "choice", "prefix"),
    [
        (HERMES, "auto", ""),
        (HERMES, "required", "<tool_call>\n"),
        (
            HERMES,
            {"type": "function", "function": {"name": "get_weather"}},
            '<tool_call>\n{"name": "get_weather", "arguments": ',
        ),
        (MISTRAL, "required", "[TOOL_CALLS]"),
        (LLAMA3, {"type": "function", "function": {"name": "f"}}, '{"name": "f", "parameters": '),
    ],
)
def test_a_forced_choice_prefills_the_answer(fmt, choice, prefix):
    assert forced_prefix(fmt, choice) == prefix


def test_a_template_without_tools_reads_them_as_text():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": PARIS},
                }
            ],
        },  # fmt: skip
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "sunny"}'},
    ]
    out = template_messages(messages, [WEATHER], renders_tools=False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and "get_weather" in out[0]["content"]
    assert json.loads(out[2]["content"].split("<tool_call>")[1].split("</tool_call>")[0]) == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert out[3]["content"] == '<tool_response>\n{"sky": "sunny"}\n</tool_response>'


def test_a_template_with_tools_gets_openai_messages_with_object_arguments():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": PARIS}}
    out = template_messages(
        [{"role": "assistant", "content": None, "tool_calls": [call]}], [WEATHER], True
    )
    assert out == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": {"city": "Paris"}},
                }
            ],
        }  # fmt: skip
    ]


def test_a_call_gets_an_id_and_openai_shape():
    call = ToolCall("f", "{}").openai(index=0)
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"


# ---- the real client against the bundled model ---------------------------------------------


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_a_forced_call_comes_back_as_tool_calls(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=NAMED,
        max_tokens=40, temperature=0,
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments), dict)


def test_streamed_call_matches_the_whole_answer(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=40)
    whole = client.chat.completions.create(**kwargs, temperature=0)
    calls, reasons = [], []
    for chunk in client.chat.completions.create(**kwargs, temperature=0, stream=True):
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            reasons.append(choice.finish_reason)
    assert reasons[-1] == "tool_calls"
    expected = whole.choices[0].message.tool_calls[0].function
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (expected.name, expected.arguments)
    ]


def test_a_full_tool_round_trip_ends_in_text(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=NAMED,
        max_tokens=40, temperature=0,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),  # content null, tool_calls
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
        max_tokens=16, temperature=0,
    )  # fmt: skip
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_without_tools_a_greedy_answer_is_unchanged(client: openai.OpenAI) -> None:
    france = [
        {"role": "developer", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=france, max_tokens=12, temperature=0, tools=[WEATHER],
        tool_choice="none", presence_penalty=None, frequency_penalty=0.1,
    )  # fmt: skip
    assert "Paris" in answer.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, None),  # top_logprobs needs logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]},
         None),
        ({"tool_choice": "required"}, None),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, None),
        ({"messages": [{"role": "user", "content": None}]}, None),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ],
)  # fmt: skip
def test_unsupported_or_invalid_tool_requests_are_clear_400s(
    server: LiveServer, extra: dict, param: str | None
) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] and (param is None or error["param"] == param), error
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
