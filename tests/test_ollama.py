"""Ollama's API (/api/* and /ollama/api/*): the translation as tables, bad input in Ollama's
error shape, and the real `ollama` client against the bundled model under both prefixes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import ollama
import pytest
from pydantic import ValidationError

from shoal import __version__
from shoal.api import ollama as api
from shoal.api import upstream
from shoal.api.upstream import UpstreamError
from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL
from shoal.models.bundled import bundled_model_path
from shoal.schema.ollama import (
    Answer,
    ChatRequest,
    GenerateRequest,
    Message,
    Options,
    Part,
    Refused,
    check_format,
    check_generate,
    done_reason,
    ollama_tool_calls,
    openai_messages,
    openai_sampling,
    parameter_size,
    part_of,
)

from conftest import LiveServer

GREEDY = {"temperature": 0, "num_predict": 16}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
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

# ---- options -> OpenAI fields ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options, unlimited, expected",
    [
        ({}, None, {}),
        ({"temperature": 0, "num_predict": 16}, None, {"temperature": 0.0, "max_tokens": 16}),
        ({"num_predict": -1}, None, {}),  # Ollama: no limit
        ({"num_predict": -2}, None, {}),  # Ollama: fill the context
        ({"num_predict": 0}, None, {}),
        ({"num_predict": -1}, 2048, {"max_tokens": 2048}),  # where the default is a cap
        ({"num_predict": 5}, 2048, {"max_tokens": 5}),
        ({"repeat_penalty": 1.1}, None, {"repetition_penalty": 1.1}),
        ({"stop": "\n"}, None, {"stop": ["\n"]}),
        ({"stop": ["a", "b"]}, None, {"stop": ["a", "b"]}),
        ({"stop": []}, None, {}),
        (
            {"top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7},
            None,
            {"top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7},
        ),
        (
            {"presence_penalty": 0.5, "frequency_penalty": 0.25},
            None,
            {"presence_penalty": 0.5, "frequency_penalty": 0.25},
        ),
        ({"num_ctx": 8192, "mirostat": 2, "num_gpu": 1}, None, {}),  # fixed at placement / unused
    ],
)
def test_options_map_to_openai_fields(options: dict, unlimited: int | None, expected: dict):
    assert openai_sampling(Options.model_validate(options), unlimited) == expected


@pytest.mark.parametrize(
    "options",
    [{"temperature": "hot"}, {"num_predict": -3}, {"top_k": 1.5}, {"seed": "1"}, {"stop": 3}],
)
def test_options_of_a_wrong_type_are_refused(options: dict):
    with pytest.raises(ValidationError):
        Options.model_validate(options)


# ---- messages -> OpenAI ----------------------------------------------------------------------


def _call(name: str, **arguments) -> dict:
    return {"function": {"name": name, "arguments": arguments}}


def _openai_call(i: int, name: str, **arguments) -> dict:
    function = {"name": name, "arguments": json.dumps(arguments)}
    return {"id": f"call_{i}", "type": "function", "function": function}


MESSAGE_CASES = [
    (
        "plain",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ),
    ("no_content", [{"role": "user"}], [{"role": "user", "content": ""}]),
    (
        "a_call_and_its_answer",
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [_call("get_weather", city="Paris")]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        ],
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_openai_call(0, "get_weather", city="Paris")],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
        ],
    ),
    (
        "answers_matched_by_tool_name",
        [
            {"role": "assistant", "content": "Checking.", "tool_calls": [_call("a"), _call("b")]},
            {"role": "tool", "content": "B", "tool_name": "b"},
            {"role": "tool", "content": "A"},
        ],
        [
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [_openai_call(0, "a"), _openai_call(1, "b")],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "B"},
            {"role": "tool", "tool_call_id": "call_0", "content": "A"},
        ],
    ),
    (
        "ids_unique_across_turns",
        [
            {"role": "assistant", "tool_calls": [_call("a")]},
            {"role": "tool", "content": "1"},
            {"role": "assistant", "tool_calls": [_call("a")]},
            {"role": "tool", "content": "2"},
        ],
        [
            {"role": "assistant", "content": None, "tool_calls": [_openai_call(0, "a")]},
            {"role": "tool", "tool_call_id": "call_0", "content": "1"},
            {"role": "assistant", "content": None, "tool_calls": [_openai_call(1, "a")]},
            {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        ],
    ),
]


@pytest.mark.parametrize("ollama_messages, expected", [c[1:] for c in MESSAGE_CASES],
                         ids=[c[0] for c in MESSAGE_CASES])  # fmt: skip
def test_messages_translate_to_openai(ollama_messages: list, expected: list):
    messages = [Message.model_validate(m) for m in ollama_messages]
    assert openai_messages(messages) == expected


@pytest.mark.parametrize(
    "ollama_messages, words",
    [
        ([{"role": "tool", "content": "sunny"}], "must answer a tool call"),
        (
            [
                {"role": "assistant", "tool_calls": [_call("a")]},
                {"role": "tool", "content": "x", "tool_name": "b"},
            ],
            "for 'b'",
        ),
        ([{"role": "user", "content": "What is this?", "images": ["aGk="]}], "text only"),
    ],
)
def test_messages_shoal_cannot_serve_are_refused(ollama_messages: list, words: str):
    with pytest.raises(Refused, match=words):
        openai_messages([Message.model_validate(m) for m in ollama_messages])


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": "hi"},
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": 3}]},
        {"model": MODEL, "stream": "yes"},
        {"model": ""},
        {"messages": FRANCE},
    ],
)
def test_chat_bodies_of_a_wrong_shape_are_refused(body: dict):
    with pytest.raises(ValidationError):
        ChatRequest.model_validate(body)


def test_ollama_streams_unless_told_not_to():
    assert ChatRequest.model_validate({"model": MODEL}).stream is True
    assert GenerateRequest.model_validate({"model": MODEL, "stream": False}).stream is False


def test_a_null_means_the_default():
    nulls = {"model": MODEL, "stream": None, "options": None, "messages": None, "tools": None}
    assert ChatRequest.model_validate(nulls) == ChatRequest.model_validate({"model": MODEL})


@pytest.mark.parametrize("format", [None, ""])
def test_no_format_is_fine(format):
    check_format(format)


@pytest.mark.parametrize(
    "format, words",
    [("json", "JSON mode"), ({"type": "object"}, "JSON schema"), ("xml", "must be 'json'")],
)
def test_a_format_is_refused_not_ignored(format, words: str):
    with pytest.raises(Refused, match=words):
        check_format(format)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"images": ["aGk="]}, "text only"),
        ({"suffix": "end"}, "suffix"),
        ({"template": "{{ .Prompt }}"}, "template"),
        ({"context": [1, 2, 3]}, "context"),
        ({"format": "json"}, "JSON mode"),
    ],
)
def test_generate_refuses_what_it_cannot_serve(extra: dict, words: str):
    body = GenerateRequest.model_validate({"model": MODEL, "prompt": "hi", **extra})
    with pytest.raises(Refused, match=words):
        check_generate(body)


# ---- OpenAI chunks -> Ollama -----------------------------------------------------------------


def _chunk(delta: dict | None = None, finish: str | None = None, text: str | None = None):
    choice: dict = {"index": 0, "finish_reason": finish}
    if text is not None:
        choice["text"] = text
    else:
        choice["delta"] = delta or {}
    return {"choices": [choice]}


USAGE = {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}
FRAGMENT = {"index": 0, "id": "call_x", "type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(
    "chunk, part",
    [
        (_chunk({"role": "assistant", "content": ""}), Part()),
        (_chunk({"content": "Par"}), Part("Par")),
        (_chunk({}, "length"), Part(finish_reason="length")),
        ({"choices": [], "usage": USAGE}, Part(usage=USAGE)),
        (_chunk({"tool_calls": [FRAGMENT]}), Part(tool_calls=(FRAGMENT,))),
        (_chunk(text="is", finish="stop"), Part("is", finish_reason="stop")),  # text completion
    ],
)
def test_chunks_become_parts(chunk: dict, part: Part):
    assert part_of(chunk) == part


def test_the_final_stats_are_measured_from_the_parts():
    answer = Answer(started=1_000)
    for part, at in [
        (Part(), 1_100),  # the role chunk: no token yet
        (Part("Paris"), 1_500),
        (Part("."), 1_600),
        (Part(finish_reason="stop"), 1_700),
        (Part(usage=USAGE), 1_750),
    ]:
        answer.feed(part, at)
    assert "".join(answer.text) == "Paris."
    assert answer.stats() == {
        "done_reason": "stop",
        "total_duration": 750,
        "load_duration": 0,
        "prompt_eval_count": 31,
        "prompt_eval_duration": 500,
        "eval_count": 4,
        "eval_duration": 250,
    }


def test_an_answer_with_nothing_back_has_zero_stats():
    stats = Answer(started=5).stats()
    assert stats["total_duration"] == stats["eval_duration"] == stats["eval_count"] == 0


@pytest.mark.parametrize(
    "finish, reason",
    [("stop", "stop"), ("length", "length"), ("tool_calls", "stop"), (None, "stop")],
)
def test_done_reasons(finish: str | None, reason: str):
    assert done_reason(finish) == reason


def test_streamed_tool_call_fragments_become_ollama_calls():
    answer = Answer(started=0)
    fragments = [
        {**FRAGMENT, "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
        {"index": 1, "id": "call_y", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    for i, fragment in enumerate(fragments):
        answer.feed(Part(tool_calls=(fragment,)), i)
    answer.feed(Part(finish_reason="tool_calls"), 9)
    assert answer.tool_calls() == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_time", "arguments": {}}},
    ]
    assert answer.stats()["done_reason"] == "stop"


@pytest.mark.parametrize("arguments", ["[1, 2]", "{not json", '"text"'])
def test_tool_arguments_that_are_not_an_object_are_an_error(arguments: str):
    with pytest.raises(ValueError, match="not a JSON object"):
        ollama_tool_calls([{"name": "f", "arguments": arguments}])


@pytest.mark.parametrize(
    "count, size",
    [(0, ""), (999, "999"), (500_000, "500K"), (134_515_008, "134.52M"), (7_000_000, "7M"),
     (7_615_616_512, "7.6B"), (70_000_000_000, "70B")],
)  # fmt: skip
def test_parameter_sizes_as_ollama_writes_them(count: int, size: str):
    assert parameter_size(count) == size


def test_an_error_mid_stream_is_the_last_line():
    async def chunks() -> AsyncIterator[dict]:
        yield _chunk({"content": "Par"})
        raise UpstreamError(503, "The model's rank 0 went away mid-answer.")

    async def lines() -> list[dict]:
        render = api._chat_render("m")
        stream = api._lines(_chunk({"role": "assistant"}), chunks(), Answer(0), render)
        return [json.loads(line) async for line in stream]

    out = asyncio.run(lines())
    assert out[0]["message"] == {"role": "assistant", "content": "Par"} and not out[0]["done"]
    assert out[-1] == {"error": "The model's rank 0 went away mid-answer."}


# ---- the node: bad input answered in Ollama's shape -----------------------------------------

PREFIXES = ["/api", "/ollama/api"]


def _post(server: LiveServer, prefix: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{prefix}{path}", timeout=60, **kwargs)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "path, kwargs, status, words",
    [
        ("/chat", {"content": b"{not json"}, 400, "not valid JSON"),
        ("/chat", {"content": b"[1]"}, 400, "JSON object"),
        ("/chat", {"json": {"model": MODEL, "messages": "hi"}}, 400, "messages"),
        ("/chat", {"json": {"model": MODEL, "options": {"temperature": "hot"}}}, 400,
         "options.temperature"),
        ("/chat", {"json": {"model": "no-such-model", "messages": FRANCE}}, 404, "not found"),
        ("/chat", {"json": {"model": MODEL, "messages": FRANCE, "format": "json"}}, 400,
         "constrain decoding"),
        ("/chat", {"json": {"model": MODEL, "messages": [
            {"role": "user", "content": "What is this?", "images": ["aGk="]}]}}, 400, "text only"),
        ("/chat", {"json": {"model": MODEL, "messages": FRANCE, "options": {"temperature": 9}}},
         400, "temperature"),  # the runner's refusal, before any line of a stream
        ("/chat", {"json": {"model": MODEL, "messages": FRANCE, "stream": False,
                            "options": {"temperature": 9}}}, 400, "temperature"),
        ("/generate", {"json": {"model": MODEL, "prompt": "Hi", "raw": True,
                                "options": {"top_p": 0}}}, 400, "top_p"),
        ("/generate", {"json": {"model": MODEL, "prompt": "Hi", "suffix": "x"}}, 400, "suffix"),
        ("/generate", {"json": {"model": "nope", "prompt": "Hi"}}, 404, "not found"),
        ("/show", {"json": {"model": "nope"}}, 404, "not found"),
        ("/show", {"json": {}}, 400, "model is required"),
        ("/pull", {"json": {"model": MODEL}}, 404, "not served by shoal"),
    ],
)  # fmt: skip
def test_bad_input_gets_ollama_errors(
    server: LiveServer, prefix: str, path: str, kwargs: dict, status: int, words: str
):
    response = _post(server, prefix, path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert words in body["error"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_wrong_method_is_a_405_in_ollama_shape(server: LiveServer, prefix: str):
    response = httpx.get(f"{server.url}{prefix}/chat", timeout=10)
    assert response.status_code == 405 and "use POST" in response.json()["error"]


# ---- the node, through the real ollama client ------------------------------------------------


@pytest.fixture(params=["", "/ollama"], ids=["api", "ollama-api"])
def client(request, server: LiveServer) -> ollama.Client:
    return ollama.Client(host=server.url + request.param, timeout=60)


def test_version(client: ollama.Client):
    response = client._client.get("/api/version")  # the client has no method for it
    assert response.json() == {"version": __version__}


def test_list_shows_the_served_model_with_what_the_node_knows(
    client: ollama.Client, server: LiveServer
):
    (model,) = client.list().models
    held = server.node.held_models[MODEL]
    assert model.model == MODEL and model.digest == held.files_digest
    assert model.size == Path(bundled_model_path()).stat().st_size
    assert model.modified_at is not None and model.modified_at.tzinfo is not None
    details = model.details
    assert (details.format, details.family) == ("gguf", "llama")
    assert (details.parameter_size, details.quantization_level) == ("134.52M", "Q4_1")


def test_show(client: ollama.Client, server: LiveServer):
    shown = client.show(MODEL)
    assert shown.modelinfo["llama.context_length"] == server.node.held_models[MODEL].context_length
    assert shown.modelinfo["general.parameter_count"] == 134_515_008
    assert "<|im_start|>" in shown.template and "FROM " in shown.modelfile
    served = server.node.models[MODEL].context_length
    assert shown.parameters == f"num_ctx {served}" and shown.details.family == "llama"
    assert client.show(MODEL + ":latest").modelinfo == shown.modelinfo  # the default tag


def test_ps(client: ollama.Client, server: LiveServer):
    (running,) = client.ps().models
    assert running.model == MODEL
    assert running.context_length == server.node.models[MODEL].context_length
    assert running.size == server.node.held_models[MODEL].weight_bytes and running.size_vram == 0
    assert running.expires_at is not None and running.expires_at.year > 2100  # never unloaded


def _final_stats_hold(final) -> None:
    assert final.done and final.done_reason in ("stop", "length")
    assert final.prompt_eval_count > 0 and 0 < final.eval_count <= 16
    assert final.total_duration >= final.prompt_eval_duration + final.eval_duration > 0
    assert final.load_duration == 0


def test_chat_whole_and_streamed(client: ollama.Client):
    whole = client.chat(model=MODEL, messages=FRANCE, options=GREEDY, stream=False)
    assert whole.message.role == "assistant" and "Paris" in whole.message.content
    _final_stats_hold(whole)
    parts = list(client.chat(model=MODEL, messages=FRANCE, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and len(parts) > 2
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    _final_stats_hold(parts[-1])
    assert parts[-1].eval_count == whole.eval_count


def test_generate_whole_and_streamed(client: ollama.Client):
    prompt = "What is the capital of France?"
    whole = client.generate(model=MODEL, prompt=prompt, options=GREEDY, stream=False)
    assert "Paris" in whole.response
    _final_stats_hold(whole)
    parts = list(client.generate(model=MODEL, prompt=prompt, options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    _final_stats_hold(parts[-1])


def test_generate_with_a_system_prompt_and_raw(client: ollama.Client):
    told = client.generate(
        model=MODEL, prompt="What is the capital of France?", system="Answer in one word.",
        options=GREEDY, stream=False,
    )  # fmt: skip
    assert "Paris" in told.response
    raw = client.generate(
        model=MODEL, prompt="The capital of France is", raw=True,
        options={"temperature": 0, "num_predict": 4}, stream=False,
    )  # fmt: skip
    assert raw.eval_count <= 4 and "Paris" in raw.response


def test_an_empty_prompt_only_loads(client: ollama.Client):
    loaded = client.generate(model=MODEL, prompt="", stream=False)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_a_refusal_reaches_the_client_as_a_response_error(client: ollama.Client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=FRANCE, stream=False)
    assert caught.value.status_code == 404 and "not found" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.chat(model=MODEL, messages=FRANCE, options={"temperature": 9}, stream=True))
    assert caught.value.status_code == 400
    assert client.list().models  # and the node keeps serving


@pytest.fixture(scope="module")
def called(server: LiveServer) -> list[dict]:
    """A real call of the model, as /api/chat streams it. Ollama has no tool_choice and the
    bundled 135M model does not call on its own, so the call is forced upstream (OpenAI's
    tool_choice) and its chunks go through the same lines /api/chat writes."""
    forced = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 40,
        "temperature": 0,
    }

    async def lines() -> list[dict]:
        chunks = upstream.stream(server.node, forced)
        first = await anext(chunks)
        out = api._lines(first, chunks, Answer(0), api._chat_render(MODEL))
        return [json.loads(line) async for line in out]

    return asyncio.run(lines())


def test_a_tool_round_trip(client: ollama.Client, called: list[dict]):
    """The model's call reaches the client in Ollama's shape (arguments an object); the tool's
    answer goes back as Ollama sends it (role "tool", tool_name, no call id) and the model
    answers in text."""
    *_, calling, final = called
    assert "error" not in final, final
    parsed = ollama.ChatResponse(**calling)  # what the client makes of the line
    (call,) = parsed.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    assert final["done"] and final["done_reason"] == "stop" and final["eval_count"] > 0
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        parsed.message,
        {"role": "tool", "tool_name": "get_weather", "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    answer = client.chat(
        model=MODEL, messages=history, tools=[WEATHER], options=GREEDY, stream=False
    )
    assert answer.done and answer.message.content and not answer.message.tool_calls


def test_a_client_that_goes_away_mid_stream_frees_the_slot(server: LiveServer):
    # Counting on from "5," runs to the token limit (1500: minutes here), so only the
    # disconnect can end it within the wait below.
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "raw": True,
            "options": {"temperature": 0, "num_predict": 1500}}  # fmt: skip
    tokens_before = server.runner_status()["tokens"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/api/generate", json=body) as response:
            assert response.headers["content-type"].startswith("application/x-ndjson")
            lines = response.iter_lines()
            assert json.loads(next(lines))["done"] is False
            assert server.runner_status()["in_flight"] == 1
            del lines  # the client goes away here
    deadline = time.monotonic() + 5
    while server.runner_status()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.runner_status()["in_flight"] == 0
    assert server.runner_status()["tokens"] - tokens_before < 1500
