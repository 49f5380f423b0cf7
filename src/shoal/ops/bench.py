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
import os
import sys
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

from shoal.ops.bench_report import (
    ALL_NODES,
    CALIBRATION_WORDS,
    PHASES,
    WAVES,
    Calibration,
    Cell,
    CellSummary,
    PhaseSummary,
    RequestResult,
    cell_line,
    cell_record,
    first_error,
    format_nodes,
    format_table,
    heartbeat_due,
    heartbeat_line,
    int_list,
    node_candidates,
    node_list,
    phase_list,
    phase_record,
    plan_cells,
    summarize_cell,
    summarize_phase,
    synthetic_text,
)
from shoal.ops.chat import DEFAULT_API, EXIT_API_ERROR, EXIT_OK, EXIT_UNREACHABLE
from shoal.ops.client import (
    ApiError,
    ApiUnreachable,
    AsyncApiClient,
    add_api_key_flag,
    api_base,
)

# An advertised address that does not answer /health within this is taken as unreachable.
PROBE_TIMEOUT_S: Final = 2.0


async def complete_streaming(api: AsyncApiClient, body: dict[str, Any]) -> RequestResult:
    started = time.perf_counter()
    ttft: float | None = None
    usage: dict[str, Any] | None = None
    text_chunks = 0
    try:
        async with aclosing(api.complete_stream(body)) as chunks:
            async for chunk in chunks:
                if chunk.error:
                    return RequestResult(None, 0, ttft, time.perf_counter() - started, chunk.error)
                if chunk.text:
                    text_chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                usage = chunk.usage or usage
    except ApiError as exc:
        return RequestResult(None, 0, None, time.perf_counter() - started, str(exc))
    except (httpx.HTTPError, ValueError) as exc:
        return RequestResult(None, 0, ttft, time.perf_counter() - started, f"{exc!r}")
    latency = time.perf_counter() - started
    if usage is None:
        return RequestResult(None, text_chunks, ttft, latency, "no usage chunk in the stream")
    return RequestResult(
        int(usage["prompt_tokens"]), int(usage["completion_tokens"]), ttft, latency
    )


async def first_model(api: AsyncApiClient) -> str:
    models = await api.models()
    if not models:
        raise ApiError(f"{api.base} serves no model yet; check `shoal run` output")
    return models[0]


async def resolve_nodes(api: AsyncApiClient, nodes: str | list[str] | None) -> list[str]:
    """The base URLs requests go to: --api alone, the --nodes list, or every node of --api's
    cluster at the first of its addresses (in node_candidates' order) that answers /health."""
    if nodes is None:
        return [api.base]
    if nodes != ALL_NODES:
        return list(nodes)
    urls = []
    for name, candidates in node_candidates(await api.state(), api.base):
        for url in candidates:
            if await api.at(url).healthy(PROBE_TIMEOUT_S):
                urls.append(url)
                break
        else:
            tried = ", ".join(candidates) or "no advertised address"
            raise ApiError(f"node {name} does not answer at {tried}; list URLs with --nodes")
    return urls


async def calibrate(api: AsyncApiClient, model: str) -> Calibration:
    samples = []
    for words in CALIBRATION_WORDS:
        body = {"model": model, "prompt": synthetic_text(words, seed=0), "max_tokens": 1}
        samples.append((words, (await api.complete(body)).usage.prompt_tokens))
    return Calibration.from_samples(samples)


async def warm_up(api: AsyncApiClient, model: str, concurrency: int) -> None:
    """Short requests at the highest concurrency first: a fresh node pays once for each new
    batch shape (seconds on a CPU), which must not land in the first cell that uses it. A
    server that refuses these requests stops the run before the first phase starts."""
    bodies = [request_body(model, synthetic_text(8, seed=i), 4) for i in range(concurrency)]
    results = await asyncio.gather(*(complete_streaming(api, b) for b in bodies))
    if failed := first_error(results):
        raise ApiError(f"warm-up request to {api.base} failed: {failed}")


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

    api: AsyncApiClient  # the pool every node's requests share
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
            request = complete_streaming(run.api.at(node), body)
            result = await asyncio.wait_for(request, timeout)
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
        run.say(cell_line(summary, wall))
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
    timeout = httpx.Timeout(args.timeout, connect=5.0)
    async with AsyncApiClient(api, timeout=timeout, limits=limits, api_key=args.api_key) as client:
        nodes = await resolve_nodes(client, args.nodes)
        model = args.model or await first_model(client.at(nodes[0]))
        say(
            f"bench {model} on {', '.join(nodes)}: phases {', '.join(args.phases)}, "
            f"{len(cells)} cells, {sum(c.requests for c in cells)} requests, "
            f"timeout {args.timeout:.0f} s per request -> {out}"
        )
        calibration = await calibrate(client.at(nodes[0]), model)
        for node in nodes:
            started = time.perf_counter()
            await warm_up(client.at(node), model, top)
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
    add_api_key_flag(parser)
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
