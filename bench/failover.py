"""Self-healing timings on real paths: two namespaces, a veth cable and a 40 ms TUN wire.

A 2-node pipeline instance of the bundled model serves on the cable, the nodes run with the
default liveness settings (--suspect-after/--gone-after). Then:
1. the cable is cut (nftables, both ways): time until a node reports the path down (detection),
   until the leader re-placed the instance, and until it answers again on the slow path, with
   decode tok/s before and after;
2. the cable comes back: time until the instance is back on it, and its tok/s;
3. node B is SIGKILLed: time until A's view has it gone (dead-node detection); then B is started
   again: time until the instance serves again on the fast path (load included).

Every chat sent while waiting is counted by its status (200, 503 with Retry-After, anything
else). The timeline of each phase (both nodes' events, relative to the phase's start) is
printed, and the nodes' logs are kept under bench/results/failover-logs/.

Needs root. Prints the numbers and writes bench/results/failover.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_netns_healing import CHAT, CUT, FAST, SLOW, instance, serving_on  # noqa: E402
from test_netns_healing import start as start_node  # noqa: E402

from shoal.config import RunSettings  # noqa: E402

from netns import Lab, Namespace  # noqa: E402
from test_netns_instances import A_FAST, A_SLOW, B_FAST, B_SLOW, MODEL, PORT, curl  # noqa: E402

LIMIT_S = 180.0
RESULTS = ROOT / "bench" / "results"
DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunSettings)}
LIVENESS = ("--suspect-after", str(DEFAULTS["suspect_after"]),
            "--gone-after", str(DEFAULTS["gone_after"]))  # fmt: skip
statuses: Counter[str] = Counter()


def start(lab: Lab, ns: Namespace, name: str, home: Path):  # noqa: ANN201
    return start_node(lab, ns, name, home, *LIVENESS)  # the defaults, not the tests' quicker ones


def until(check, limit: float = LIMIT_S, every: float = 0.25) -> float:  # noqa: ANN001
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if check():
            return time.monotonic() - start
        time.sleep(every)
    raise TimeoutError("did not happen in time")


def chat(ns: Namespace) -> int:
    """One chat with its status counted: a 503 must say when to retry."""
    args = ["curl", "-s", "-o", "/dev/null", "-D", "-", "-w", "\n%{http_code}", "--max-time",
            "30", "-X", "POST", f"http://127.0.0.1:{PORT}/v1/chat/completions",
            "-H", "Content-Type: application/json", "-d", json.dumps(CHAT)]  # fmt: skip
    out = ns.run(*args, check=False).stdout
    head, _, code = out.rpartition("\n")
    status = int(code or 0)
    retry = "retry-after:" in head.lower()
    statuses[f"{status}{' retry-after' if status == 503 and retry else ''}"] += 1
    return status


def decode_rate(ns: Namespace, tokens: int = 48) -> float:
    body = {**CHAT, "max_tokens": tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me about the sea."}]}  # fmt: skip
    started = time.monotonic()
    code, answer = curl(ns, "/v1/chat/completions", body, "POST", timeout=120)
    assert code == 200, answer
    return answer["usage"]["completion_tokens"] / (time.monotonic() - started)


def path_down(ns: Namespace) -> bool:
    code, doc = curl(ns, "/cluster/alerts")
    return code == 200 and any(a["kind"] == "path" and a["status"] == "down" for a in doc["alerts"])


def peer_gone(ns: Namespace, name: str) -> bool:
    code, doc = curl(ns, "/cluster/nodes")
    return code == 200 and any(n.get("name") == name and n["status"] == "gone"
                               for n in doc["nodes"])  # fmt: skip


def timeline(title: str, since: float, *hosts: Namespace) -> None:
    """Both nodes' events since the phase began, oldest first, relative to its start."""
    events = []
    for ns in hosts:
        code, doc = curl(ns, "/cluster/alerts")
        if code == 200:
            events += [(e["at"], ns.name, e) for e in doc["events"] if e["at"] >= since - 0.5]
    print(f"-- {title}")
    for at, name, e in sorted(events, key=lambda x: x[0]):
        print(f"  {at - since:+7.2f} s  {name:<8} {e['kind']:<14} {e['message'][:110]}")


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("failover: needs root (network namespaces)")
    out: dict[str, float] = {"load_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        home = Path(tmp)
        try:
            run(lab, home, out)
        finally:
            kept = RESULTS / "failover-logs"
            shutil.rmtree(kept, ignore_errors=True)
            kept.mkdir(parents=True)
            for log in home.glob("*.log"):
                shutil.copy(log, kept / log.name)
    out["load_1m_after"] = os.getloadavg()[0]
    for key, value in out.items():
        print(f"{key:<28} {value:8.2f}")
    print("chats while waiting:", dict(statuses))
    path = RESULTS / "failover.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"at": time.time(), **out, "chats": dict(statuses)}, indent=2))
    print(f"wrote {path}")


def run(lab: Lab, home: Path, out: dict[str, float]) -> None:
    a, b = lab.host("a"), lab.host("b")
    lab.cable(a, "eth1", f"{A_FAST}/24", b, "eth1", f"{B_FAST}/24")
    lab.slow_cable(a, "slow0", f"{A_SLOW}/30", b, "slow0", f"{B_SLOW}/30", rtt_ms=40.0)
    start(lab, a, "A", home)
    node_b = start(lab, b, "B", home)
    query = f"/instance/placement?model_id={MODEL}&min_nodes=2"
    until(lambda: curl(a, query)[0] == 200 and curl(b, query)[0] == 200)
    until(lambda: curl(a, "/instance", {"instance": curl(a, query)[1]}, "POST", 30)[0] == 200)
    until(lambda: serving_on(a, FAST))
    out["tok_s_fast"] = decode_rate(a)

    generation = instance(a)["generation"]
    cut, cut_at = time.monotonic(), time.time()
    a.nft(CUT.format(B_FAST))
    b.nft(CUT.format(A_FAST))
    out["cut_to_path_down_s"] = until(lambda: path_down(a))
    until(lambda: (instance(a) or {}).get("generation", 0) > generation)
    out["cut_to_replaced_s"] = time.monotonic() - cut
    until(lambda: serving_on(a, SLOW) and chat(a) == 200)
    out["cut_to_serving_again_s"] = time.monotonic() - cut
    timeline("cable cut", cut_at, a, b)
    out["tok_s_after_cut"] = decode_rate(a)

    a.run("nft", "delete", "table", "inet", "shoalcut")
    b.run("nft", "delete", "table", "inet", "shoalcut")
    restored, restored_at = time.monotonic(), time.time()
    until(lambda: serving_on(a, FAST) and chat(a) == 200)
    out["restore_to_fast_again_s"] = time.monotonic() - restored
    timeline("cable back", restored_at, a, b)
    out["tok_s_restored"] = decode_rate(a)

    generation = instance(a)["generation"]
    killed_at = time.time()
    node_b.kill()
    node_b.wait(timeout=10)
    out["kill_to_gone_s"] = until(lambda: peer_gone(a, "B"), every=0.1)
    shutil.copy(home / "B.log", home / "B-before-kill.log")  # the restart writes B.log anew
    restarted, restarted_at = time.monotonic(), time.time()
    start(lab, b, "B", home)
    until(lambda: serving_on(a, FAST, generation) and chat(a) == 200)
    out["restart_to_serving_s"] = time.monotonic() - restarted
    timeline("B killed, then started again", killed_at, a, b)
    print(f"  (B started again at {restarted_at - killed_at:+.2f} s)")


if __name__ == "__main__":
    main()
