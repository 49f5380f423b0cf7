"""The OpenAI-compatible API against a real node: bundled SmolLM2, uvicorn, the openai client."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from shoal.api.app import create_app
from shoal.api.dashboard import FILES
from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL
from shoal.node import startup_banner

from conftest import TEST_CONTEXT, LiveServer

# The first test also waits for the session's model load and warm-up.
pytestmark = pytest.mark.timeout(180)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def chat_text(client: openai.OpenAI, **kwargs: Any) -> str:
    result = client.chat.completions.create(model=MODEL, messages=FRANCE, **kwargs)
    return result.choices[0].message.content or ""


def test_health_is_ok_after_warm_up(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_models_are_listed_with_their_context_length(
    server: LiveServer, client: openai.OpenAI
) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "shoal")
    raw = httpx.get(f"{server.base_url}/models").json()
    assert raw["object"] == "list"
    assert raw["data"][0]["context_length"] == TEST_CONTEXT


def test_greedy_chat_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=24
    )
    assert "Paris" in (result.choices[0].message.content or "")
    assert result.id.startswith("chatcmpl-") and result.model == MODEL
    assert result.choices[0].finish_reason == "stop"
    usage = result.usage
    assert usage and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole = chat_text(client, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for
    assert {c.id for c in chunks} == {chunks[0].id} and {c.model for c in chunks} == {MODEL}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole


def test_include_usage_adds_a_last_chunk_with_usage_and_no_choices(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=FRANCE,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_list_of_text_parts_is_one_message(client: openai.OpenAI) -> None:
    parts = [
        {"type": "text", "text": "What is the capital"},
        {"type": "text", "text": "of France?"},
    ]
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=16
    )
    assert "Paris" in (result.choices[0].message.content or "")


def test_text_completion_streamed_and_whole(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    whole = client.completions.create(**kwargs)
    assert whole.id.startswith("cmpl-") and whole.model == MODEL
    assert whole.choices[0].text and whole.usage and whole.usage.completion_tokens <= 8
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage


def test_same_seed_same_text(client: openai.OpenAI) -> None:
    texts = {chat_text(client, temperature=0.8, seed=1234, max_tokens=16) for _ in range(2)}
    assert len(texts) == 1


def test_stop_string_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stop=["Paris"]
    )
    text = result.choices[0].message.content or ""
    assert text.startswith("The capital of France") and "Paris" not in text
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].model_extra["stop_reason"] == "Paris"  # vLLM's field


def test_continuous_usage_counts_every_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, max_tokens=6, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )  # fmt: skip
    prompt = chunks[0].usage.prompt_tokens
    assert prompt > 0 and chunks[0].usage.completion_tokens == 0
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and done[-1] == 6
    assert {c.usage.prompt_tokens for c in chunks} == {prompt}


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_token_limit_gives_length_with_exactly_that_many_tokens(
    client: openai.OpenAI, limit: str
) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, **{limit: 3}
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage and result.usage.completion_tokens == 3


def _open_long_stream(http: httpx.Client) -> Any:
    # "user" is an OpenAI option shoal does not use: unknown fields are ignored, not refused.
    body = {
        "model": MODEL,
        "messages": FRANCE,
        "stream": True,
        "max_tokens": 1500,
        "ignore_eos": True,
        "user": "test",
    }
    return http.stream("POST", CHAT, json=body)


def _read_first_content(response: httpx.Response) -> Iterator[str]:
    """Read up to the first content chunk; the caller must hold the returned line iterator
    while the stream is meant to stay open: a dropped iter_lines() generator is finalized at
    once, and httpcore closes the connection on that GeneratorExit (a real disconnect)."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
            "content"
        ):
            return lines
    raise AssertionError("the stream ended before any content")


def _wait_until_idle(server: LiveServer, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while server.runner_status()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.runner_status()["in_flight"] == 0


def test_parallel_requests_complete_in_one_batch(server: LiveServer, client: openai.OpenAI) -> None:
    batched_before = server.runner_status()["batched_steps"]  # other tests ran before
    with httpx.Client(base_url=server.url, timeout=60) as http, _open_long_stream(http) as anchor:
        # The anchor is generating (1500 tokens: it cannot finish during this test), so the
        # requests below must share decode steps with it: batching is proven, not timed.
        open_lines = _read_first_content(anchor)
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(
                    lambda i: client.chat.completions.create(
                        model=MODEL,
                        messages=FRANCE,
                        max_tokens=12,
                        seed=i,
                        extra_body={"ignore_eos": True},
                    ),
                    range(4),
                )
            )
        assert next(open_lines) is not None  # the anchor was still streaming all along
    assert [r.usage.completion_tokens for r in results if r.usage] == [12] * 4
    assert server.runner_status()["batched_steps"] > batched_before  # a batch of >= 2
    _wait_until_idle(server)


def test_client_disconnect_mid_stream_frees_the_slot(server: LiveServer) -> None:
    tokens_before = server.runner_status()["tokens"]
    with httpx.Client(base_url=server.url, timeout=60) as http, _open_long_stream(http) as stream:
        open_lines = _read_first_content(stream)
        assert server.runner_status()["in_flight"] == 1
        del open_lines  # the client goes away here, mid-stream
    # Leaving the block closed the connection: the sequence must leave the batch promptly,
    # long before its 1500 tokens could have been generated.
    _wait_until_idle(server, seconds=5)
    assert server.runner_status()["tokens"] - tokens_before < 1500


def test_startup_banner_has_url_and_curl_line(server: LiveServer) -> None:
    banner = startup_banner(server.node, server.port, 1.5)
    assert f"http://127.0.0.1:{server.port}/v1" in banner
    assert f"curl http://127.0.0.1:{server.port}/v1/chat/completions" in banner and MODEL in banner
    assert "1.5 s" in banner


# ---- bad requests: each answers with an OpenAI error, and the server keeps serving ----------

OK_MSGS = [{"role": "user", "content": "Hi"}]
TOO_LONG = "hello " * (TEST_CONTEXT + 100)
BAD_REQUESTS = [
    # name, method, path, body (dict = JSON, bytes = raw), status, param, code
    ("malformed_json", "POST", CHAT, b'{"model": "x", "messages": [', 400, None, None),
    ("body_not_an_object", "POST", CHAT, b"[1, 2]", 400, None, None),
    ("no_body", "POST", CHAT, b"", 400, None, None),
    ("missing_messages", "POST", CHAT, {"model": MODEL}, 400, "messages", None),
    ("empty_messages", "POST", CHAT, {"model": MODEL, "messages": []}, 400, "messages", None),
    (
        "messages_not_a_list",
        "POST",
        CHAT,
        {"model": MODEL, "messages": "Hi"},
        400,
        "messages",
        None,
    ),
    (
        "content_not_text",
        "POST",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
        None,
    ),
    (
        "image_part",
        "POST",
        CHAT,
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        },
        400,
        "messages[0].content",
        None,
    ),
    (
        "unknown_role",
        "POST",
        CHAT,
        {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]},
        400,
        "messages[0].role",
        None,
    ),
    ("missing_model", "POST", CHAT, {"messages": OK_MSGS}, 400, "model", None),
    (
        "unknown_model",
        "POST",
        CHAT,
        {"model": "gpt-9", "messages": OK_MSGS},
        404,
        "model",
        "model_not_found",
    ),
    (
        "unknown_model_streaming",
        "POST",
        CHAT,
        {"model": "gpt-9", "messages": OK_MSGS, "stream": True},
        404,
        "model",
        "model_not_found",
    ),
    (
        "temperature_not_a_number",
        "POST",
        CHAT,
        {"model": MODEL, "messages": OK_MSGS, "temperature": "hot"},
        400,
        "temperature",
        None,
    ),
    (
        "temperature_negative",
        "POST",
        CHAT,
        {"model": MODEL, "messages": OK_MSGS, "temperature": -1},
        400,
        "temperature",
        None,
    ),
    (
        "top_p_zero",
        "POST",
        CHAT,
        {"model": MODEL, "messages": OK_MSGS, "top_p": 0},
        400,
        "top_p",
        None,
    ),
    (
        "max_tokens_zero",
        "POST",
        CHAT,
        {"model": MODEL, "messages": OK_MSGS, "max_tokens": 0},
        400,
        "max_tokens",
        None,
    ),
    (
        "max_tokens_negative",
        "POST",
        CHAT,
        {"model": MODEL, "messages": OK_MSGS, "max_tokens": -5},
        400,
        "max_tokens",
        None,
    ),
    (
        "max_completion_tokens_zero",
        "POST",
        CHAT,
        {"model": MODEL, "messages": OK_MSGS, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
        None,
    ),
    (
        "stop_not_strings",
        "POST",
        CHAT,
        {"model": MODEL, "messages": OK_MSGS, "stop": [1]},
        400,
        "stop[0]",
        None,
    ),
    (
        "stream_not_a_bool",
        "POST",
        CHAT,
        {"model": MODEL, "messages": OK_MSGS, "stream": "yes"},
        400,
        "stream",
        None,
    ),
    ("n_two", "POST", CHAT, {"model": MODEL, "messages": OK_MSGS, "n": 2}, 400, "n", None),
    (
        "chat_too_long",
        "POST",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": TOO_LONG}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    ("completion_missing_prompt", "POST", COMPLETIONS, {"model": MODEL}, 400, "prompt", None),
    (
        "completion_empty_prompt",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": ""},
        400,
        "prompt",
        None,
    ),
    (
        "completion_prompt_not_text",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": 5},
        400,
        "prompt",
        None,
    ),
    (
        "completion_too_long",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": TOO_LONG, "stream": True},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "completion_max_tokens_zero",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": "Hi", "max_tokens": 0},
        400,
        "max_tokens",
        None,
    ),
    (
        "completion_unknown_model",
        "POST",
        COMPLETIONS,
        {"model": "gpt-9", "prompt": "Hi"},
        404,
        "model",
        "model_not_found",
    ),
    ("unknown_model_card", "GET", "/v1/models/gpt-9", None, 404, "model", "model_not_found"),
    ("unknown_route", "GET", "/v1/nothing", None, 404, None, "not_found"),
    ("wrong_method", "GET", CHAT, None, 405, None, "method_not_allowed"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[c[0] for c in BAD_REQUESTS],
)
def test_bad_request_gets_an_openai_error_and_serving_goes_on(
    server: LiveServer,
    method: str,
    path: str,
    body: dict[str, Any] | bytes | None,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        if isinstance(body, bytes):
            response = http.request(
                method, path, content=body, headers={"Content-Type": "application/json"}
            )
        else:
            response = http.request(method, path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(response.json()) == {"error"}
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == (param, code)
        if code == "context_length_exceeded":
            assert str(TEST_CONTEXT) in error["message"]
        if code == "model_not_found":
            assert MODEL in error["message"]  # the message lists what is served
        good = http.post(CHAT, json={"model": MODEL, "messages": OK_MSGS, "max_tokens": 1})
        assert good.status_code == 200


def test_health_is_503_with_the_reason_until_warmed_up() -> None:
    class WarmingHost:
        models: dict[str, Any] = {}
        ready = False
        not_ready_reason = "warming up some-model"

    with TestClient(create_app(WarmingHost())) as http:
        response = http.get("/health")
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "warming up some-model"


def test_unexpected_exception_is_a_500_with_an_openai_error() -> None:
    class BrokenHost:
        ready = True
        not_ready_reason = ""

        @property
        def models(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    with TestClient(create_app(BrokenHost())) as http:
        response = http.get("/v1/models")
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert "boom" in response.json()["error"]["message"]
        assert http.get("/health").status_code == 200


def test_index_and_every_module_are_served_from_the_package() -> None:
    class NoModels:
        models: dict[str, Any] = {}
        ready = True
        not_ready_reason = ""

    client = TestClient(create_app(NoModels()))
    index = client.get("/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert '<script type="module" src="/dashboard/app.js">' in index.text
    scripts = sorted(FILES.rglob("*.js"))
    assert len(scripts) >= 7
    for path in scripts:
        served = client.get(f"/dashboard/{path.relative_to(FILES).as_posix()}")
        assert served.status_code == 200 and "javascript" in served.headers["content-type"], path
        # every relative import names a file that exists: no build step resolves them
        for target in re.findall(r'from "(\.[^"]+)"', served.text):
            assert (path.parent / target).resolve().is_file(), (path, target)
    assert client.get("/dashboard/no-such.js").status_code == 404
