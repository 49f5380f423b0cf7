"""`shoal chat` and `shoal bench`: pure helpers table by table, the chat client against a mock
transport, then both commands end to end against a real node in a subprocess."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.ops import bench, chat
from shoal.ops.bench import Calibration, Cell, RequestResult

# ---- chat: pure helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "base"),
    [
        ("http://127.0.0.1:52415", "http://127.0.0.1:52415"),
        ("http://127.0.0.1:52415/", "http://127.0.0.1:52415"),
        ("http://host:52415/v1", "http://host:52415"),
        ("http://host:52415/v1/", "http://host:52415"),
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://gpu-box.lan", "https://gpu-box.lan"),
    ],
)
def test_api_base_accepts_what_users_type(typed: str, base: str) -> None:
    assert chat.api_base(typed) == base


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ('data: {"a": 1}', {"a": 1}),
        ('data:{"a": 1}', {"a": 1}),
        ('data: {"a": 1}\r', {"a": 1}),
        ("data: [DONE]", chat.SSE_DONE),
        ("", None),
        (": keep-alive", None),
        ("event: message", None),
        ("id: 7", None),
    ],
)
def test_sse_lines(line: str, parsed: Any) -> None:
    assert chat.parse_sse_line(line) == parsed


@pytest.mark.parametrize("line", ["data: {not json", "data: [1, 2]"])
def test_malformed_sse_data_is_an_error_not_a_silent_skip(line: str) -> None:
    with pytest.raises(ValueError, match="SSE data"):
        chat.parse_sse_line(line)


@pytest.mark.parametrize(
    ("payload", "delta"),
    [
        ({"choices": [{"delta": {"role": "assistant"}}]}, chat.ChunkDelta()),
        ({"choices": [{"delta": {"content": "Hi"}}]}, chat.ChunkDelta("Hi")),
        ({"choices": [{"delta": {}, "finish_reason": "stop"}]}, chat.ChunkDelta("", "stop")),
        ({"choices": [{"text": " there", "finish_reason": None}]}, chat.ChunkDelta(" there")),
        ({"choices": [{"text": "", "finish_reason": "length"}]}, chat.ChunkDelta("", "length")),
        (
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
            chat.ChunkDelta(usage={"prompt_tokens": 5, "completion_tokens": 2}),
        ),
        ({"error": {"message": "boom", "type": "server_error"}}, chat.ChunkDelta(error="boom")),
    ],
)
def test_chunks_of_chat_and_text_completions(payload: dict, delta: chat.ChunkDelta) -> None:
    assert chat.read_chunk(payload) == delta


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            404,
            b'{"error": {"message": "model x not found", "type": "not_found"}}',
            "HTTP 404: model x not found",
        ),
        (400, b'{"error": "bad request"}', "HTTP 400: bad request"),
        (422, b'{"detail": "field required"}', "HTTP 422: field required"),
        (500, b"Internal\nServer   Error", "HTTP 500: Internal Server Error"),
        (502, b"", "HTTP 502: (empty body)"),
    ],
)
def test_error_bodies_become_one_line(status: int, body: bytes, message: str) -> None:
    assert chat.error_message(status, body) == message


@pytest.mark.parametrize(
    ("tokens", "ttft", "total", "rate"),
    [
        (11, 1.0, 2.0, 10.0),  # ten tokens after the first, in one second
        (1, 0.5, 0.5, None),  # a single token has no decode phase
        (5, None, 1.0, None),  # nothing arrived
        (5, 1.0, 1.0, None),  # all at once: no measurable interval
    ],
)
def test_decode_rate_counts_only_tokens_after_the_first(
    tokens: int, ttft: float | None, total: float, rate: float | None
) -> None:
    assert chat.decode_rate(tokens, ttft, total) == rate


def test_stats_line_shows_tokens_rate_and_ttft() -> None:
    result = chat.StreamResult("x", 5, 11, 0.25, 1.25, "length")
    assert chat.format_stats(result) == "11 tokens · 10.0 tok/s · TTFT 0.25 s · finish: length"


# ---- chat: the client against a mock transport -------------------------------------------


def sse(*payloads: dict | str) -> bytes:
    lines = [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads]
    return "".join(lines).encode()


def chat_answer(*pieces: str, prompt_tokens: int = 7) -> bytes:
    chunks: list[dict | str] = [{"choices": [{"delta": {"role": "assistant"}}]}]
    chunks += [{"choices": [{"delta": {"content": p}}]} for p in pieces]
    chunks.append({"choices": [{"delta": {}, "finish_reason": "stop"}]})
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces)}
    chunks += [{"choices": [], "usage": usage}, "[DONE]"]
    return sse(*chunks)


class InterruptedStream(httpx.SyncByteStream):
    """Yields the first chunk, then the user presses Ctrl-C."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        raise KeyboardInterrupt

    def close(self) -> None:
        self.closed = True


class FakeApi:
    """Answers /v1/models and /v1/chat/completions; records each chat request body."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.requests: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "tiny"}]})
        self.requests.append(json.loads(request.content))
        answer = self.answers.pop(0)
        if isinstance(answer, httpx.Response):
            return answer
        if isinstance(answer, httpx.SyncByteStream):
            return httpx.Response(200, stream=answer)
        return httpx.Response(200, content=answer)


def session_for(api: FakeApi, system: str | None = None) -> chat.ChatSession:
    client = httpx.Client(transport=httpx.MockTransport(api))
    return chat.ChatSession(client, "http://node", "tiny", system=system, max_tokens=16)


def scripted(lines: list[str]):  # noqa: ANN201
    pending = list(lines)

    def read_line(prompt: str) -> str:
        if not pending:
            raise EOFError
        line = pending.pop(0)
        if line == "^C":
            raise KeyboardInterrupt
        return line

    return read_line


def test_stream_request_collects_text_usage_and_timing() -> None:
    api = FakeApi([chat_answer("Hel", "lo", "!")])
    session = session_for(api)
    seen: list[str] = []
    result = session.ask("hi", seen.append)
    assert seen == ["Hel", "lo", "!"]
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Hello!", 7, 3)
    assert result.finish_reason == "stop"
    assert result.ttft_s is not None and 0 <= result.ttft_s <= result.total_s
    body = api.requests[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 16 and "temperature" not in body


def test_repl_keeps_history_resets_and_exits() -> None:
    api = FakeApi([chat_answer("Paris."), chat_answer("About 2 million."), chat_answer("Hi.")])
    out = io.StringIO()
    lines = ["Capital of France?", "Population?", "/reset", "Hello", "/exit", "never read"]
    code = chat.repl(session_for(api, system="Be brief."), out, scripted(lines))
    assert code == chat.EXIT_OK
    roles = [[m["role"] for m in r["messages"]] for r in api.requests]
    assert roles == [
        ["system", "user"],
        ["system", "user", "assistant", "user"],
        ["system", "user"],  # /reset keeps the system prompt, drops the turns
    ]
    assert api.requests[1]["messages"][2]["content"] == "Paris."
    text = out.getvalue()
    assert "Paris." in text and "conversation cleared" in text and "tok/s" in text


def test_ctrl_c_stops_the_answer_closes_the_stream_and_stays_in_the_repl() -> None:
    stream = InterruptedStream(sse({"choices": [{"delta": {"content": "Once upon"}}]}))
    api = FakeApi([stream, chat_answer("Sure.")])
    out = io.StringIO()
    code = chat.repl(session_for(api), out, scripted(["Tell a long story", "^C", "Short one"]))
    assert code == chat.EXIT_OK  # Ctrl-D (end of script) ends the REPL cleanly
    assert stream.closed
    assert "answer stopped" in out.getvalue()
    # The interrupted turn is not part of the conversation the next question carries.
    assert [m["content"] for m in api.requests[1]["messages"]] == ["Short one"]


def test_api_error_in_the_repl_is_one_line_and_the_repl_goes_on() -> None:
    error = httpx.Response(400, json={"error": {"message": "prompt too long"}})
    api = FakeApi([error, chat_answer("ok")])
    out = io.StringIO()
    assert chat.repl(session_for(api), out, scripted(["x" * 10, "y"])) == chat.EXIT_OK
    assert "error: HTTP 400: prompt too long\n" in out.getvalue()
    assert [m["content"] for m in api.requests[1]["messages"]] == ["y"]


def test_an_error_event_inside_the_stream_is_an_api_error() -> None:
    api = FakeApi([sse({"choices": [{"delta": {"content": "a"}}]}, {"error": {"message": "x"}})])
    with pytest.raises(chat.ApiError, match="x"):
        session_for(api).ask("q", lambda _: None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["chat", "bench"])
def test_nobody_listening_prints_the_url_and_how_to_start_a_node(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["--api", url, "-m", "hi"] if command == "chat" else ["--api", url, "--out", os.devnull]
    code = (chat if command == "chat" else bench).main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and url in err and "shoal run" in err


# ---- bench: pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([3.0], 95, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),  # order does not matter
        ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 100, 5.0),
        ([10.0, 20.0], 95, 19.5),
    ],
)
def test_percentile_interpolates_between_ranks(values: list[float], q: float, expected) -> None:
    got = bench.percentile(values, q)
    assert got == expected if expected is None else math.isclose(got, expected)


@pytest.mark.parametrize(
    ("text", "values"),
    [("128,512,1024", [128, 512, 1024]), ("4", [4]), ("1, 2,", [1, 2])],
)
def test_int_list(text: str, values: list[int]) -> None:
    assert bench.int_list(text) == values


@pytest.mark.parametrize("text", ["", "a,b", "0", "4,-1"])
def test_int_list_rejects(text: str) -> None:
    with pytest.raises(Exception, match="expected"):
        bench.int_list(text)


def test_synthetic_text_is_deterministic_sized_and_differs_by_seed() -> None:
    text = bench.synthetic_text(30, seed=3)
    assert text == bench.synthetic_text(30, seed=3)
    assert len(text.split()) == 30
    assert text != bench.synthetic_text(30, seed=4)
    assert bench.synthetic_text(0, seed=1) == ""


@pytest.mark.parametrize(
    ("samples", "target", "words"),
    [
        ([(16, 20), (128, 132)], 128, 124),  # one token per word plus 4 of overhead
        ([(128, 257), (16, 33)], 1023, 511),  # two tokens per word, one of overhead
        ([(16, 20), (128, 132)], 2, 1),  # never fewer than one word
    ],
)
def test_calibration_turns_a_token_target_into_words(samples, target: int, words: int) -> None:
    assert Calibration.from_samples(samples).words_for(target) == words


@pytest.mark.parametrize("samples", [[(16, 20), (16, 20)], [(16, 40), (128, 40)]])
def test_calibration_refuses_samples_that_cannot_fit_a_line(samples) -> None:
    with pytest.raises(ValueError):
        Calibration.from_samples(samples)


def test_cells_cover_the_grid_in_order_with_requests_defaulting_to_concurrency() -> None:
    assert bench.plan_cells([128, 512], [1, 4], None) == [
        Cell(1, 128, 1, 1),
        Cell(2, 128, 4, 4),
        Cell(3, 512, 1, 1),
        Cell(4, 512, 4, 4),
    ]
    assert [c.requests for c in bench.plan_cells([16], [1, 2], 5)] == [5, 5]


def test_request_rates() -> None:
    r = RequestResult(prompt_tokens=100, completion_tokens=11, ttft_s=0.5, latency_s=1.5)
    assert (r.decode_tps, r.prefill_tps, r.ok) == (10.0, 200.0, True)
    failed = RequestResult(None, 0, None, 3.0, "timed out")
    assert (failed.decode_tps, failed.prefill_tps, failed.ok) == (None, None, False)


def test_cell_summary_aggregates_over_wall_time_and_keeps_failures_apart() -> None:
    results = [
        RequestResult(100, 8, 0.2, 1.0),
        RequestResult(102, 8, 0.4, 1.2),
        RequestResult(101, 5, 0.3, 0.9),  # stopped early: EOS was not ignored
        RequestResult(None, 0, None, 2.0, "HTTP 500: boom"),
    ]
    s = bench.summarize_cell(Cell(3, 100, 4, 4), results, wall_s=1.5, max_tokens=8)
    assert (s.cell, s.concurrency, s.requests, s.ok, s.errors) == (3, 4, 4, 3, 1)
    assert s.first_error == "HTTP 500: boom"
    assert (s.prompt_tokens_mean, s.prompt_tokens_min, s.prompt_tokens_max) == (101, 100, 102)
    assert s.completion_tokens == 21 and s.short_requests == 1
    assert math.isclose(s.aggregate_decode_tps, 21 / 1.5)
    assert math.isclose(s.latency_p50_s, 1.0) and math.isclose(s.ttft_p50_s, 0.3)
    assert math.isclose(s.latency_p95_s, 1.18)
    assert "100/101" in bench.format_table([s])


def test_a_cell_where_everything_failed_has_no_rates() -> None:
    s = bench.summarize_cell(Cell(1, 16, 1, 1), [RequestResult(None, 0, None, 1, "x")], 1.0, 4)
    assert s.ok == 0 and s.aggregate_decode_tps is None and s.latency_p50_s is None
    assert "-" in bench.format_table([s])


def test_cell_record_is_plain_json_with_every_request() -> None:
    results = [RequestResult(10, 4, 0.1, 0.4)]
    summary = bench.summarize_cell(Cell(1, 16, 1, 1), results, 0.4, 4)
    record = bench.cell_record(summary, results, {"model": "m"})
    again = json.loads(json.dumps(record))
    assert again["model"] == "m" and again["cell"] == 1
    assert again["request_results"][0]["decode_tps"] == 10.0


# ---- end to end against a real node ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("node") / "shoal-run.log").open("w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "run", "--host", "127.0.0.1", "--api-port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"node at {url} not healthy within 180 s")
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            pytest.fail(f"`shoal run` exited with {proc.returncode}:\n{tail}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def shoal(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.timeout(300)
def test_chat_one_shot_answers_from_the_node(node: str) -> None:
    done = shoal(
        "chat", "--api", node, "-m", "Say hello.", "--max-tokens", "8", "--temperature", "0"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "tok/s" in done.stderr and "TTFT" in done.stderr


@pytest.mark.timeout(300)
def test_chat_reads_the_question_from_stdin(node: str) -> None:
    done = shoal("chat", "--api", node, "--max-tokens", "4", stdin="What is 2+2?\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.timeout(300)
def test_chat_with_an_unknown_model_prints_the_api_error_once(node: str) -> None:
    done = shoal("chat", "--api", node, "--model", "no/such-model", "-m", "hi")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "error:" in done.stderr


@pytest.mark.timeout(300)
def test_bench_writes_one_valid_line_per_cell(node: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    done = shoal(
        "bench",
        "--api",
        node,
        "--prompt-tokens",
        "16",
        "--concurrency",
        "1,2",
        "--max-tokens",
        "4",
        "--out",
        str(out),
        "--timeout",
        "60",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cell 2/2" in done.stdout
    cells = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(c["cell"], c["concurrency"], c["requests"]) for c in cells] == [(1, 1, 1), (2, 2, 2)]
    for c in cells:
        assert c["ok"] == c["requests"] and c["errors"] == 0
        assert c["completion_tokens"] == 4 * c["requests"]  # ignore_eos: exactly max_tokens
        assert c["short_requests"] == 0
        assert 8 <= c["prompt_tokens_mean"] <= 32  # "about 16" through the real tokenizer
        for key in (
            "aggregate_decode_tps",
            "ttft_p50_s",
            "ttft_p95_s",
            "latency_p50_s",
            "latency_p95_s",
            "decode_tps_mean",
            "prefill_tps_mean",
        ):
            assert isinstance(c[key], float) and math.isfinite(c[key]) and c[key] > 0, key
        assert c["ttft_p50_s"] <= c["latency_p50_s"]
