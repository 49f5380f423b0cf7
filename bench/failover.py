"""Self-healing timings on real paths: two namespaces, a veth cable and a 40 ms TUN wire.

A 2-node pipeline instance of the bundled model serves on the cable. Then:
1. the cable is cut (nftables, both ways): time until a node reports the path down (detection),
   until the leader re-placed the instance, and until it answers again on the slow path, with
   decode tok/s before and after;
2. the cable comes back: time until the instance is back on it, and its tok/s;
3. node B is SIGKILLed and started again: time until the instance serves again.

Needs root. Prints the numbers and writes bench/results/failover.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_netns_healing import CUT, FAST, SLOW, chat, instance, serving_on, start  # noqa: E402

from netns import Lab, Namespace  # noqa: E402
from test_netns_instances import A_FAST, A_SLOW, B_FAST, B_SLOW, MODEL, curl  # noqa: E402

LIMIT_S = 180.0


def until(check, limit: float = LIMIT_S, every: float = 0.25) -> float:  # noqa: ANN001
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if check():
            return time.monotonic() - start
        time.sleep(every)
    raise TimeoutError("did not happen in time")


def decode_rate(ns: Namespace, tokens: int = 48) -> float:
    body = {
        "model": MODEL,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
    }
    started = time.monotonic()
    code, answer = curl(ns, "/v1/chat/completions", body, "POST", timeout=120)
    assert code == 200, answer
    return answer["usage"]["completion_tokens"] / (time.monotonic() - started)


def path_down(ns: Namespace) -> bool:
    code, doc = curl(ns, "/cluster/alerts")
    return code == 200 and any(a["kind"] == "path" and a["status"] == "down" for a in doc["alerts"])


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("failover: needs root (network namespaces)")
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        home = Path(tmp)
        a, b = lab.host("a"), lab.host("b")
        lab.cable(a, "eth1", f"{A_FAST}/24", b, "eth1", f"{B_FAST}/24")
        lab.slow_cable(a, "slow0", f"{A_SLOW}/30", b, "slow0", f"{B_SLOW}/30", rtt_ms=40.0)
        start(lab, a, "A", home)
        node_b = start(lab, b, "B", home)
        query = f"/instance/placement?model_id={MODEL}&min_nodes=2"
        until(lambda: curl(a, query)[0] == 200)
        curl(a, "/instance", {"instance": curl(a, query)[1]}, "POST", timeout=30)
        until(lambda: serving_on(a, FAST))
        out["tok_s_fast"] = decode_rate(a)

        generation = instance(a)["generation"]
        cut = time.monotonic()
        a.nft(CUT.format(B_FAST))
        b.nft(CUT.format(A_FAST))
        out["cut_to_path_down_s"] = until(lambda: path_down(a))
        until(lambda: (instance(a) or {}).get("generation", 0) > generation)
        out["cut_to_replaced_s"] = time.monotonic() - cut
        until(lambda: serving_on(a, SLOW) and chat(a, timeout=20)[0] == 200)
        out["cut_to_serving_again_s"] = time.monotonic() - cut
        out["tok_s_after_cut"] = decode_rate(a)

        a.run("nft", "delete", "table", "inet", "shoalcut")
        b.run("nft", "delete", "table", "inet", "shoalcut")
        restored = time.monotonic()
        until(lambda: serving_on(a, FAST) and chat(a, timeout=20)[0] == 200)
        out["restore_to_fast_again_s"] = time.monotonic() - restored
        out["tok_s_restored"] = decode_rate(a)

        generation = instance(a)["generation"]
        node_b.kill()
        node_b.wait(timeout=10)
        restarted = time.monotonic()
        start(lab, b, "B", home)
        until(lambda: serving_on(a, FAST, generation) and chat(a, timeout=20)[0] == 200)
        out["restart_to_serving_s"] = time.monotonic() - restarted
    for key, value in out.items():
        print(f"{key:<28} {value:8.2f}")
    path = ROOT / "bench" / "results" / "failover.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"at": time.time(), **out}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
