"""The serving path end to end, side by side for source trees: time to first answer of a fresh
`shoal run`, then single-stream decode speed and time to first token as a client sees them
(streamed over the node's OpenAI API), and the node's peak resident memory.

Each tree runs in turn on the same machine in one invocation (`--tree name=path/to/src`, the
default is this checkout), so a redesign is measured against the code before it, e.g.

    git worktree add /tmp/before <commit>
    python bench/serving_path.py --tree before=/tmp/before/src --tree after=src

Decode tok/s counts the content chunks after the first one over the time they took.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import PeakRss, first_answer, free_port, stop, wait_healthy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serving_path.json"
ROOT_SRC = Path(__file__).resolve().parents[1] / "src"
STREAM_PROMPT = "Tell me a long story about the sea."


def stream_once(
    url: str, model: str, tokens: int, prompt: str = STREAM_PROMPT, usage: bool = False
) -> dict[str, float]:
    """One streamed chat completion of `tokens` new tokens (EOS ignored), greedy.

    Returns TTFT, decode tok/s (content chunks after the first over their time), the chunk
    count and the monotonic clock at the request, the first and the last chunk; with `usage`,
    also the token counts the node reports (stream_options.include_usage)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    started = time.monotonic()
    stamps: list[float] = []
    counts: dict[str, float] = {}
    with httpx.Client(timeout=300.0) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.monotonic())
                if chunk.get("usage"):
                    counts = {
                        "prompt_tokens": chunk["usage"]["prompt_tokens"],
                        "completion_tokens": chunk["usage"]["completion_tokens"],
                    }
    if len(stamps) < 2:
        raise RuntimeError(f"the stream gave {len(stamps)} content chunks")
    return {
        "ttft_s": stamps[0] - started,
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "chunks": len(stamps),
        "started": started,
        "first": stamps[0],
        "last": stamps[-1],
        **counts,
    }


def measure(name: str, src: Path, streams: int, tokens: int, timeout: float) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "SHOAL_HOME": tempfile.mkdtemp()}
    command = [sys.executable, "-m", "shoal.cli", "run", "--api-port", str(port), "--host",
               "127.0.0.1", "--discovery-interfaces", "none"]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with PeakRss(proc.pid) as rss:
                wait_healthy(url, proc, started + timeout)
                model, _ = first_answer(url)
                answer_s = time.monotonic() - started
                runs = [stream_once(url, model, tokens) for _ in range(streams)]
        except Exception as exc:
            stop(proc)
            log.seek(0)
            tail = log.read().decode("utf-8", "replace")[-3000:]
            raise SystemExit(f"{name}: {exc}\n--- node log tail ---\n{tail}") from exc
        stop(proc)
    return {
        "tree": name,
        "src": str(src),
        "seconds_to_first_answer": answer_s,
        "decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in runs),
        "ttft_s_median": statistics.median(r["ttft_s"] for r in runs),
        "peak_rss_mib": rss.peak / 2**20,
        "streams": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="name=path/to/src")
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="each tree this many times, in turn")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(ROOT_SRC)]]
    results = []
    for round_ in range(args.rounds):
        for name, src in trees:
            r = measure(name, Path(src), args.streams, args.tokens, args.timeout)
            results.append({**r, "round": round_})
            print(
                f"round {round_ + 1} {name}: first answer {r['seconds_to_first_answer']:.2f} s, "
                f"decode {r['decode_tok_s_median']:.1f} tok/s, TTFT {r['ttft_s_median']:.3f} s, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
