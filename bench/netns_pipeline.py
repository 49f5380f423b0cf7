"""A 2-rank pipeline across network namespaces: one node vs the fast path vs the slow path.

Two namespaces joined by a veth cable (fast) and a TUN wire with --rtt-ms added (slow). The
same bundled model runs as: one rank alone in namespace a; two ranks (a: first half of the
layers, b: second half) meeting over the veth cable; the same two ranks over the slow wire.
Each scenario streams --runs greedy chats of --max-tokens (EOS ignored) from inside namespace a
and reports decode tok/s, time to first token, and the per-hop overhead per token against the
single rank ((pipeline step - single step) / 2 hops: activations out, token back).

Needs root, iproute2 and /dev/net/tun. Prints a table and writes bench/results/netns_pipeline.json.
Every address used lives in namespaces this script creates and removes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from shoal.engine.sharding import even_layer_ranges  # noqa: E402
from shoal.engine.weights import open_source  # noqa: E402
from shoal.models.bundled import BUNDLED_MODEL_ID, bundled_model_path  # noqa: E402
from shoal.runner.spec import RunnerSpec  # noqa: E402

from netns import Lab, Namespace  # noqa: E402

A_FAST, B_FAST = "10.233.1.1", "10.233.1.2"
A_SLOW, B_SLOW = "10.241.9.1", "10.241.9.2"
READY_TIMEOUT_S = 240

CLIENT = r"""
import json, sys, time, httpx
url, runs, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = {"model": "m", "stream": True, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "messages": [{"role": "user", "content": "Tell me about the sea."}]}
out = []
for _ in range(runs):
    start = time.perf_counter(); first = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    first = first or time.perf_counter()
    end = time.perf_counter()
    out.append({"ttft_s": first - start, "decode_s": end - first, "tokens": max_tokens})
print(json.dumps(out))
"""


def start_rank(ns: Namespace, spec: RunnerSpec, log: Path) -> subprocess.Popen:
    env = {**os.environ, "SHOAL_TORCH_THREADS": "1"}
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns.name,
            sys.executable,
            "-m",
            "shoal.runner",
            "--spec-json",
            spec.model_dump_json(),
        ],
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        env=env,
        text=True,
    )


def wait_ready(proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + READY_TIMEOUT_S
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("rank 0 exited before it was ready (see the log)")
        status = json.loads(line)
        if status["status"] == "failed":
            raise RuntimeError(f"rank 0 failed: {status['reason']}")
        if status["status"] == "ready":
            return int(status["port"])
    raise TimeoutError("rank 0 not ready in time")


def scenario(
    name: str,
    placements: list[tuple[Namespace, str | None]],
    store: str,
    args: argparse.Namespace,
    logs: Path,
    port: int,
) -> dict[str, Any]:
    model = bundled_model_path()
    layers = even_layer_ranges(open_source(model).config.num_layers, len(placements))
    procs = []
    try:
        for rank, (ns, ifname) in enumerate(placements):
            spec = RunnerSpec(
                instance_id=f"bench-{name}",
                model_id="m",
                model_path=str(model),
                rank=rank,
                world_size=len(placements),
                layer_range=layers[rank],
                store_host=store,
                store_port=port,
                ifname=ifname,
                serve_host="127.0.0.1",
                max_batch=1,
            )
            procs.append(start_rank(ns, spec, logs / f"{name}-rank{rank}.log"))
        endpoint = f"http://127.0.0.1:{wait_ready(procs[0])}"
        client = placements[0][0].run(
            sys.executable, "-c", CLIENT, endpoint, str(args.runs), str(args.max_tokens)
        )
        runs = json.loads(client.stdout)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    step_ms = statistics.median(1000 * r["decode_s"] / (r["tokens"] - 1) for r in runs)
    return {
        "scenario": name,
        "ranks": len(placements),
        "decode_tok_s": round(1000 / step_ms, 2),
        "step_ms": round(step_ms, 2),
        "ttft_ms": round(1000 * statistics.median(r["ttft_s"] for r in runs), 1),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "netns_pipeline.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("netns_pipeline: needs root (network namespaces)")
    logs = Path(args.out).parent / "netns_pipeline_logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.cable(a, "eth1", f"{A_FAST}/24", b, "eth1", f"{B_FAST}/24")
        lab.slow_cable(a, "slow0", f"{A_SLOW}/30", b, "slow0", f"{B_SLOW}/30", rtt_ms=args.rtt_ms)
        plans = [
            ("single", [(a, None)], "127.0.0.1"),
            ("pipeline-fast-veth", [(a, "eth1"), (b, "eth1")], A_FAST),
            (f"pipeline-slow-{args.rtt_ms:g}ms", [(a, "slow0"), (b, "slow0")], A_SLOW),
        ]
        for i, (name, placements, store) in enumerate(plans):
            results.append(scenario(name, placements, store, args, logs, 42100 + i))
            r = results[-1]
            print(
                f"{name:<24} {r['decode_tok_s']:>7.2f} tok/s  step {r['step_ms']:>7.2f} ms"
                f"  ttft {r['ttft_ms']:>7.1f} ms",
                flush=True,
            )
    single = results[0]["step_ms"]
    for r in results[1:]:
        r["per_hop_overhead_ms"] = round((r["step_ms"] - single) / 2, 2)
        print(f"{r['scenario']:<24} per-hop overhead {r['per_hop_overhead_ms']:.2f} ms")
    doc = {
        "model": BUNDLED_MODEL_ID,
        "max_tokens": args.max_tokens,
        "rtt_ms": args.rtt_ms,
        "results": results,
        "at": time.time(),
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
