"""Node start-up cost: seconds from launching `shoal run` to the first chat answer, and the peak
resident memory of the node (its process plus children, sampled every 50 ms).

Each run starts a fresh node on a free port on 127.0.0.1, polls /health, then sends one chat
request; the node is then stopped with SIGINT (as Ctrl-C would). The first run on a machine may
build caches (the tokenizer cache); the targets are judged on the last run, the warm case.

    python bench/startup.py [--runs 2] [--timeout 180]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"
TARGET_FIRST_ANSWER_S = 10.0
TARGET_PEAK_RSS_BYTES = 1.5 * 1024**3
SAMPLE_EVERY_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoal_command() -> list[str]:
    """The installed `shoal` script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("shoal")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shoal.cli"]


class PeakRss:
    """Samples the RSS of a process tree on a thread until stopped; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:  # a child that just exited
                    continue
            self.peak = max(self.peak, total)
            self.samples += 1
            self._stop.wait(SAMPLE_EVERY_S)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`shoal run` exited with {proc.returncode} before healthy")
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{url}/health not OK in time")


def first_answer(url: str) -> tuple[str, str]:
    with httpx.Client(timeout=120.0) as client:
        models = client.get(f"{url}/v1/models").raise_for_status().json()["data"]
        model = models[0]["id"]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        }
        response = client.post(f"{url}/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"chat failed: HTTP {response.status_code} {response.text[:300]}")
        text = response.json()["choices"][0]["message"]["content"]
        if not text:
            raise RuntimeError("chat answered with no text")
        return model, text


def stop(proc: subprocess.Popen[bytes]) -> tuple[int | None, float]:
    """SIGINT first, like Ctrl-C; escalate only if the node does not exit."""
    started = time.monotonic()
    for send, wait_s in (
        (lambda: proc.send_signal(signal.SIGINT), 15),
        (proc.terminate, 5),
        (proc.kill, 5),
    ):
        if proc.poll() is not None:
            break
        send()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.returncode, time.monotonic() - started


def node_command(port: int, *extra: str) -> list[str]:
    """`shoal run` on 127.0.0.1:port with discovery off: nothing leaves loopback."""
    return [
        *shoal_command(),
        *("run", "--api-port", str(port), "--host", "127.0.0.1"),
        *("--discovery-interfaces", "none", *extra),
    ]


def one_run(timeout: float, extra: list[str]) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = node_command(port, *extra)
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            with PeakRss(proc.pid) as rss:
                wait_healthy(url, proc, started + timeout)
                healthy_s = time.monotonic() - started
                model, text = first_answer(url)
                answer_s = time.monotonic() - started
        except Exception as exc:
            stop(proc)
            log.seek(0)
            tail = log.read().decode("utf-8", "replace")[-3000:]
            raise SystemExit(f"start-up run failed: {exc}\n--- node log tail ---\n{tail}") from exc
        code, stop_s = stop(proc)
    return {
        "command": " ".join(command),
        "model": model,
        "answer": text,
        "seconds_to_healthy": healthy_s,
        "seconds_to_first_answer": answer_s,
        "peak_rss_bytes": rss.peak,
        "peak_rss_mib": rss.peak / 2**20,
        "rss_samples": rss.samples,
        "exit_code_after_sigint": code,
        "seconds_to_stop": stop_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for health")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("node_args", nargs="*", help="extra `shoal run` arguments (after --)")
    args = parser.parse_args()

    runs = []
    for i in range(args.runs):
        run = one_run(args.timeout, args.node_args)
        runs.append(run)
        print(
            f"run {i + 1}/{args.runs}: healthy {run['seconds_to_healthy']:.2f} s, "
            f"first answer {run['seconds_to_first_answer']:.2f} s, "
            f"peak RSS {run['peak_rss_mib']:.0f} MiB, "
            f"stopped in {run['seconds_to_stop']:.1f} s (exit {run['exit_code_after_sigint']}), "
            f"answer {run['answer']!r}"
        )
    warm = runs[-1]
    fast = warm["seconds_to_first_answer"] <= TARGET_FIRST_ANSWER_S
    small = warm["peak_rss_bytes"] < TARGET_PEAK_RSS_BYTES
    result = {
        "runs": runs,
        "warm": warm,
        "targets": {
            "seconds_to_first_answer": TARGET_FIRST_ANSWER_S,
            "peak_rss_bytes": TARGET_PEAK_RSS_BYTES,
        },
        "meets_targets": {"first_answer": fast, "peak_rss": small},
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{'warm start (last run)':26} {'measured':>10}  target")
    print(
        f"{'first chat answer':26} {warm['seconds_to_first_answer']:9.2f}s  "
        f"<= {TARGET_FIRST_ANSWER_S:.0f} s: {'PASS' if fast else 'MISS'}"
    )
    print(
        f"{'peak RSS (with children)':26} {warm['peak_rss_mib']:7.0f}MiB  "
        f"< {TARGET_PEAK_RSS_BYTES / 2**30:.1f} GiB: {'PASS' if small else 'MISS'}"
    )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; results: {args.out}")


if __name__ == "__main__":
    main()
