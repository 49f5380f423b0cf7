"""The quantized torch engine as a client sees it: decode speed and memory of `shoal run` serving
the bundled SmolLM2-135M Q4_1 GGUF kept quantized (`--quantize auto`) against the float32
reference (`--quantize none`), transformers' `generate` and, when it can be had, llama.cpp.

Measured side by side in one run, one thing at a time (never two engines at once):

1. Decode through the API: a fresh `shoal run` node per mode (127.0.0.1, a free port, discovery
   off, a throw-away SHOAL_HOME whose tokenizer cache is filled first, SHOAL_TORCH_THREADS and
   OMP_NUM_THREADS = --threads), one streamed chat completion of --new-tokens tokens, greedy,
   EOS ignored (bench/serving_path.py `stream_once`). Decode tok/s = content chunks after the
   first over their time; TTFT = request to first chunk.
2. Four concurrent streams on the auto node: all chunks over the wall time from the first
   request to the last chunk, against the single stream's chunks over its own wall time.
3. Memory: the node's process tree (node + runner), peak RSS sampled every 50 ms from launch
   through the first answer and the whole benchmark, and the steady RSS once loaded (idle,
   after the first answer). The weights alone, in a fresh subprocess per mode: RSS after
   importing torch and shoal.engine, then `load_model(path, quantize=...)` and
   `release_freed_memory()`, RSS again; the delta and `module_bytes(model)` against the GGUF
   file's size. The first load also pays one-time costs (modules torch imports lazily, e.g.
   torch._dynamo and sympy), so the same process then frees that model and loads it again:
   that second delta is the weights alone. Both are reported and judged.
4. transformers `generate` on the same GGUF (dequantized to float32), in a subprocess, the same
   threads, the same prompt ids (shoal's tokenizer renders the chat template as the node does),
   greedy, exactly --new-tokens tokens; decode tok/s from a streamer
   (bench/decode_vs_transformers.py `transformers_generate`).
5. llama.cpp, if it is there: a `llama-server`, `llama-bench` or `llama-cli` on PATH, else the
   `llama_cpp` package (llama-cpp-python) in a subprocess: `Llama(path, n_threads, n_ctx=1024)`,
   the same prompt ids, greedy through `Llama.generate` (which does not stop at EOS), the clock
   on each token; decode tok/s = tokens after the first over their time. Otherwise a skip
   line. `--install-llama-cpp` first runs `pip install llama-cpp-python`, which builds
   llama.cpp from source with cmake and g++: minutes (7 on 2 busy cores).

Every quantity gets a warm-up, then --reps repetitions; medians reported. Targets are printed
as PASS/MISS, never asserted; results go to bench/results/quantized_serving.json.

    python bench/quantized_serving.py [--new-tokens 128] [--reps 3] [--threads 2]
        [--install-llama-cpp] [--skip-llama-cpp] [--timeout 180]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_transformers import MODEL_FILE, MODEL_ID, bundled_gguf  # noqa: E402
from serving_path import STREAM_PROMPT, stream_once  # noqa: E402
from startup import (  # noqa: E402
    PeakRss,
    first_answer,
    free_port,
    node_command,
    stop,
    wait_healthy,
)

RESULTS = Path(__file__).resolve().parent / "results" / "quantized_serving.json"
PROMPT = STREAM_PROMPT
CONCURRENT = 4
TARGET_CONCURRENCY_4 = 3.0
TARGET_AUTO_PEAK_RSS_BYTES = 600 * 10**6
TARGET_WEIGHTS_VS_FILE = 1.3
TARGET_VS_TRANSFORMERS = 2.5
PROBE_TIMEOUT_S = 1200.0
INSTALL_TIMEOUT_S = 1800.0
MB = 10**6


def median(values: list[float]) -> float:
    return statistics.median(values)


def tree_rss(pid: int) -> dict[str, int]:
    """RSS of a process ("node") and each of its children ("runner" or its name), now."""
    root = psutil.Process(pid)
    parts: dict[str, int] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            role = "node" if p.pid == pid else p.name()
            if p.pid != pid and "shoal.runner" in " ".join(p.cmdline()):
                role = "runner"
            parts[role] = parts.get(role, 0) + p.memory_info().rss
        except psutil.NoSuchProcess:  # a child that just exited
            continue
    return parts


def steady_rss(pid: int, samples: int = 5, every_s: float = 0.2) -> dict[str, int]:
    """The median of a few samples of an idle process tree: in all and per process."""
    values = []
    for _ in range(samples):
        values.append(tree_rss(pid))
        time.sleep(every_s)
    roles = sorted({role for v in values for role in v})
    out = {role: int(median([v.get(role, 0) for v in values])) for role in roles}
    return {"total": int(median([sum(v.values()) for v in values])), **out}


def chat_prompt(home: Path) -> tuple[str, list[int]]:
    """The prompt as the node renders and tokenizes a chat request (filling the tokenizer
    cache under `home`, the nodes' SHOAL_HOME)."""
    from shoal.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(bundled_gguf(), home / "cache" / "tokenizers")
    messages = [{"role": "user", "content": PROMPT}]
    return tokenizer.render_chat(messages), tokenizer.apply_chat_template(messages)


def decode(home: Path, ids: list[int]) -> str:
    from shoal.engine.tokenizer import Tokenizer

    return Tokenizer.load(bundled_gguf(), home / "cache" / "tokenizers").decode(ids)


# --- 1-3: shoal through the API ---------------------------------------------------------------


def concurrent_streams(url: str, model: str, tokens: int) -> dict[str, Any]:
    with ThreadPoolExecutor(CONCURRENT) as pool:
        streams = list(
            pool.map(lambda _: stream_once(url, model, tokens, PROMPT, True), range(CONCURRENT))
        )
    wall = max(s["last"] for s in streams) - min(s["started"] for s in streams)
    return {
        "aggregate_tok_s": sum(s["chunks"] for s in streams) / wall,
        "wall_s": wall,
        "per_stream_decode_tok_s": [s["decode_tok_s"] for s in streams],
        "chunks": [s["chunks"] for s in streams],
    }


def end_to_end(stream: dict[str, Any]) -> float:
    return stream["chunks"] / (stream["last"] - stream["started"])


def measure_node(quantize: str, home: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = node_command(port, "--quantize", quantize)
    threads = str(args.threads)
    env = {
        **os.environ,
        "SHOAL_HOME": str(home),
        "SHOAL_TORCH_THREADS": threads,
        "OMP_NUM_THREADS": threads,
    }
    out: dict[str, Any] = {"quantize": quantize, "command": " ".join(command)}
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with PeakRss(proc.pid) as rss:
                wait_healthy(url, proc, started + args.timeout)
                model, _ = first_answer(url)
                out["seconds_to_first_answer"] = time.monotonic() - started
                out["peak_rss_to_first_answer_bytes"] = rss.peak
                out["steady_rss_bytes"] = steady_rss(proc.pid)["total"]
                out["steady_rss_by_process_bytes"] = steady_rss(proc.pid)
                stream_once(url, model, args.new_tokens, PROMPT, True)  # warm-up
                single = [
                    stream_once(url, model, args.new_tokens, PROMPT, True) for _ in range(args.reps)
                ]
                print(
                    f"  {quantize}: decode "
                    + ", ".join(f"{s['decode_tok_s']:.1f}" for s in single)
                    + " tok/s, TTFT "
                    + ", ".join(f"{s['ttft_s']:.3f}" for s in single)
                    + " s",
                    flush=True,
                )
                batches = []
                if quantize == "auto":
                    concurrent_streams(url, model, args.new_tokens)  # warm-up
                    for _ in range(args.reps):
                        batches.append(concurrent_streams(url, model, args.new_tokens))
                    print(
                        f"  {quantize} x{CONCURRENT}: aggregate "
                        + ", ".join(f"{b['aggregate_tok_s']:.1f}" for b in batches)
                        + " tok/s",
                        flush=True,
                    )
                out["steady_rss_after_bench_bytes"] = steady_rss(proc.pid)["total"]
        except Exception as exc:
            stop(proc)
            log.seek(0)
            tail = log.read().decode("utf-8", "replace")[-3000:]
            raise SystemExit(f"node {quantize}: {exc}\n--- node log tail ---\n{tail}") from exc
        code, _ = stop(proc)
    out.update(
        {
            "model": model,
            "peak_rss_bytes": rss.peak,
            "rss_samples": rss.samples,
            "exit_code_after_sigint": code,
            "decode_tok_s": median([s["decode_tok_s"] for s in single]),
            "ttft_s": median([s["ttft_s"] for s in single]),
            "end_to_end_tok_s": median([end_to_end(s) for s in single]),
            "streams": single,
        }
    )
    if batches:
        agg = median([b["aggregate_tok_s"] for b in batches])
        out["concurrent"] = {
            "streams": CONCURRENT,
            "aggregate_tok_s": agg,
            "vs_single_end_to_end": agg / out["end_to_end_tok_s"],
            "runs": batches,
        }
    return out


# --- probes, each in a fresh subprocess of this script -----------------------------------------


def run_probe(name: str, args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Run `--probe name` in a fresh interpreter; its last stdout line is its JSON result."""
    command = [
        sys.executable,
        __file__,
        "--probe",
        name,
        "--new-tokens",
        str(args.new_tokens),
        "--reps",
        str(args.reps),
        "--threads",
        str(args.threads),
        "--home",
        str(home),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"error": f"probe {name} ran past {PROBE_TIMEOUT_S:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"probe {name} exited {done.returncode}: {done.stderr.strip()[-1500:]}"}
    return json.loads(lines[-1])


def probe_weights(quantize: str) -> dict[str, Any]:
    """RSS around load_model in this fresh process: the first load (as the runner's, paying
    one-time costs too: modules torch imports lazily, kernel set-up), then a second load after
    the first model is freed, which is the weights alone."""
    import gc
    import resource

    import shoal.engine  # noqa: F401
    from shoal.engine import quant, weights

    path = bundled_gguf()
    me = psutil.Process()

    def load() -> tuple[int, int, int, float]:
        weights.release_freed_memory()
        before = me.memory_info().rss
        started = time.perf_counter()
        model = weights.load_model(path, quantize=quantize)
        took = time.perf_counter() - started
        weights.release_freed_memory()
        return before, me.memory_info().rss, quant.module_bytes(model), took

    before, after, held, load_s = load()
    gc.collect()  # the first model is gone
    before2, after2, _, _ = load()
    size = path.stat().st_size
    return {
        "quantize": quantize,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "resident_delta_bytes": after - before,
        "second_load_delta_bytes": after2 - before2,
        "module_bytes": held,
        "gguf_file_bytes": size,
        "resident_vs_file": (after - before) / size,
        "second_load_vs_file": (after2 - before2) / size,
        "module_vs_file": held / size,
        "load_s": load_s,
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def probe_transformers(args: argparse.Namespace) -> dict[str, Any]:
    import transformers
    from decode_vs_transformers import transformers_generate

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = bundled_gguf()
    _, ids = chat_prompt(args.home)
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - started
    transformers_generate(model, ids, args.new_tokens)  # warm-up
    runs, generated = [], []
    for _ in range(args.reps):
        timing, generated = transformers_generate(model, ids, args.new_tokens)
        runs.append(timing)
    return {
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "prompt_tokens": len(ids),
        "load_s": load_s,
        "decode_tok_s": median([r.decode_tps for r in runs]),
        "prefill_s": median([r.prefill_s for r in runs]),
        "runs_decode_tok_s": [r.decode_tps for r in runs],
        "tokens": [r.tokens for r in runs],
        "text": decode(args.home, generated),
    }


def probe_llama_cpp(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp

    path = bundled_gguf()
    _, ids = chat_prompt(args.home)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=1024,
        verbose=False,
    )

    def once() -> dict[str, float]:
        llm.reset()  # no prompt reuse between runs: each one prefills the whole prompt
        stamps: list[float] = []
        generated.clear()
        started = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            generated.append(token)
            if len(stamps) >= args.new_tokens:
                break
        return {
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "ttft_s": stamps[0] - started,
            "tokens": len(stamps),
        }

    generated: list[int] = []
    once()  # warm-up
    runs = [once() for _ in range(args.reps)]
    return {
        "how": "llama_cpp package (llama-cpp-python), Llama.generate, greedy",
        "llama_cpp_python": llama_cpp.__version__,
        "threads": args.threads,
        "prompt_tokens": len(ids),
        "decode_tok_s": median([r["decode_tok_s"] for r in runs]),
        "ttft_s": median([r["ttft_s"] for r in runs]),
        "runs": runs,
        "text": decode(args.home, generated),
    }


# --- 5: llama.cpp from a binary on PATH --------------------------------------------------------


def llama_server(binary: str, ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """llama-server's own timings for a /completion of the same prompt ids, EOS ignored."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t = str(args.threads)
    command = [
        binary,
        "-m",
        str(bundled_gguf()),
        "-t",
        t,
        "-tb",
        t,
        "-c",
        "1024",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, time.monotonic() + args.timeout)
            body = {
                "prompt": ids,
                "n_predict": args.new_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "cache_prompt": False,
            }
            runs = []
            with httpx.Client(timeout=300.0) as client:
                for _ in range(args.reps + 1):
                    timings = client.post(f"{url}/completion", json=body).raise_for_status()
                    timings = timings.json()["timings"]
                    runs.append(
                        {
                            "decode_tok_s": timings["predicted_per_second"],
                            "prefill_s": timings["prompt_ms"] / 1000,
                            "tokens": timings["predicted_n"],
                        }
                    )
        finally:
            stop(proc)
    runs = runs[1:]  # the first was the warm-up
    return {
        "how": f"{binary} /completion timings.predicted_per_second",
        "threads": args.threads,
        "decode_tok_s": median([r["decode_tok_s"] for r in runs]),
        "runs": runs,
    }


def llama_bench(binary: str, args: argparse.Namespace) -> dict[str, Any]:
    """llama-bench's token-generation test: no prompt, --new-tokens tokens, its own reps."""
    command = [
        binary,
        "-m",
        str(bundled_gguf()),
        "-t",
        str(args.threads),
        "-p",
        "0",
        "-n",
        str(args.new_tokens),
        "-r",
        str(args.reps),
        "-o",
        "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    done.check_returncode()
    rows = [r for r in json.loads(done.stdout) if r.get("n_gen")]
    return {
        "how": f"{binary} -p 0 -n {args.new_tokens} (tg test, empty context, not the prompt)",
        "threads": args.threads,
        "decode_tok_s": rows[0]["avg_ts"],
        "runs": rows,
    }


def llama_cli(binary: str, text: str, args: argparse.Namespace) -> dict[str, Any]:
    """llama-cli's own eval timing for the rendered chat prompt, EOS ignored."""
    command = [
        binary,
        "-m",
        str(bundled_gguf()),
        "-t",
        str(args.threads),
        "-c",
        "1024",
        "-n",
        str(args.new_tokens),
        "--ignore-eos",
        "--temp",
        "0",
        "-no-cnv",
        "-p",
        text,
    ]
    pattern = re.compile(r"(?<!prompt )eval time =.*?([\d.]+) tokens per second")
    runs = []
    for _ in range(args.reps + 1):
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
        )
        found = pattern.findall(done.stderr + done.stdout)
        if not found:
            raise RuntimeError(f"no eval timing in {binary}'s output (exit {done.returncode})")
        runs.append(float(found[-1]))
    runs = runs[1:]
    return {
        "how": f"{binary} eval time line",
        "threads": args.threads,
        "decode_tok_s": median(runs),
        "runs": runs,
    }


def install_llama_cpp() -> str:
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "llama-cpp-python"],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"pip install llama-cpp-python ran past {INSTALL_TIMEOUT_S:.0f} s"
    took = time.monotonic() - started
    if done.returncode != 0:
        return f"pip install llama-cpp-python failed ({took:.0f} s): {done.stderr[-500:]}"
    return f"pip install llama-cpp-python done in {took:.0f} s"


def measure_llama_cpp(args: argparse.Namespace, home: Path, ids: list[int]) -> dict[str, Any]:
    """Never raises: a result with decode_tok_s, or {"skipped": why}."""
    if args.skip_llama_cpp:
        return {"skipped": "--skip-llama-cpp"}
    notes = []
    if args.install_llama_cpp:
        notes.append(install_llama_cpp())
        print(f"  {notes[-1]}", flush=True)
    for name in ("llama-server", "llama-bench", "llama-cli"):
        binary = shutil.which(name)
        if binary is None:
            continue
        try:
            if name == "llama-server":
                return llama_server(binary, ids, args)
            if name == "llama-bench":
                return llama_bench(binary, args)
            return llama_cli(binary, chat_prompt(home)[0], args)
        except Exception as exc:  # one binary failing: try the next way
            notes.append(f"{name}: {exc}")
    notes.append("no llama-server, llama-bench or llama-cli on PATH")
    try:
        import importlib.util

        found = importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        notes.append(
            "llama_cpp not importable (pip install llama-cpp-python, or run with "
            "--install-llama-cpp: it builds llama.cpp from source, minutes)"
        )
        return {"skipped": "; ".join(notes)}
    result = run_probe("llama-cpp", args, home)
    if "error" in result:
        return {"skipped": "; ".join([*notes, result["error"]])}
    return result


# --- the whole benchmark -----------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch (and llama.cpp) threads")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for health")
    parser.add_argument(
        "--install-llama-cpp",
        action="store_true",
        help="pip install llama-cpp-python first (a source build: minutes)",
    )
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.probe:
        probes = {
            "weights-auto": lambda: probe_weights("auto"),
            "weights-none": lambda: probe_weights("none"),
            "transformers": lambda: probe_transformers(args),
            "llama-cpp": lambda: probe_llama_cpp(args),
        }
        print(json.dumps(probes[args.probe]()))
        return

    path = bundled_gguf()
    print(
        f"model {MODEL_ID} ({path.name}, {path.stat().st_size / MB:.1f} MB), CPU, "
        f"torch {torch.__version__}, threads {args.threads} of {os.cpu_count()} CPUs, "
        f"{args.new_tokens} new tokens, {args.reps} reps (after a warm-up each)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        home = Path(tmp)
        # Fill the tokenizer cache first, so neither node's start-up converts it.
        _, ids = chat_prompt(home)
        print(f"prompt {PROMPT!r}: {len(ids)} tokens with the chat template", flush=True)

        print("shoal through the API", flush=True)
        nodes = {q: measure_node(q, home, args) for q in ("auto", "none")}
        api_prompt = nodes["auto"]["streams"][0].get("prompt_tokens")
        if api_prompt is not None and api_prompt != len(ids):
            print(f"  note: the node counted {api_prompt} prompt tokens, not {len(ids)}")

        print("weights' resident bytes (fresh subprocess per mode)", flush=True)
        weights: dict[str, Any] = {}
        for q in ("auto", "none"):
            run_probe(f"weights-{q}", args, home)  # warm-up
            reps = [run_probe(f"weights-{q}", args, home) for _ in range(args.reps)]
            errors = [r["error"] for r in reps if "error" in r]
            if errors:
                raise SystemExit(f"weights probe {q}: {errors[0]}")
            delta = median([r["resident_delta_bytes"] for r in reps])
            delta2 = median([r["second_load_delta_bytes"] for r in reps])
            size = reps[-1]["gguf_file_bytes"]
            weights[q] = {
                **reps[-1],
                "resident_delta_bytes": delta,
                "resident_vs_file": delta / size,
                "second_load_delta_bytes": delta2,
                "second_load_vs_file": delta2 / size,
                "runs_resident_delta_bytes": [r["resident_delta_bytes"] for r in reps],
                "runs_second_load_delta_bytes": [r["second_load_delta_bytes"] for r in reps],
            }
            print(
                f"  {q}: +{delta / MB:.1f} MB resident (first load), +{delta2 / MB:.1f} MB "
                f"(second load), module_bytes {weights[q]['module_bytes'] / MB:.1f} MB",
                flush=True,
            )

        print("transformers generate (subprocess)", flush=True)
        hf = run_probe("transformers", args, home)
        if "error" in hf:
            raise SystemExit(hf["error"])
        print(f"  decode {', '.join(f'{x:.1f}' for x in hf['runs_decode_tok_s'])} tok/s")

        print("llama.cpp", flush=True)
        llama = measure_llama_cpp(args, home, ids)
        print(f"  {llama.get('skipped') or llama['how']}", flush=True)

    auto, none = nodes["auto"], nodes["none"]
    concurrency = auto["concurrent"]["vs_single_end_to_end"]
    vs_hf = auto["decode_tok_s"] / hf["decode_tok_s"]
    ratio_file = weights["auto"]["resident_vs_file"]
    checks = {
        "concurrency4_vs_single": concurrency >= TARGET_CONCURRENCY_4,
        "auto_peak_rss": auto["peak_rss_bytes"] < TARGET_AUTO_PEAK_RSS_BYTES,
        "auto_weights_vs_file": ratio_file <= TARGET_WEIGHTS_VS_FILE,
        "auto_weights_second_load_vs_file": (
            weights["auto"]["second_load_vs_file"] <= TARGET_WEIGHTS_VS_FILE
        ),
        "auto_api_vs_transformers": vs_hf >= TARGET_VS_TRANSFORMERS,
    }
    result = {
        "model": MODEL_ID,
        "file": MODEL_FILE,
        "gguf_file_bytes": path.stat().st_size,
        "prompt": PROMPT,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "threads": args.threads,
        "threads_set_by": {
            "node": f"SHOAL_TORCH_THREADS={args.threads} OMP_NUM_THREADS={args.threads} "
            "(the runner's torch.set_num_threads)",
            "probes": f"torch.set_num_threads({args.threads}), OMP_NUM_THREADS={args.threads}",
        },
        "node": nodes,
        "weights": weights,
        "transformers": hf,
        "llama_cpp": llama,
        "ratios": {
            "concurrency4_vs_single": concurrency,
            "auto_api_vs_transformers": vs_hf,
            "none_api_vs_transformers": none["decode_tok_s"] / hf["decode_tok_s"],
            "auto_vs_none_decode": auto["decode_tok_s"] / none["decode_tok_s"],
            "auto_api_vs_llama_cpp": (
                auto["decode_tok_s"] / llama["decode_tok_s"] if "decode_tok_s" in llama else None
            ),
        },
        "targets": {
            "concurrency4_vs_single": TARGET_CONCURRENCY_4,
            "auto_peak_rss_bytes": TARGET_AUTO_PEAK_RSS_BYTES,
            "auto_weights_vs_file": TARGET_WEIGHTS_VS_FILE,
            "auto_api_vs_transformers": TARGET_VS_TRANSFORMERS,
        },
        "meets_targets": checks,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{'':40} {'measured':>12}  target")
    for q, node in nodes.items():
        print(f"{f'shoal {q}, API decode':40} {node['decode_tok_s']:8.1f}tok/s")
        print(f"{f'shoal {q}, API TTFT':40} {node['ttft_s'] * 1000:10.0f}ms")
    print(
        f"{f'shoal auto, {CONCURRENT} streams aggregate':40} "
        f"{auto['concurrent']['aggregate_tok_s']:8.1f}tok/s  {concurrency:.2f}x single "
        f"(>= {TARGET_CONCURRENCY_4:.0f}x: {verdict(checks['concurrency4_vs_single'])})"
    )
    print(f"{'transformers generate, decode':40} {hf['decode_tok_s']:8.1f}tok/s")
    print(
        f"{'shoal auto API / transformers':40} {vs_hf:11.2f}x  "
        f">= {TARGET_VS_TRANSFORMERS}x: {verdict(checks['auto_api_vs_transformers'])}"
    )
    if "decode_tok_s" in llama:
        print(f"{'llama.cpp Q4_1, decode':40} {llama['decode_tok_s']:8.1f}tok/s")
        print(
            f"{'shoal auto API / llama.cpp':40} {result['ratios']['auto_api_vs_llama_cpp']:11.2f}x"
        )
    else:
        print(f"{'llama.cpp':40} {'skipped':>12}  ({llama['skipped']})")
    print(
        f"{'node peak RSS, auto':40} {auto['peak_rss_bytes'] / MB:10.0f}MB  "
        f"< {TARGET_AUTO_PEAK_RSS_BYTES / MB:.0f} MB: {verdict(checks['auto_peak_rss'])}"
    )
    print(f"{'node peak RSS, none':40} {none['peak_rss_bytes'] / MB:10.0f}MB")
    for q, node in nodes.items():
        parts = node["steady_rss_by_process_bytes"]
        split = ", ".join(f"{k} {v / MB:.0f}" for k, v in parts.items() if k != "total")
        print(
            f"{f'node steady RSS after load, {q}':40} {node['steady_rss_bytes'] / MB:10.0f}MB  "
            f"({split} MB)"
        )
    for q, w in weights.items():
        held = f"module_bytes {w['module_bytes'] / MB:.1f} MB ({w['module_vs_file']:.2f}x file)"
        first, second = w["resident_vs_file"], w["second_load_vs_file"]
        bound = f"<= {TARGET_WEIGHTS_VS_FILE}x"
        print(
            f"{f'weights resident, {q}, first load':40} "
            f"{w['resident_delta_bytes'] / MB:10.1f}MB  {first:.2f}x file"
            + (f" ({bound}: {verdict(checks['auto_weights_vs_file'])})" if q == "auto" else "")
        )
        print(
            f"{f'weights resident, {q}, second load':40} "
            f"{w['second_load_delta_bytes'] / MB:10.1f}MB  {second:.2f}x file"
            + (
                f" ({bound}: {verdict(checks['auto_weights_second_load_vs_file'])})"
                if q == "auto"
                else ""
            )
            + f"; {held}"
        )
    print(
        f"threads {args.threads} of {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; results: {args.out}"
    )


if __name__ == "__main__":
    main()
