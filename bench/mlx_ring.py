"""An MLX instance over mx.distributed's ring vs one rank, on loopback: decode tok/s of the same
model served by one `python -m shoal.runner` rank and by a 2-rank ring pipeline (and tensor
shards), each asked through its rank 0's endpoint with the same streamed greedy request.

    python bench/mlx_ring.py [--tokens 64] [--rounds 2] [--layers 8] [--hidden 512]

The model is a random qwen2 (mlx-lm's class; qwen2 can both pipeline and shard) with SmolLM2's
tokenizer, written once to a temp dir. Decode tok/s counts the streamed tokens after the first
over the time they took; layouts run in turn, `rounds` times. On two shared cores the ranks
take turns on the CPU, so the ratio measures what the ring and the lockstep cost; on Macs each
rank has its own machine and the ratio is what to expect from a real cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlx.core as mx
from mlx_lm.utils import _get_classes, save_model

from shoal.engine.sharding import even_layer_ranges
from shoal.engine.tokenizer import Tokenizer
from shoal.engine_mlx.convert import float_dtype, on_metal
from shoal.models.bundled import bundled_model_path
from shoal.runner.spec import RunnerSpec, StatusLine

RESULTS = Path(__file__).resolve().parent / "results" / "mlx_ring.json"
PROMPT = "Write a short story about a lighthouse keeper and a storm."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(directory: Path, layers: int, hidden: int) -> Path:
    tokenizer = Tokenizer.from_gguf(bundled_model_path(), directory / "tokenizers")
    config = {
        "model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": hidden * 3, "num_attention_heads": 8, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6, "vocab_size": tokenizer.vocab_size, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 2048,
    }  # fmt: skip
    mx.random.seed(3)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(getattr(mx, float_dtype(on_metal())))  # float32 on mlx's CPU: faster there
    mx.eval(model.parameters())
    out = directory / "qwen2"
    out.mkdir(parents=True)
    save_model(out, model)
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save_hf_dir(out)
    return out


def start(specs: list[RunnerSpec], logs: Path) -> tuple[list[subprocess.Popen], int]:
    """The runner ranks; rank 0's endpoint port once every rank is ready."""
    env = {**os.environ, "SHOAL_LOG_LEVEL": "WARNING"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "shoal.runner", "--spec-json", s.model_dump_json()],
            stdout=subprocess.PIPE,
            stderr=(logs / f"rank{s.rank}.log").open("w"),
            env=env,
        )  # fmt: skip
        for s in specs
    ]
    assert procs[0].stdout is not None
    deadline = time.monotonic() + 300
    for raw in procs[0].stdout:
        line = StatusLine.model_validate_json(raw)
        if line.status == "failed" or time.monotonic() > deadline:
            stop(procs)
            raise RuntimeError(f"rank 0 did not become ready: {line.reason}")
        if line.status == "ready" and line.port:
            return procs, line.port
    raise RuntimeError("rank 0 exited before it was ready")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def decode_rate(port: int, tokens: int) -> float:
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    stamps = []
    url = f"http://127.0.0.1:{port}/v1/completions"
    with httpx.stream("POST", url, json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text"' in line:
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def specs_for(model: Path, layers: int, world: int, sharding: str) -> list[RunnerSpec]:
    ranges = even_layer_ranges(layers, world) if sharding == "pipeline" else [(0, layers)] * world
    port = free_port()
    return [
        RunnerSpec(
            instance_id=f"bench-{sharding}-{world}",
            model_id="bench",
            model_path=str(model),
            sharding=sharding,
            backend="ring",
            engine="mlx",
            rank=rank,
            world_size=world,
            layer_range=span,
            store_host="127.0.0.1",
            store_port=port,
            ifname="lo",
            rank_hosts=("127.0.0.1",) * world,
            max_batch=1,
            max_seq_len=1024,
        )  # fmt: skip
        for rank, span in enumerate(ranges)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    layouts = [("one rank", 1, "pipeline"), ("ring pipeline", 2, "pipeline"),
               ("ring tensor", 2, "tensor")]  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name, _, _ in layouts}
    with tempfile.TemporaryDirectory(prefix="shoal-mlx-ring-") as tmp:
        model = build_model(Path(tmp), args.layers, args.hidden)
        for _ in range(args.rounds):
            for name, world, sharding in layouts:
                procs, port = start(specs_for(model, args.layers, world, sharding), Path(tmp))
                try:
                    decode_rate(port, 8)  # warm: the first request compiles nothing, but pages in
                    rates[name].append(decode_rate(port, args.tokens))
                finally:
                    stop(procs)
                print(f"{name:14s} {rates[name][-1]:6.2f} tok/s", flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    one = medians["one rank"]
    result = {
        "machine": platform.platform(), "cpus": os.cpu_count(), "mlx": mx.__version__,
        "device": str(mx.default_device()), "model": f"random qwen2 {args.layers} layers x "
        f"{args.hidden} ({float_dtype(on_metal())})", "tokens": args.tokens, "rounds": args.rounds,
        "tok_s": rates, "median_tok_s": medians,
        "ratio_vs_one_rank": {n: round(m / one, 3) for n, m in medians.items()},
    }  # fmt: skip
    for name, ratio in result["ratio_vs_one_rank"].items():
        print(f"{name:14s} median {medians[name]:6.2f} tok/s  ratio vs one rank {ratio:.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
