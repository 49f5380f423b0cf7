"""`shoal bench`: throughput and latency of a node's API, or of every node of a cluster, in
phases: output lengths at one stream (token_sweep), prompt lengths at one stream
(prompt_sweep), then concurrency levels at a fixed prompt and output length (concurrency).

Every request is a streamed `/v1/completions` call with `ignore_eos` (a shoal extension) and a
fixed `max_tokens`, so each one produces exactly that many tokens and cells compare. Each cell's
result, and each phase's summary, is appended to a JSONL file (flushed and fsynced) the moment
it ends, so a crash late in a long run keeps everything finished before it; a heartbeat line
every N requests names the phase and the time, so a long run never looks like a hang. With
`--nodes`, requests go round-robin over several nodes' APIs and each phase reports every node
apart, so one slow or failing node stands out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

from shoal.ops.chat import (
    DEFAULT_API,
    EXIT_API_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    SSE_DONE,
    ApiError,
    ApiUnreachable,
    api_base,
    decode_rate,
    error_message,
    parse_sse_line,
    read_chunk,
)

# Word pool for synthetic prompts: common, short words that most tokenizers keep whole.
WORDS: Final = (
    "the river stone light house green water small table paper garden window morning "
    "evening bridge market winter summer city road forest mountain cloud music letter "
    "station teacher animal yellow silver number simple travel orange valley island "
    "engine machine signal circle basket pocket candle ladder mirror planet rocket"
).split()
CALIBRATION_WORDS: Final = (16, 128)
PHASES: Final = ("token_sweep", "prompt_sweep", "concurrency")
WAVES: Final = 4  # default requests per cell, times its concurrency: a few samples for p50/p95
ALL_NODES: Final = "all"
# An advertised address that does not answer /health within this is taken as unreachable.
PROBE_TIMEOUT_S: Final = 2.0


# ---- pure core -------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    """`"128,512,1024"` -> [128, 512, 1024]; every value must be a positive integer."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def phase_list(text: str) -> list[str]:
    """`"concurrency,token_sweep"` -> the named phases in run order (the order of PHASES)."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if not names or names - set(PHASES):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(PHASES)}: {text!r}")
    return [phase for phase in PHASES if phase in names]


def node_list(text: str) -> str | list[str]:
    """`--nodes`: ALL_NODES, or comma-separated base URLs (`host:port` is fine)."""
    if text.strip() == ALL_NODES:
        return ALL_NODES
    urls = [api_base(part) for part in text.split(",") if part.strip()]
    if not urls:
        raise argparse.ArgumentTypeError(f"expected {ALL_NODES!r} or base URLs: {text!r}")
    return urls


def node_candidates(state: dict[str, Any], api: str) -> list[tuple[str, list[str]]]:
    """GET /state's node rows -> (name, base URLs to try in order) for every node not gone.

    The node behind --api comes first (it answers for the model and the calibration) and is
    reached at --api itself. For the others, advertised addresses on --api's host come first
    (on a loopback test cluster those are the ones that answer), then the rest as advertised."""
    api_host = httpx.URL(api).host
    rows = [row for row in state.get("nodes", []) if row.get("status") != "gone"]
    out = []
    for row in sorted(rows, key=lambda row: not row.get("is_self")):
        name = row.get("name") or row["node_id"]
        if row.get("is_self"):
            out.append((name, [api]))
            continue
        urls = [api_base(address) for address in row.get("addresses", [])]
        out.append((name, sorted(urls, key=lambda url: httpx.URL(url).host != api_host)))
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default);
    None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def synthetic_text(n_words: int, seed: int) -> str:
    """Deterministic filler text; a different seed per request keeps any prefix cache honest."""
    state = seed * 2654435761 + 1
    words = []
    for i in range(n_words):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        word = WORDS[(state >> 33) % len(WORDS)]
        words.append(word + ("." if i % 12 == 11 else ""))
    return " ".join(words)


@dataclass(frozen=True)
class Calibration:
    """prompt_tokens ~= intercept + slope * words, measured through the API's own tokenizer."""

    intercept: float
    slope: float

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[int, int]]) -> Calibration:
        """samples: (words, prompt_tokens) at two or more distinct word counts."""
        (w0, t0), (w1, t1) = min(samples), max(samples)
        if w1 == w0:
            raise ValueError("calibration needs two different word counts")
        slope = (t1 - t0) / (w1 - w0)
        if slope <= 0:
            raise ValueError(f"prompt tokens do not grow with words: {samples}")
        return cls(t0 - slope * w0, slope)

    def words_for(self, tokens: int) -> int:
        return max(1, round((tokens - self.intercept) / self.slope))


@dataclass(frozen=True)
class Cell:
    index: int  # 1-based over the whole run, for "cell i/n"
    phase: str
    prompt_tokens: int
    max_tokens: int
    concurrency: int
    requests: int


def plan_cells(
    phases: Sequence[str],
    prompt_tokens: Sequence[int],
    tokens: Sequence[int],
    concurrency: Sequence[int],
    max_tokens: int,
    requests: int | None,
) -> list[Cell]:
    """Every cell of the chosen phases, phase by phase, all known up front. Each phase moves one
    thing: the other phases hold the prompt at the first prompt length."""
    prompt = prompt_tokens[0]
    shapes = {  # phase -> (prompt tokens, max_tokens, concurrency) of each cell
        "token_sweep": [(prompt, t, 1) for t in tokens],
        "prompt_sweep": [(p, max_tokens, 1) for p in prompt_tokens],
        "concurrency": [(prompt, max_tokens, c) for c in concurrency],
    }
    rows = [(phase, *shape) for phase in phases for shape in shapes[phase]]
    return [
        Cell(i, phase, p, t, c, requests or WAVES * c)
        for i, (phase, p, t, c) in enumerate(rows, start=1)
    ]


def heartbeat_due(done_requests: int, every: int) -> bool:
    return every > 0 and done_requests % every == 0


def heartbeat_line(
    phase: str, done: int, total: int, phase_s: float, run_s: float, now: datetime
) -> str:
    """`[concurrency] 40/64 requests, phase 12.3 s, run 80.1 s, 2026-11-22T10:01:02`: requests
    of the whole run, and the wall clock to line the run up with the node's own logs."""
    return (
        f"[{phase}] {done}/{total} requests, phase {phase_s:.1f} s, run {run_s:.1f} s, "
        f"{now.isoformat(timespec='seconds')}"
    )


@dataclass(frozen=True)
class RequestResult:
    prompt_tokens: int | None
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    error: str | None = None
    node: str = ""  # base URL of the node that served it

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def decode_tps(self) -> float | None:
        return decode_rate(self.completion_tokens, self.ttft_s, self.latency_s)

    @property
    def prefill_tps(self) -> float | None:
        if not self.prompt_tokens or not self.ttft_s:
            return None
        return self.prompt_tokens / self.ttft_s


@dataclass(frozen=True)
class CellSummary:
    cell: int
    phase: str
    prompt_tokens_target: int
    concurrency: int
    requests: int
    ok: int
    errors: int
    first_error: str | None
    prompt_tokens_mean: float | None
    prompt_tokens_min: int | None
    prompt_tokens_max: int | None
    max_tokens: int
    completion_tokens: int
    short_requests: int  # finished with fewer than max_tokens (EOS not ignored?)
    wall_s: float
    aggregate_decode_tps: float | None
    decode_tps_mean: float | None
    prefill_tps_mean: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _first_error(results: Sequence[RequestResult]) -> str | None:
    return next((r.error for r in results if r.error), None)


def summarize_cell(cell: Cell, results: Sequence[RequestResult], wall_s: float) -> CellSummary:
    ok = [r for r in results if r.ok]
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    completion = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    decode = [v for r in ok if (v := r.decode_tps) is not None]
    prefill = [v for r in ok if (v := r.prefill_tps) is not None]
    return CellSummary(
        cell=cell.index,
        phase=cell.phase,
        prompt_tokens_target=cell.prompt_tokens,
        concurrency=cell.concurrency,
        requests=len(results),
        ok=len(ok),
        errors=len(results) - len(ok),
        first_error=_first_error(results),
        prompt_tokens_mean=_mean(prompts),
        prompt_tokens_min=min(prompts, default=None),
        prompt_tokens_max=max(prompts, default=None),
        max_tokens=cell.max_tokens,
        completion_tokens=completion,
        short_requests=sum(1 for r in ok if r.completion_tokens < cell.max_tokens),
        wall_s=wall_s,
        aggregate_decode_tps=completion / wall_s if ok and wall_s > 0 else None,
        decode_tps_mean=_mean(decode),
        prefill_tps_mean=_mean(prefill),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        latency_p50_s=percentile([r.latency_s for r in ok], 50),
        latency_p95_s=percentile([r.latency_s for r in ok], 95),
    )


@dataclass(frozen=True)
class NodeSummary:
    node: str  # base URL
    requests: int
    ok: int
    errors: int
    first_error: str | None
    ttft_p50_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    decode_tps_mean: float | None  # per stream
    latency_vs_median: float | None  # this node's latency p50 / the median of the nodes' p50s


def summarize_nodes(results: Sequence[RequestResult]) -> tuple[NodeSummary, ...]:
    """One summary per node, by URL. Round-robin gives every node its share of every cell, so
    within a phase the nodes compare: a slow node's latency_vs_median sits well above 1."""
    by_node: dict[str, list[RequestResult]] = {}
    for r in results:
        by_node.setdefault(r.node, []).append(r)
    latencies = {node: [r.latency_s for r in rs if r.ok] for node, rs in by_node.items()}
    p50s = {node: percentile(values, 50) for node, values in latencies.items()}
    median = percentile([v for v in p50s.values() if v is not None], 50)
    summaries = []
    for node in sorted(by_node):
        ok = [r for r in by_node[node] if r.ok]
        p50 = p50s[node]
        summaries.append(
            NodeSummary(
                node=node,
                requests=len(by_node[node]),
                ok=len(ok),
                errors=len(by_node[node]) - len(ok),
                first_error=_first_error(by_node[node]),
                ttft_p50_s=percentile([r.ttft_s for r in ok if r.ttft_s is not None], 50),
                latency_p50_s=p50,
                latency_p95_s=percentile(latencies[node], 95),
                decode_tps_mean=_mean([v for r in ok if (v := r.decode_tps) is not None]),
                latency_vs_median=p50 / median if p50 is not None and median else None,
            )
        )
    return tuple(summaries)


@dataclass(frozen=True)
class PhaseSummary:
    phase: str
    cells: int
    requests: int
    ok: int
    errors: int
    first_error: str | None
    completion_tokens: int
    wall_s: float
    per_node: tuple[NodeSummary, ...]


def summarize_phase(
    phase: str, cells: int, results: Sequence[RequestResult], wall_s: float
) -> PhaseSummary:
    ok = [r for r in results if r.ok]
    return PhaseSummary(
        phase=phase,
        cells=cells,
        requests=len(results),
        ok=len(ok),
        errors=len(results) - len(ok),
        first_error=_first_error(results),
        completion_tokens=sum(r.completion_tokens for r in ok),
        wall_s=wall_s,
        per_node=summarize_nodes(results),
    )


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(summaries: Sequence[CellSummary]) -> str:
    header = (
        f"{'phase':<12} {'prompt':>11} {'new':>4} {'conc':>4} {'ok':>5} {'agg tok/s':>9} "
        f"{'dec tok/s':>9} {'prefill t/s':>11} {'TTFT p50':>8} {'p95':>6} {'lat p50':>7} "
        f"{'p95':>6}"
    )
    rows = [header]
    for s in summaries:
        actual = _num(s.prompt_tokens_mean, ".0f")
        rows.append(
            f"{s.phase:<12} {f'{s.prompt_tokens_target}/{actual}':>11} {s.max_tokens:>4} "
            f"{s.concurrency:>4} {f'{s.ok}/{s.requests}':>5} "
            f"{_num(s.aggregate_decode_tps, '.1f'):>9} {_num(s.decode_tps_mean, '.1f'):>9} "
            f"{_num(s.prefill_tps_mean, '.0f'):>11} {_num(s.ttft_p50_s, '.2f'):>8} "
            f"{_num(s.ttft_p95_s, '.2f'):>6} {_num(s.latency_p50_s, '.2f'):>7} "
            f"{_num(s.latency_p95_s, '.2f'):>6}"
        )
    rows.append(
        "prompt = target/actual tokens; new = max_tokens; agg = all tokens / cell wall time; "
        "seconds"
    )
    return "\n".join(rows)


def format_nodes(phases: Sequence[PhaseSummary]) -> str:
    width = max((len(n.node) for p in phases for n in p.per_node), default=4)
    rows = [
        f"{'phase':<12} {'node':<{width}} {'ok':>5} {'lat p50':>7} {'p95':>6} {'vs median':>9} "
        f"{'TTFT p50':>8} {'dec tok/s':>9}  first error"
    ]
    for p in phases:
        for n in p.per_node:
            rows.append(
                f"{p.phase:<12} {n.node:<{width}} {f'{n.ok}/{n.requests}':>5} "
                f"{_num(n.latency_p50_s, '.2f'):>7} {_num(n.latency_p95_s, '.2f'):>6} "
                f"{_num(n.latency_vs_median, '.2f'):>9} {_num(n.ttft_p50_s, '.2f'):>8} "
                f"{_num(n.decode_tps_mean, '.1f'):>9}  {n.first_error or ''}".rstrip()
            )
    return "\n".join(rows)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def cell_record(
    summary: CellSummary, results: Sequence[RequestResult], run: dict[str, Any]
) -> dict[str, Any]:
    """One JSONL line: run settings, the summary and every request's raw numbers."""
    detail = [
        {**asdict(r), "decode_tps": r.decode_tps, "prefill_tps": r.prefill_tps} for r in results
    ]
    return _rounded({"kind": "cell", **run, **asdict(summary), "request_results": detail})


def phase_record(summary: PhaseSummary, run: dict[str, Any]) -> dict[str, Any]:
    """The JSONL line closing a phase: its totals and each node's share."""
    return _rounded({"kind": "phase", **run, **asdict(summary)})


# ---- I/O shell -------------------------------------------------------------------------------


async def complete_streaming(
    client: httpx.AsyncClient, base: str, body: dict[str, Any]
) -> RequestResult:
    started = time.perf_counter()
    ttft: float | None = None
    usage: dict[str, Any] | None = None
    text_chunks = 0
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            if response.status_code != 200:
                message = error_message(response.status_code, await response.aread())
                return RequestResult(None, 0, None, time.perf_counter() - started, message)
            async for line in response.aiter_lines():
                item = parse_sse_line(line)
                if item is None:
                    continue
                if item == SSE_DONE:
                    break
                assert isinstance(item, dict)
                chunk = read_chunk(item)
                if chunk.error:
                    return RequestResult(None, 0, ttft, time.perf_counter() - started, chunk.error)
                if chunk.text:
                    text_chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                usage = chunk.usage or usage
    except httpx.ConnectError as exc:
        raise ApiUnreachable(base) from exc
    except (httpx.HTTPError, ValueError) as exc:
        return RequestResult(None, 0, ttft, time.perf_counter() - started, f"{exc!r}")
    latency = time.perf_counter() - started
    if usage is None:
        return RequestResult(None, text_chunks, ttft, latency, "no usage chunk in the stream")
    return RequestResult(
        int(usage["prompt_tokens"]), int(usage["completion_tokens"]), ttft, latency
    )


async def get_json(client: httpx.AsyncClient, base: str, path: str) -> Any:
    try:
        response = await client.get(f"{base}{path}")
    except httpx.ConnectError as exc:
        raise ApiUnreachable(base) from exc
    if response.status_code != 200:
        raise ApiError(error_message(response.status_code, response.content))
    return response.json()


async def first_model(client: httpx.AsyncClient, base: str) -> str:
    models = [m["id"] for m in (await get_json(client, base, "/v1/models")).get("data", [])]
    if not models:
        raise ApiError(f"{base} serves no model yet; check `shoal run` output")
    return models[0]


async def answers(client: httpx.AsyncClient, base: str) -> bool:
    try:
        response = await client.get(f"{base}/health", timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def resolve_nodes(
    client: httpx.AsyncClient, api: str, nodes: str | list[str] | None
) -> list[str]:
    """The base URLs requests go to: --api alone, the --nodes list, or every node of --api's
    cluster at the first of its addresses (in node_candidates' order) that answers /health."""
    if nodes is None:
        return [api]
    if nodes != ALL_NODES:
        return list(nodes)
    urls = []
    for name, candidates in node_candidates(await get_json(client, api, "/state"), api):
        for url in candidates:
            if await answers(client, url):
                urls.append(url)
                break
        else:
            tried = ", ".join(candidates) or "no advertised address"
            raise ApiError(f"node {name} does not answer at {tried}; list URLs with --nodes")
    return urls


async def calibrate(client: httpx.AsyncClient, base: str, model: str) -> Calibration:
    samples = []
    for words in CALIBRATION_WORDS:
        body = {"model": model, "prompt": synthetic_text(words, seed=0), "max_tokens": 1}
        try:
            response = await client.post(f"{base}/v1/completions", json=body)
        except httpx.ConnectError as exc:
            raise ApiUnreachable(base) from exc
        if response.status_code != 200:
            raise ApiError(error_message(response.status_code, response.content))
        samples.append((words, int(response.json()["usage"]["prompt_tokens"])))
    return Calibration.from_samples(samples)


async def warm_up(client: httpx.AsyncClient, base: str, model: str, concurrency: int) -> None:
    """Short requests at the highest concurrency first: a fresh node pays once for each new
    batch shape (seconds on a CPU), which must not land in the first cell that uses it. A
    server that refuses these requests stops the run before the first phase starts."""
    bodies = [request_body(model, synthetic_text(8, seed=i), 4) for i in range(concurrency)]
    results = await asyncio.gather(*(complete_streaming(client, base, b) for b in bodies))
    if failed := _first_error(results):
        raise ApiError(f"warm-up request to {base} failed: {failed}")


def request_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # shoal extension: every request yields exactly max_tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class Run:
    """What every cell of one run shares, and its progress."""

    client: httpx.AsyncClient
    model: str
    calibration: Calibration
    nodes: list[str]
    cells: list[Cell]
    args: argparse.Namespace
    say: Callable[[str], None]
    started: float = field(default_factory=time.perf_counter)
    phase: str = ""
    phase_started: float = 0.0
    sent_requests: int = 0
    done_requests: int = 0

    def next_node(self) -> str:
        """Round-robin over the whole run, so every node gets its share of every cell."""
        self.sent_requests += 1
        return self.nodes[(self.sent_requests - 1) % len(self.nodes)]

    def request_done(self) -> None:
        self.done_requests += 1
        if heartbeat_due(self.done_requests, self.args.heartbeat_every):
            now, total = time.perf_counter(), sum(c.requests for c in self.cells)
            phase_s, run_s = now - self.phase_started, now - self.started
            line = heartbeat_line(
                self.phase, self.done_requests, total, phase_s, run_s, datetime.now()
            )
            self.say(line)


async def run_cell(run: Run, cell: Cell) -> tuple[list[RequestResult], float]:
    words = run.calibration.words_for(cell.prompt_tokens)
    pending = list(range(cell.requests))
    results: list[RequestResult] = []
    timeout = run.args.timeout

    async def one(i: int, node: str) -> RequestResult:
        prompt = synthetic_text(words, seed=cell.index * 100_003 + i)
        body = request_body(run.model, prompt, cell.max_tokens)
        try:
            result = await asyncio.wait_for(complete_streaming(run.client, node, body), timeout)
        except TimeoutError:
            result = RequestResult(None, 0, None, timeout, f"timed out after {timeout}s")
        except ApiUnreachable:
            if len(run.nodes) == 1:
                raise  # the only node is gone: nothing left to measure
            result = RequestResult(None, 0, None, 0.0, f"cannot connect to {node}")
        return replace(result, node=node)

    async def worker() -> None:
        while pending:
            results.append(await one(pending.pop(0), run.next_node()))
            run.request_done()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(cell.concurrency, cell.requests))))
    return results, time.perf_counter() - started


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append and fsync: a crash later in the run keeps every finished cell and phase."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def run_phase(
    run: Run, phase: str, cells: list[Cell], out: Path, run_info: dict[str, Any]
) -> tuple[list[CellSummary], PhaseSummary]:
    run.phase, run.phase_started = phase, time.perf_counter()
    run.say(f"phase {phase}: {len(cells)} cells, {sum(c.requests for c in cells)} requests")
    summaries: list[CellSummary] = []
    phase_results: list[RequestResult] = []
    for cell in cells:
        run.say(
            f"cell {cell.index}/{len(run.cells)}: ~{cell.prompt_tokens} prompt tokens, "
            f"{cell.max_tokens} new, concurrency {cell.concurrency}, {cell.requests} requests"
        )
        results, wall = await run_cell(run, cell)
        summary = summarize_cell(cell, results, wall)
        append_line(out, cell_record(summary, results, run_info))
        summaries.append(summary)
        phase_results += results
        line = (
            f"  done in {wall:.1f} s: {_num(summary.aggregate_decode_tps, '.1f')} tok/s "
            f"aggregate, TTFT p50 {_num(summary.ttft_p50_s, '.2f')} s, "
            f"latency p50 {_num(summary.latency_p50_s, '.2f')} s"
        )
        if summary.errors:
            line += f", {summary.errors} failed: {summary.first_error}"
        if summary.short_requests:
            line += f", {summary.short_requests} stopped before max_tokens"
        run.say(line)
    wall = time.perf_counter() - run.phase_started
    phase_summary = summarize_phase(phase, len(cells), phase_results, wall)
    append_line(out, phase_record(phase_summary, run_info))
    run.say(f"phase {phase} done in {wall:.1f} s: {phase_summary.ok}/{phase_summary.requests} ok")
    return summaries, phase_summary


async def bench(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    api = api_base(args.api)
    cells = plan_cells(
        args.phases,
        args.prompt_tokens,
        args.tokens,
        args.concurrency,
        args.max_tokens,
        args.requests,
    )
    out = Path(args.out or f"bench/results/bench-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    top = max(c.concurrency for c in cells)
    limits = httpx.Limits(max_connections=top + 2)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(args.timeout, connect=5.0), limits=limits
    ) as client:
        nodes = await resolve_nodes(client, api, args.nodes)
        model = args.model or await first_model(client, nodes[0])
        say(
            f"bench {model} on {', '.join(nodes)}: phases {', '.join(args.phases)}, "
            f"{len(cells)} cells, {sum(c.requests for c in cells)} requests, "
            f"timeout {args.timeout:.0f} s per request -> {out}"
        )
        calibration = await calibrate(client, nodes[0], model)
        for node in nodes:
            started = time.perf_counter()
            await warm_up(client, node, model, top)
            say(f"warm-up {node}: {top} requests at once, {time.perf_counter() - started:.1f} s")
        run_info = {
            "run_id": time.strftime("%Y%m%dT%H%M%S"),
            "nodes": nodes,
            "model": model,
            "ignore_eos": True,
        }
        run = Run(client, model, calibration, nodes, cells, args, say)
        summaries: list[CellSummary] = []
        phases: list[PhaseSummary] = []
        for phase, group in itertools.groupby(cells, key=lambda c: c.phase):
            cell_summaries, phase_summary = await run_phase(run, phase, list(group), out, run_info)
            summaries += cell_summaries
            phases.append(phase_summary)
    say("")
    say(format_table(summaries))
    if len(nodes) > 1:
        say("")
        say(format_nodes(phases))
    say(f"results: {out}")
    return EXIT_API_ERROR if any(s.errors for s in summaries) else EXIT_OK


def run(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    try:
        return asyncio.run(bench(args, say))
    except ApiUnreachable as exc:
        print(exc, file=sys.stderr)
        return EXIT_UNREACHABLE
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted; finished cells and phases are in the results file", file=sys.stderr)
        return 130


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number: {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer: {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more: {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--api",
        default=os.environ.get("SHOAL_API", DEFAULT_API),
        help=f"base URL of a node's API (env SHOAL_API; default {DEFAULT_API})",
    )
    parser.add_argument(
        "--nodes",
        type=node_list,
        help=f"spread requests round-robin over several nodes: {ALL_NODES!r} (every node of "
        "--api's cluster) or comma-separated base URLs (default: --api alone)",
    )
    parser.add_argument("--model", help="model id (default: the first one of /v1/models)")
    parser.add_argument(
        "--phases",
        type=phase_list,
        default=list(PHASES),
        help=f"phases to run, comma-separated (default all, in this order: {','.join(PHASES)})",
    )
    parser.add_argument(
        "--tokens",
        type=int_list,
        default=[32, 128, 256],
        help="token_sweep: output lengths (max_tokens), comma-separated (default 32,128,256)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int_list,
        default=[128, 512, 1024],
        help="prompt_sweep: prompt lengths in tokens (default 128,512,1024); the first is the "
        "prompt of the other phases",
    )
    parser.add_argument(
        "--concurrency",
        type=int_list,
        default=[1, 2, 4],
        help="concurrency: concurrent requests per level, comma-separated (default 1,2,4)",
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=64,
        help="tokens generated per request in prompt_sweep and concurrency (default 64)",
    )
    parser.add_argument(
        "--requests",
        type=_positive_int,
        default=None,
        help=f"requests per cell (default {WAVES} x the cell's concurrency)",
    )
    parser.add_argument(
        "--out", help="JSONL results file (default bench/results/bench-<timestamp>.jsonl)"
    )
    parser.add_argument(
        "--heartbeat-every",
        type=_count,
        default=10,
        help="print a progress line every N finished requests; 0 turns it off (default 10)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        help="seconds one request may take before it counts as failed (default 300)",
    )
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(configure(argparse.ArgumentParser(prog="shoal bench")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
