"""`shoal bench`'s pure core: the cells a run plans, what one request measured, the summaries,
tables and JSONL records made of them. No I/O; `shoal.ops.bench` is the shell that sends the
requests and writes the file.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Final

import httpx

from shoal.ops.chat import decode_rate
from shoal.ops.client import api_base
from shoal.schema.documents import StateDocument

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


def node_candidates(state: StateDocument, api: str) -> list[tuple[str, list[str]]]:
    """GET /state's node rows -> (name, base URLs to try in order) for every node not gone.

    The node behind --api comes first (it answers for the model and the calibration) and is
    reached at --api itself. For the others, advertised addresses on --api's host come first
    (on a loopback test cluster those are the ones that answer), then the rest as advertised."""
    api_host = httpx.URL(api).host
    rows = [row for row in state.nodes if row.status != "gone"]
    out = []
    for row in sorted(rows, key=lambda row: not row.is_self):
        if row.is_self:
            out.append((row.display_name, [api]))
            continue
        urls = [api_base(address) for address in row.addresses]
        out.append(
            (row.display_name, sorted(urls, key=lambda url: httpx.URL(url).host != api_host))
        )
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


def first_error(results: Sequence[RequestResult]) -> str | None:
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
        first_error=first_error(results),
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
                first_error=first_error(by_node[node]),
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
        first_error=first_error(results),
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


def cell_line(summary: CellSummary, wall_s: float) -> str:
    """The line printed when a cell ends."""
    line = (
        f"  done in {wall_s:.1f} s: {_num(summary.aggregate_decode_tps, '.1f')} tok/s "
        f"aggregate, TTFT p50 {_num(summary.ttft_p50_s, '.2f')} s, "
        f"latency p50 {_num(summary.latency_p50_s, '.2f')} s"
    )
    if summary.errors:
        line += f", {summary.errors} failed: {summary.first_error}"
    if summary.short_requests:
        line += f", {summary.short_requests} stopped before max_tokens"
    return line
