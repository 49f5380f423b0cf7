"""Time from start to a converged cluster view, and the CPU a node spends on its cluster loop.

Starts N nodes (`--model none`) on loopback, once with static peers (127.0.0.2..) and once with
mDNS restricted to 127.0.0.1 (distinct ports), and reports for each: seconds from launch to the
first API answer, seconds from then to every node seeing every node alive with one leader,
and each node's CPU% over a quiet window while it polls and probes its peers. Prints a table
and writes bench/results/cluster_convergence.json. Traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

RESULTS = Path(__file__).parent / "results"


def launch(nodes: list[tuple[str, int]], mode: str, home: Path) -> list[subprocess.Popen]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    procs = []
    for i, (host, port) in enumerate(nodes):
        args = [
            sys.executable,
            "-m",
            "shoal.cli",
            "run",
            "--model",
            "none",
            "--host",
            host,
            "--api-port",
            str(port),
            "--namespace",
            namespace,
            "--log-level",
            "warning",
        ]
        if mode == "static":
            peers = ",".join(f"{h}:{p}" for h, p in nodes if (h, p) != (host, port))
            args += ["--peers", peers, "--discovery-interfaces", "none"]
        else:
            args += ["--discovery-interfaces", "127.0.0.1"]
        env = {**os.environ, "SHOAL_HOME": str(home / f"{mode}{i}")}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))  # fmt: skip
    return procs


def view(host: str, port: int) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"http://{host}:{port}/cluster/nodes", timeout=1)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None  # 503: still starting


def converged(nodes: list[tuple[str, int]]) -> bool:
    docs = [view(h, p) for h, p in nodes]
    if any(d is None for d in docs):
        return False
    alive = [sum(n["status"] == "alive" for n in d["nodes"]) for d in docs]
    return all(a == len(nodes) for a in alive) and len({d["leader"] for d in docs}) == 1


def measure(nodes: list[tuple[str, int]], mode: str, home: Path, window: float) -> dict[str, Any]:
    started = time.monotonic()
    procs = launch(nodes, mode, home)
    try:
        deadline = started + 90
        while not all(view(h, p) for h, p in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: nodes did not start")
            time.sleep(0.05)
        answering = time.monotonic()
        while not converged(nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the view did not converge")
            time.sleep(0.05)
        done = time.monotonic()
        ps = [psutil.Process(p.pid) for p in procs]
        before = [sum(x.cpu_times()[:2]) for x in ps]
        time.sleep(window)
        cpu = [100 * (sum(x.cpu_times()[:2]) - b) / window for x, b in zip(ps, before, strict=True)]
        return {
            "mode": mode,
            "nodes": len(nodes),
            "launch_to_api_s": round(answering - started, 2),
            "api_to_converged_s": round(done - answering, 2),
            "cpu_percent_per_node": [round(c, 2) for c in cpu],
            "window_s": window,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4, help="nodes (each has N-1 peers)")
    parser.add_argument("--window", type=float, default=10.0, help="CPU sampling window, s")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        static = [(f"127.0.0.{2 + i}", 52600) for i in range(args.nodes)]
        mdns = [("127.0.0.1", 52610 + i) for i in range(args.nodes)]
        for mode, nodes in (("static", static), ("mdns", mdns)):
            results.append(measure(nodes, mode, home, args.window))
            r = results[-1]
            print(
                f"{mode:>6}: {r['nodes']} nodes, launch->API {r['launch_to_api_s']:.2f} s, "
                f"API->converged {r['api_to_converged_s']:.2f} s, CPU per node "
                f"{', '.join(f'{c:.1f}%' for c in r['cpu_percent_per_node'])}",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "cluster_convergence.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
