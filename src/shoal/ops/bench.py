"""`shoal bench`: throughput and latency of a node's API over a grid of prompt lengths and
concurrency levels.

Every request is a streamed `/v1/completions` call with `ignore_eos` (a shoal extension) and a
fixed `max_tokens`, so each one produces the same number of tokens and cells compare. Each cell's
result is appended to a JSONL file (flushed and fsynced) the moment the cell ends, and a heartbeat
line shows the run is alive, so a crash or a slow cell never looks like a silent hang.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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
    index: int  # 1-based, for "cell i/n"
    prompt_tokens: int
    concurrency: int
    requests: int


def plan_cells(
    prompt_tokens: Sequence[int], concurrency: Sequence[int], requests: int | None
) -> list[Cell]:
    """Every (prompt length, concurrency) pair, shortest prompts first; all known up front."""
    pairs = [(p, c) for p in prompt_tokens for c in concurrency]
    return [Cell(i, p, c, requests or c) for i, (p, c) in enumerate(pairs, start=1)]


@dataclass(frozen=True)
class RequestResult:
    prompt_tokens: int | None
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    error: str | None = None

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


def summarize_cell(
    cell: Cell, results: Sequence[RequestResult], wall_s: float, max_tokens: int
) -> CellSummary:
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    completion = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    decode = [v for r in ok if (v := r.decode_tps) is not None]
    prefill = [v for r in ok if (v := r.prefill_tps) is not None]
    return CellSummary(
        cell=cell.index,
        prompt_tokens_target=cell.prompt_tokens,
        concurrency=cell.concurrency,
        requests=len(results),
        ok=len(ok),
        errors=len(errors),
        first_error=errors[0].error if errors else None,
        prompt_tokens_mean=_mean(prompts),
        prompt_tokens_min=min(prompts, default=None),
        prompt_tokens_max=max(prompts, default=None),
        max_tokens=max_tokens,
        completion_tokens=completion,
        short_requests=sum(1 for r in ok if r.completion_tokens < max_tokens),
        wall_s=wall_s,
        aggregate_decode_tps=completion / wall_s if ok and wall_s > 0 else None,
        decode_tps_mean=_mean(decode),
        prefill_tps_mean=_mean(prefill),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        latency_p50_s=percentile([r.latency_s for r in ok], 50),
        latency_p95_s=percentile([r.latency_s for r in ok], 95),
    )


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(summaries: Sequence[CellSummary]) -> str:
    header = (
        f"{'prompt':>11} {'conc':>4} {'ok':>5} {'agg tok/s':>9} {'dec tok/s':>9} "
        f"{'prefill t/s':>11} {'TTFT p50':>8} {'p95':>6} {'lat p50':>7} {'p95':>6}"
    )
    rows = [header]
    for s in summaries:
        actual = _num(s.prompt_tokens_mean, ".0f")
        rows.append(
            f"{f'{s.prompt_tokens_target}/{actual}':>11} {s.concurrency:>4} "
            f"{f'{s.ok}/{s.requests}':>5} {_num(s.aggregate_decode_tps, '.1f'):>9} "
            f"{_num(s.decode_tps_mean, '.1f'):>9} {_num(s.prefill_tps_mean, '.0f'):>11} "
            f"{_num(s.ttft_p50_s, '.2f'):>8} {_num(s.ttft_p95_s, '.2f'):>6} "
            f"{_num(s.latency_p50_s, '.2f'):>7} {_num(s.latency_p95_s, '.2f'):>6}"
        )
    rows.append("prompt = target/actual tokens; agg = all tokens / cell wall time; seconds")
    return "\n".join(rows)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def cell_record(
    summary: CellSummary, results: Sequence[RequestResult], run: dict[str, Any]
) -> dict[str, Any]:
    """One JSONL line: run settings, the summary and every request's raw numbers."""
    detail = [
        {**asdict(r), "decode_tps": r.decode_tps, "prefill_tps": r.prefill_tps} for r in results
    ]
    return _rounded({**run, **asdict(summary), "request_results": detail})


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


async def first_model(client: httpx.AsyncClient, base: str) -> str:
    try:
        response = await client.get(f"{base}/v1/models")
    except httpx.ConnectError as exc:
        raise ApiUnreachable(base) from exc
    if response.status_code != 200:
        raise ApiError(error_message(response.status_code, response.content))
    models = [m["id"] for m in response.json().get("data", [])]
    if not models:
        raise ApiError(f"{base} serves no model yet; check `shoal run` output")
    return models[0]


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
    server that refuses these requests stops the run before the grid starts."""
    bodies = [request_body(model, synthetic_text(8, seed=i), 4) for i in range(concurrency)]
    results = await asyncio.gather(*(complete_streaming(client, base, b) for b in bodies))
    if failed := next((r.error for r in results if r.error), None):
        raise ApiError(f"warm-up request failed: {failed}")


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
class Progress:
    cells: int
    started: float
    done_requests: int = 0


async def run_cell(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    cell: Cell,
    calibration: Calibration,
    args: argparse.Namespace,
    progress: Progress,
    say: Callable[[str], None],
) -> tuple[list[RequestResult], float]:
    words = calibration.words_for(cell.prompt_tokens)
    pending = list(range(cell.requests))
    results: list[RequestResult] = []

    async def one(i: int) -> RequestResult:
        prompt = synthetic_text(words, seed=cell.index * 100_003 + i)
        body = request_body(model, prompt, args.max_tokens)
        try:
            return await asyncio.wait_for(complete_streaming(client, base, body), args.timeout)
        except TimeoutError:
            return RequestResult(None, 0, None, args.timeout, f"timed out after {args.timeout}s")

    async def worker() -> None:
        while pending:
            results.append(await one(pending.pop(0)))
            progress.done_requests += 1

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(args.heartbeat)
            say(
                f"  ... cell {cell.index}/{progress.cells}: {len(results)}/{cell.requests} "
                f"requests done, cell {time.perf_counter() - started:.1f} s, "
                f"run {time.perf_counter() - progress.started:.1f} s, {time.strftime('%H:%M:%S')}"
            )

    started = time.perf_counter()
    beat = asyncio.create_task(heartbeat()) if args.heartbeat > 0 else None
    try:
        await asyncio.gather(*(worker() for _ in range(min(cell.concurrency, cell.requests))))
    finally:
        if beat is not None:
            beat.cancel()
    return results, time.perf_counter() - started


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append and fsync: a crash later in the run keeps every finished cell."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def bench(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    base = api_base(args.api)
    cells = plan_cells(args.prompt_tokens, args.concurrency, args.requests)
    out = Path(args.out or f"bench/results/bench-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    limits = httpx.Limits(max_connections=max(args.concurrency) + 2)
    timeout = httpx.Timeout(args.timeout, connect=5.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = args.model or await first_model(client, base)
        total_requests = sum(c.requests for c in cells)
        say(
            f"bench {model} at {base}: {len(cells)} cells, {total_requests} requests, "
            f"max_tokens {args.max_tokens}, timeout {args.timeout:.0f} s per request -> {out}"
        )
        calibration = await calibrate(client, base, model)
        started = time.perf_counter()
        await warm_up(client, base, model, max(args.concurrency))
        say(
            f"warm-up: {max(args.concurrency)} concurrent requests in "
            f"{time.perf_counter() - started:.1f} s"
        )
        run_info = {
            "run_id": time.strftime("%Y%m%dT%H%M%S"),
            "api": base,
            "model": model,
            "ignore_eos": True,
        }
        progress = Progress(len(cells), time.perf_counter())
        summaries: list[CellSummary] = []
        for cell in cells:
            say(
                f"cell {cell.index}/{len(cells)}: ~{cell.prompt_tokens} prompt tokens x "
                f"concurrency {cell.concurrency}, {cell.requests} requests "
                f"(run {time.perf_counter() - progress.started:.1f} s)"
            )
            results, wall = await run_cell(
                client, base, model, cell, calibration, args, progress, say
            )
            summary = summarize_cell(cell, results, wall, args.max_tokens)
            append_line(out, cell_record(summary, results, run_info))
            summaries.append(summary)
            line = (
                f"  done in {wall:.1f} s: {_num(summary.aggregate_decode_tps, '.1f')} tok/s "
                f"aggregate, TTFT p50 {_num(summary.ttft_p50_s, '.2f')} s"
            )
            if summary.errors:
                line += f", {summary.errors} failed: {summary.first_error}"
            if summary.short_requests:
                line += f", {summary.short_requests} stopped before max_tokens"
            say(line)
    say("")
    say(format_table(summaries))
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
        print("\ninterrupted; finished cells are in the results file", file=sys.stderr)
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


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--api",
        default=os.environ.get("SHOAL_API", DEFAULT_API),
        help=f"base URL of a node's API (env SHOAL_API; default {DEFAULT_API})",
    )
    parser.add_argument("--model", help="model id (default: the first one of /v1/models)")
    parser.add_argument(
        "--prompt-tokens",
        type=int_list,
        default=[128, 512, 1024],
        help="prompt lengths in tokens, comma-separated (default 128,512,1024)",
    )
    parser.add_argument(
        "--concurrency",
        type=int_list,
        default=[1, 2, 4],
        help="concurrent requests, comma-separated (default 1,2,4)",
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=64,
        help="tokens generated per request (default 64)",
    )
    parser.add_argument(
        "--requests",
        type=_positive_int,
        default=None,
        help="requests per cell (default: the cell's concurrency)",
    )
    parser.add_argument(
        "--out", help="JSONL results file (default bench/results/bench-<timestamp>.jsonl)"
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        help="seconds between progress lines while a cell runs; 0 turns them off (default 10)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        help="seconds one request may take before it counts as failed (default 300)",
    )
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `shoal bench`; the CLI calls `args.func(args)` and exits with its return."""
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput and latency of a node's API",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    return configure(parser)


def main(argv: list[str] | None = None) -> int:
    return run(configure(argparse.ArgumentParser(prog="shoal bench")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
