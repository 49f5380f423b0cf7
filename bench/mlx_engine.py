"""The MLX engine against plain mlx-lm on the same model, machine and run: single-stream decode
through shoal's scheduler (engine.generator + engine_mlx.executor) vs `mlx_lm.stream_generate`,
and the aggregate tok/s at several concurrent streams (shoal's scheduler vs mlx-lm's own
`batch_generate` on the same prompts).

    python bench/mlx_engine.py [--tokens 64] [--streams 4] [--bits 4]

The model is the bundled SmolLM2 GGUF converted once into an MLX dir (optionally quantized).
Decode tok/s counts the tokens after the first over the time they took, for both sides.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate
from mlx_lm.generate import batch_generate

from shoal.engine.generator import Generator
from shoal.engine.sampling import SamplingParams
from shoal.engine.serving import ServedModel
from shoal.engine.tokenizer import Tokenizer
from shoal.engine_mlx.convert import convert_gguf, float_dtype, on_metal
from shoal.engine_mlx.executor import MlxExecutor
from shoal.engine_mlx.load import load
from shoal.models.bundled import bundled_model_path

RESULTS = Path(__file__).resolve().parent / "results" / "mlx_engine.json"
QUESTION = "Write a short story about a lighthouse keeper and a storm."


def shoal_stream(served: ServedModel, prompt: list[int], tokens: int) -> float:
    """Decode tok/s of one stream: tokens after the first over the time they took."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    stamps: list[float] = []
    done = threading.Event()

    def on_event(event) -> None:
        stamps.extend(time.perf_counter() for _ in event.token_ids)
        if event.finish_reason is not None:
            done.set()

    served.generator.submit(prompt, params, on_event)
    if not done.wait(600):
        raise TimeoutError("the shoal stream did not finish in 600 s")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def mlx_lm_stream(model, tokenizer, prompt: list[int], tokens: int) -> float:
    stamps = []
    for response in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=tokens):
        stamps.append(time.perf_counter())
        del response
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "shoal-bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    started = time.perf_counter()
    model_dir = convert_gguf(bundled_model_path(), args.cache, args.bits)
    convert_s = time.perf_counter() - started
    model, config = load(model_dir)
    tokenizer = Tokenizer.from_hf_dir(model_dir)
    generator = Generator(MlxExecutor(model, config, args.streams, 2048), tokenizer)
    generator.start()
    served = ServedModel("smollm2", tokenizer, generator)
    prompt = served.chat_prompt([{"role": "user", "content": QUESTION}])
    ref_model, ref_tokenizer = mlx_lm_load(str(model_dir))
    try:
        shoal_stream(served, prompt, 8)  # warm both sides up
        mlx_lm_stream(ref_model, ref_tokenizer, prompt, 8)
        single = shoal_stream(served, prompt, args.tokens)
        reference = mlx_lm_stream(ref_model, ref_tokenizer, prompt, args.tokens)
        rates: list[float] = []

        def one() -> None:
            rates.append(shoal_stream(served, prompt, args.tokens))

        threads = [threading.Thread(target=one) for _ in range(args.streams)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        aggregate = args.streams * args.tokens / (time.perf_counter() - wall)
        # the reference at the same concurrency: mlx-lm's own batched generation
        wall = time.perf_counter()
        batch = batch_generate(ref_model, ref_tokenizer, [prompt] * args.streams,
                               max_tokens=args.tokens, return_token_ids=True)  # fmt: skip
        made = sum(len(ids) for ids in batch.token_ids or [])
        reference_aggregate = made / (time.perf_counter() - wall)
    finally:
        generator.stop()
    weights = f"{args.bits}-bit" if args.bits else float_dtype(on_metal())
    result = {
        "machine": f"{platform.system()} {platform.machine()}, mlx device {mx.default_device()}",
        "model": f"SmolLM2-135M-Instruct ({weights} MLX, from the bundled GGUF)",
        "convert_s": round(convert_s, 2),
        "tokens": args.tokens,
        "shoal_single_tok_s": round(single, 2),
        "mlx_lm_single_tok_s": round(reference, 2),
        "overhead_pct": round(100 * (reference - single) / reference, 1),
        "streams": args.streams,
        "shoal_aggregate_tok_s": round(aggregate, 2),
        "aggregate_over_single": round(aggregate / single, 2),
        "mlx_lm_batch_aggregate_tok_s": round(reference_aggregate, 2),
        "mlx_lm_batch_over_single": round(reference_aggregate / reference, 2),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
