"""`shoal chat` and `shoal bench`: pure helpers table by table, the chat client against a mock
transport, then both commands end to end against a real node in a subprocess."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.ops import bench, bench_report, chat
from shoal.ops.bench_report import Calibration, Cell, RequestResult
from shoal.ops.client import AsyncApiClient
from shoal.schema.documents import StateDocument

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
    got = bench_report.percentile(values, q)
    assert got == expected if expected is None else math.isclose(got, expected)


@pytest.mark.parametrize(
    ("text", "values"),
    [("128,512,1024", [128, 512, 1024]), ("4", [4]), ("1, 2,", [1, 2])],
)
def test_int_list(text: str, values: list[int]) -> None:
    assert bench_report.int_list(text) == values


@pytest.mark.parametrize("text", ["", "a,b", "0", "4,-1"])
def test_int_list_rejects(text: str) -> None:
    with pytest.raises(Exception, match="expected"):
        bench_report.int_list(text)


def test_synthetic_text_is_deterministic_sized_and_differs_by_seed() -> None:
    text = bench_report.synthetic_text(30, seed=3)
    assert text == bench_report.synthetic_text(30, seed=3)
    assert len(text.split()) == 30
    assert text != bench_report.synthetic_text(30, seed=4)
    assert bench_report.synthetic_text(0, seed=1) == ""


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


def test_phases_run_in_their_fixed_order_whatever_order_they_are_named() -> None:
    assert bench_report.phase_list("concurrency, token_sweep") == ["token_sweep", "concurrency"]
    assert bench_report.phase_list("prompt_sweep") == ["prompt_sweep"]


@pytest.mark.parametrize("text", ["", "tokens", "concurrency,warmup"])
def test_phase_list_rejects(text: str) -> None:
    with pytest.raises(Exception, match="expected some of token_sweep"):
        bench_report.phase_list(text)


@pytest.mark.parametrize(
    ("text", "nodes"),
    [
        ("all", bench_report.ALL_NODES),
        (" all ", bench_report.ALL_NODES),
        ("10.0.0.2:52415", ["http://10.0.0.2:52415"]),
        ("http://a:1/v1, b:2,", ["http://a:1", "http://b:2"]),
    ],
)
def test_node_list(text: str, nodes: str | list[str]) -> None:
    assert bench_report.node_list(text) == nodes


def node_row(node_id: str, *addresses: str, status: str = "alive", is_self: bool = False) -> dict:
    return {
        "node_id": node_id,
        "name": node_id.upper(),
        "addresses": list(addresses),
        "status": status,
        "is_self": is_self,
    }


@pytest.mark.parametrize(
    ("rows", "api", "candidates"),
    [
        (  # the node behind --api is reached at --api and comes first, whatever its id
            [node_row("a", "10.0.0.1:8000"), node_row("b", "10.0.0.2:8000", is_self=True)],
            "http://10.0.0.2:8000",
            [("B", ["http://10.0.0.2:8000"]), ("A", ["http://10.0.0.1:8000"])],
        ),
        (  # a loopback test cluster: the address on --api's host is tried first
            [
                node_row("me", is_self=True),
                node_row("peer", "10.0.0.5:9", "127.0.0.1:9", "10.1.1.5:9"),
            ],
            "http://127.0.0.1:9000",
            [
                ("ME", ["http://127.0.0.1:9000"]),
                ("PEER", ["http://127.0.0.1:9", "http://10.0.0.5:9", "http://10.1.1.5:9"]),
            ],
        ),
        (  # gone nodes are left out; suspect ones still get requests
            [
                node_row("me", is_self=True),
                node_row("dead", "10.0.0.3:1", status="gone"),
                node_row("flaky", "10.0.0.4:1", status="suspect"),
            ],
            "http://127.0.0.1:9000",
            [("ME", ["http://127.0.0.1:9000"]), ("FLAKY", ["http://10.0.0.4:1"])],
        ),
        (  # a node that advertises nothing keeps an empty list: the caller says so
            [node_row("me", is_self=True), node_row("quiet")],
            "http://127.0.0.1:9000",
            [("ME", ["http://127.0.0.1:9000"]), ("QUIET", [])],
        ),
    ],
)
def test_node_candidates_from_the_cluster_state(rows, api: str, candidates) -> None:
    state = StateDocument.model_validate({"nodes": rows})
    assert bench_report.node_candidates(state, api) == candidates


def test_each_phase_moves_one_thing_and_requests_default_to_waves_of_the_concurrency() -> None:
    cells = bench_report.plan_cells(
        list(bench_report.PHASES), [128, 512], [32, 256], [1, 4], 64, None
    )
    shapes = [(c.index, c.phase, c.prompt_tokens, c.max_tokens, c.concurrency) for c in cells]
    assert shapes == [
        (1, "token_sweep", 128, 32, 1),
        (2, "token_sweep", 128, 256, 1),
        (3, "prompt_sweep", 128, 64, 1),
        (4, "prompt_sweep", 512, 64, 1),
        (5, "concurrency", 128, 64, 1),
        (6, "concurrency", 128, 64, 4),
    ]
    assert [c.requests for c in cells] == [4, 4, 4, 4, 4, 16]


@pytest.mark.parametrize(
    ("phases", "requests", "cells"),
    [
        (
            ["concurrency"],
            3,
            [Cell(1, "concurrency", 16, 8, 1, 3), Cell(2, "concurrency", 16, 8, 2, 3)],
        ),
        (["token_sweep"], None, [Cell(1, "token_sweep", 16, 5, 1, 4)]),
        (
            ["prompt_sweep"],
            1,
            [Cell(1, "prompt_sweep", 16, 8, 1, 1), Cell(2, "prompt_sweep", 99, 8, 1, 1)],
        ),
    ],
)
def test_only_the_chosen_phases_are_planned(phases, requests, cells) -> None:
    assert bench_report.plan_cells(phases, [16, 99], [5], [1, 2], 8, requests) == cells


@pytest.mark.parametrize(
    ("done", "every", "due"),
    [(10, 10, True), (20, 10, True), (9, 10, False), (11, 10, False), (1, 1, True), (5, 0, False)],
)
def test_heartbeat_every_n_requests_and_never_when_off(done: int, every: int, due: bool) -> None:
    assert bench_report.heartbeat_due(done, every) is due


def test_heartbeat_line_names_the_phase_progress_and_wall_clock() -> None:
    line = bench_report.heartbeat_line(
        "concurrency", 40, 64, 12.34, 80.06, datetime(2026, 11, 22, 10, 1, 2)
    )
    assert line == "[concurrency] 40/64 requests, phase 12.3 s, run 80.1 s, 2026-11-22T10:01:02"


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
    s = bench_report.summarize_cell(Cell(3, "concurrency", 100, 8, 4, 4), results, wall_s=1.5)
    assert (s.cell, s.phase, s.concurrency, s.max_tokens) == (3, "concurrency", 4, 8)
    assert (s.requests, s.ok, s.errors, s.first_error) == (4, 3, 1, "HTTP 500: boom")
    assert (s.prompt_tokens_mean, s.prompt_tokens_min, s.prompt_tokens_max) == (101, 100, 102)
    assert s.completion_tokens == 21 and s.short_requests == 1
    assert math.isclose(s.aggregate_decode_tps, 21 / 1.5)
    assert math.isclose(s.latency_p50_s, 1.0) and math.isclose(s.ttft_p50_s, 0.3)
    assert math.isclose(s.latency_p95_s, 1.18)
    assert "100/101" in bench_report.format_table([s])


def test_a_cell_where_everything_failed_has_no_rates() -> None:
    failed = [RequestResult(None, 0, None, 1, "x")]
    s = bench_report.summarize_cell(Cell(1, "token_sweep", 16, 4, 1, 1), failed, 1.0)
    assert s.ok == 0 and s.aggregate_decode_tps is None and s.latency_p50_s is None
    assert "-" in bench_report.format_table([s])


def served(node: str, latency: float, error: str | None = None) -> RequestResult:
    if error:
        return RequestResult(None, 0, None, latency, error, node)
    return RequestResult(10, 11, 0.1, latency, None, node)


def test_a_slow_node_stands_out_against_the_median_of_the_nodes() -> None:
    results = [served(n, t) for n in ("http://a", "http://c") for t in (1.0, 1.2)]
    results += [served("http://b", 3.0), served("http://b", 3.2)]
    nodes = bench_report.summarize_nodes(results)
    assert [n.node for n in nodes] == ["http://a", "http://b", "http://c"]
    assert [n.latency_p50_s for n in nodes] == pytest.approx([1.1, 3.1, 1.1])
    assert [n.latency_vs_median for n in nodes] == pytest.approx([1.0, 3.1 / 1.1, 1.0])
    assert nodes[1].decode_tps_mean == pytest.approx((10 / 2.9 + 10 / 3.1) / 2)


def test_a_failing_node_shows_its_errors_and_has_no_latency() -> None:
    results = [served("http://a", 1.0), served("http://b", 0.0, "cannot reach the shoal API")]
    a, b = bench_report.summarize_nodes(results)
    assert (a.ok, a.errors, a.latency_vs_median) == (1, 0, 1.0)
    assert (b.ok, b.errors, b.latency_p50_s, b.latency_vs_median) == (0, 1, None, None)
    assert b.first_error == "cannot reach the shoal API"
    phase = bench_report.summarize_phase("concurrency", 1, results, wall_s=1.0)
    table = bench_report.format_nodes([phase])
    assert "cannot reach the shoal API" in table.splitlines()[2]
    assert table.splitlines()[1].split()[:3] == ["concurrency", "http://a", "1/1"]


def test_phase_summary_totals_the_phase_and_splits_it_by_node() -> None:
    results = [served("http://a", 1.0), served("http://b", 2.0), served("http://a", 0.5, "x")]
    s = bench_report.summarize_phase("token_sweep", 2, results, wall_s=3.0)
    assert (s.phase, s.cells, s.wall_s) == ("token_sweep", 2, 3.0)
    assert (s.requests, s.ok, s.errors, s.first_error) == (3, 2, 1, "x")
    assert s.completion_tokens == 22
    assert [(n.node, n.requests) for n in s.per_node] == [("http://a", 2), ("http://b", 1)]


def test_cell_and_phase_records_are_plain_json_lines_told_apart_by_kind() -> None:
    results = [RequestResult(10, 4, 0.1, 0.4, node="http://a")]
    summary = bench_report.summarize_cell(Cell(1, "token_sweep", 16, 4, 1, 1), results, 0.4)
    cell = json.loads(json.dumps(bench_report.cell_record(summary, results, {"model": "m"})))
    assert (cell["kind"], cell["phase"], cell["cell"], cell["model"]) == (
        "cell",
        "token_sweep",
        1,
        "m",
    )
    assert cell["request_results"][0]["decode_tps"] == 10.0
    assert cell["request_results"][0]["node"] == "http://a"
    phase = bench_report.summarize_phase("token_sweep", 1, results, 0.5)
    line = json.loads(json.dumps(bench_report.phase_record(phase, {"model": "m"})))
    assert (line["kind"], line["phase"], line["requests"], line["model"]) == (
        "phase",
        "token_sweep",
        1,
        "m",
    )
    (only,) = line["per_node"]
    assert (only["node"], only["latency_p50_s"]) == ("http://a", 0.4)


# ---- bench: one cell against a mock transport ------------------------------------------------


def completion_stream(tokens: int) -> bytes:
    chunks: list[dict | str] = [{"choices": [{"text": "w"}]} for _ in range(tokens)]
    usage = {"prompt_tokens": 12, "completion_tokens": tokens}
    return sse(*chunks, {"choices": [], "usage": usage}, "[DONE]")


def run_one_cell(nodes: list[str], refused: set[str]) -> tuple[list[RequestResult], list[str]]:
    """One 4-request cell at concurrency 2 over `nodes` through a mock transport that answers
    each completion with max_tokens tokens, except on `refused` nodes, where nothing listens.
    Returns the cell's results and the lines it printed (heartbeats every 2 requests)."""
    cell, said = Cell(1, "concurrency", 16, 3, 2, 4), []
    args = argparse.Namespace(timeout=10.0, heartbeat_every=2)

    def answer(request: httpx.Request) -> httpx.Response:
        if f"http://{request.url.host}:{request.url.port}" in refused:
            raise httpx.ConnectError("connection refused", request=request)
        tokens = json.loads(request.content)["max_tokens"]
        return httpx.Response(200, content=completion_stream(tokens))

    async def go() -> list[RequestResult]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            calibration = Calibration(0, 1)
            api = AsyncApiClient(nodes[0], http=client)
            run = bench.Run(api, "m", calibration, nodes, [cell], args, said.append)
            run.phase = cell.phase
            return (await bench.run_cell(run, cell))[0]

    return asyncio.run(go()), said


def test_a_refused_node_fails_its_share_of_the_cell_and_the_others_go_on() -> None:
    nodes = ["http://a:1", "http://b:2"]
    results, said = run_one_cell(nodes, refused={"http://b:2"})
    by_node = {n: [r.error for r in results if r.node == n] for n in nodes}
    assert by_node == {
        "http://a:1": [None, None],
        "http://b:2": ["cannot connect to http://b:2"] * 2,
    }
    assert all(r.completion_tokens == 3 for r in results if r.ok)
    assert [line.split(",")[0] for line in said] == [
        "[concurrency] 2/4 requests",
        "[concurrency] 4/4 requests",
    ]


def test_a_refused_only_node_stops_the_run() -> None:
    with pytest.raises(chat.ApiUnreachable):
        run_one_cell(["http://a:1"], refused={"http://a:1"})


# ---- end to end against a real node ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("node")
    log = (home / "shoal-run.log").open("w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "run", "--host", "127.0.0.1", "--api-port", str(port),
         "--discovery-interfaces", "none"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "SHOAL_HOME": str(home)},  # not this machine's data dir
    )  # fmt: skip
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


def bench_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


HEARTBEAT = re.compile(
    r"^\[(\w+)\] (\d+)/(\d+) requests, phase \d+\.\d s, run \d+\.\d s, "
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$"
)


@pytest.mark.timeout(300)
def test_bench_appends_every_cell_and_phase_and_beats_every_n_requests(
    node: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.jsonl"
    done = shoal(
        "bench",
        *("--api", node, "--nodes", "all", "--out", str(out), "--timeout", "60"),
        *("--tokens", "3,6", "--prompt-tokens", "16", "--concurrency", "1,2"),
        *("--max-tokens", "4", "--requests", "2", "--heartbeat-every", "2"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = bench_lines(out)
    assert [(line["kind"], line["phase"]) for line in lines] == [
        ("cell", "token_sweep"),
        ("cell", "token_sweep"),
        ("phase", "token_sweep"),
        ("cell", "prompt_sweep"),
        ("phase", "prompt_sweep"),
        ("cell", "concurrency"),
        ("cell", "concurrency"),
        ("phase", "concurrency"),
    ]
    assert all(line["nodes"] == [node] for line in lines)  # `all` of a one-node cluster
    cells = [line for line in lines if line["kind"] == "cell"]
    assert [(c["cell"], c["max_tokens"], c["concurrency"]) for c in cells] == [
        (1, 3, 1),
        (2, 6, 1),
        (3, 4, 1),
        (4, 4, 1),
        (5, 4, 2),
    ]
    for c in cells:
        assert c["ok"] == c["requests"] == 2 and c["errors"] == 0
        assert c["completion_tokens"] == c["max_tokens"] * 2  # ignore_eos: exactly max_tokens
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
        assert {r["node"] for r in c["request_results"]} == {node}
    for phase in (line for line in lines if line["kind"] == "phase"):
        assert phase["ok"] == phase["requests"] and phase["errors"] == 0
        assert [n["node"] for n in phase["per_node"]] == [node]
    beats = [m.groups() for line in done.stdout.splitlines() if (m := HEARTBEAT.match(line))]
    assert beats == [
        ("token_sweep", "2", "10"),
        ("token_sweep", "4", "10"),
        ("prompt_sweep", "6", "10"),
        ("concurrency", "8", "10"),
        ("concurrency", "10", "10"),
    ]
    assert "cell 5/5" in done.stdout and "results:" in done.stdout


@contextlib.contextmanager
def loopback_forwarder(host: str, target_port: int) -> Iterator[str]:
    """A second address for a node that listens on 127.0.0.1 only: pipes every connection to
    host:<free port> through to it. Yields the forwarder's base URL."""
    server = socket.create_server((host, 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve(client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", target_port)) as upstream:
            back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
            back.start()
            pipe(client, upstream)
            back.join()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                client, _ = server.accept()
                client.settimeout(None)
                threading.Thread(target=serve, args=(client,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://{host}:{server.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join()
        server.close()


@pytest.mark.timeout(300)
def test_bench_spreads_requests_round_robin_and_reports_each_node(
    node: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.jsonl"
    with loopback_forwarder("127.0.0.2", httpx.URL(node).port) as second:
        done = shoal(
            "bench",
            *("--nodes", f"{node},{second}", "--out", str(out), "--timeout", "60"),
            *("--phases", "concurrency", "--prompt-tokens", "16", "--concurrency", "2"),
            *("--max-tokens", "4", "--requests", "4", "--heartbeat-every", "0"),
        )
    assert done.returncode == 0, done.stdout + done.stderr
    cell, phase = bench_lines(out)
    served_by = [r["node"] for r in cell["request_results"]]
    assert sorted(served_by) == sorted([node, node, second, second])
    assert [(n["node"], n["ok"]) for n in phase["per_node"]] == sorted([(node, 2), (second, 2)])
    assert all(n["latency_vs_median"] > 0 for n in phase["per_node"])
    assert not any(HEARTBEAT.match(line) for line in done.stdout.splitlines())
    node_rows = [line for line in done.stdout.splitlines() if line.startswith("concurrency ")]
    assert {row.split()[1] for row in node_rows} >= {node, second}  # the per-node table
