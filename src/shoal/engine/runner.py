"""One rank of one instance, in its own process: `python -m shoal.engine.runner --spec-json J`.

Contract with the node's worker (shoal.worker):
- The spec (RunnerSpec, JSON) says which model shard this rank holds and how to meet the others.
- Status goes to stdout, one JSON object per line: {"status": S, "reason": str|null,
  "port": int|null}; S walks connecting -> loading -> warming -> ready <-> running, or ends in
  failed (reason says why, exit code 1) or stopped (clean SIGTERM, exit code 0). Rank 0 puts
  the port of its OpenAI endpoint (/v1/chat/completions, /v1/completions, /v1/models, /health)
  in its "ready" line. Logs go to stderr.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class RunnerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    instance_id: str
    model_id: str
    model_path: str
    sharding: Literal["pipeline", "tensor"] = "pipeline"
    backend: Literal["gloo", "nccl"] = "gloo"
    rank: int
    world_size: int
    layer_range: tuple[int, int]  # [start, end); tensor parallel: every layer
    store_host: str  # rank 0's address every rank dials (TCPStore)
    store_port: int
    ifname: str | None = None  # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME for this rank
    device: str = "cpu"
    max_batch: int = 4
    max_seq_len: int | None = None
    serve_host: str = "127.0.0.1"  # rank 0: where its OpenAI endpoint listens
    serve_port: int = 0  # 0: any free port, reported in the "ready" line
    tokenizer_cache: str | None = None
    init_attempts: int = 8  # init_process_group tries, with backoff, over ~init_window_s
    init_window_s: float = 30.0
    step_timeout_s: float = 30.0  # a collective that takes longer fails the step
    heartbeat_s: float = 2.0  # rank 0 pings the other ranks this often when idle
