"""The worker<->runner contract: what a runner is asked to run, and the status lines it answers.

- The spec (RunnerSpec, JSON on the command line) says which model shard this rank holds and
  how to meet the others.
- The cluster secret, when the node has one, comes in the environment (SECRET_ENV, hex), never
  on the command line (any user's `ps` shows that): rank 0 then answers only signed calls.
- Status goes to the runner's stdout, one StatusLine (JSON) per line. `status` walks
  connecting -> loading -> warming -> ready <-> running, or ends in failed (reason says why, exit
  code 1) or stopped (clean SIGTERM, exit code 0). Rank 0 puts the port of its generation
  endpoint (see shoal.runner.endpoint) and its context length in its "ready" line, and its
  token count now and then while generating. Logs go to stderr.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

from shoal.schema.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS_CAP

TOKENS_EVERY_S = 2.0  # rank 0 reports its token count this often while generating


SECRET_ENV = "SHOAL_RUNNER_SECRET"
_NODE_SECRET_ENV = "SHOAL_CLUSTER_SECRET"  # the node's own: the runner gets SECRET_ENV only


def runner_env(env: Mapping[str, str], secret: bytes | None) -> dict[str, str]:
    """A runner's environment: the node's, with the cluster secret (if any) as SECRET_ENV."""
    out = {k: v for k, v in env.items() if k not in (SECRET_ENV, _NODE_SECRET_ENV)}
    if secret:
        out[SECRET_ENV] = secret.hex()
    return out


def runner_secret(env: Mapping[str, str]) -> bytes | None:
    """The cluster secret a runner was given, or None; ValueError if it is not hex."""
    value = env.get(SECRET_ENV)
    return bytes.fromhex(value) if value else None


class RunnerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    instance_id: str
    model_id: str
    model_path: str
    sharding: Literal["pipeline", "tensor"] = "pipeline"
    # torch: gloo or nccl. mlx: ring (TCP) or jaccl (RDMA) carry the model's collectives,
    # while the step headers go over a gloo group on the same rendezvous.
    backend: Literal["gloo", "nccl", "ring", "jaccl"] = "gloo"
    engine: Literal["torch", "mlx"] = "torch"  # torch: shoal.engine; mlx: shoal.engine_mlx
    rank: int
    world_size: int
    layer_range: tuple[int, int]  # [start, end); tensor parallel: every layer
    store_host: str  # rank 0's address every rank dials (TCPStore)
    store_port: int
    ifname: str | None = None  # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME for this rank
    rank_hosts: tuple[str, ...] = ()  # mlx ring: where each rank listens (placement's choice)
    rdma_devices: tuple[tuple[str | None, ...], ...] = ()  # jaccl: [i][j] rank i's device to j
    device: str = "cpu"
    quantize: Literal["auto", "int8", "none"] = "auto"  # torch: how weights are held (quant)
    max_batch: int = 4
    max_seq_len: int | None = None
    serve_host: str = "127.0.0.1"  # rank 0: where its OpenAI endpoint listens
    serve_port: int = 0  # 0: any free port, reported in the "ready" line
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # rank 0: a larger request body gets 413
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP  # rank 0: the most output tokens a request gets
    tokenizer_cache: str | None = None
    cache_dir: str | None = None  # derived files: a GGUF converted for the MLX engine
    init_attempts: int = 8  # init_process_group tries, with backoff, over ~init_window_s
    init_window_s: float = 30.0
    step_timeout_s: float = 30.0  # a collective that takes longer fails the step
    heartbeat_s: float = 2.0  # rank 0 pings the other ranks this often when idle


class StatusLine(BaseModel):
    """One line of a runner's stdout."""

    model_config = ConfigDict(extra="ignore")

    status: str
    reason: str | None = None
    port: int | None = None  # rank 0: its generation endpoint
    tokens: int | None = None  # rank 0: tokens generated so far
    context_length: int | None = None  # rank 0: the longest sequence it serves
    layers: tuple[int, int] | None = None  # loading: (layers this rank holds so far, of)


def apple_silicon(system: str, machine: str) -> bool:
    """Where mlx runs on Metal (platform.system(), platform.machine())."""
    return system == "Darwin" and machine == "arm64"


def node_capabilities(
    system: str, machine: str, cuda: bool, mps: bool, mlx_installed: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(engines as engine:device, instance backends) a node can run. torch runs everywhere
    (gloo over TCP; nccl on CUDA); mlx where installed: Metal on an Apple-silicon Mac, its CPU
    build elsewhere, the ring over TCP anywhere, JACCL (RDMA over Thunderbolt 5) only on Macs."""
    mac = apple_silicon(system, machine)
    torch_device = "cuda" if cuda else "mps" if mps else "cpu"
    engines = [f"torch:{torch_device}"]
    backends = ["gloo", *(["nccl"] if cuda else [])]
    if mlx_installed:
        engines.append("mlx:metal" if mac else "mlx:cpu")
        backends += ["ring", *(["jaccl"] if mac else [])]
    return tuple(engines), tuple(backends)


def pick_engine(setting: str, system: str, machine: str, mlx_installed: bool) -> str:
    """`--engine auto|torch|mlx` -> the engine a node's own model runs on. auto: mlx on an
    Apple-silicon Mac that has it installed (Metal), torch elsewhere. Asking for mlx where it
    is not installed is refused with the command that installs it."""
    if setting not in ("auto", "torch", "mlx"):
        raise ValueError(f"--engine {setting!r}: use auto, torch or mlx")
    if setting == "mlx" and not mlx_installed:
        raise ValueError("--engine mlx: mlx and mlx-lm are not installed; pip install 'shoal[mlx]'")
    if setting == "auto":
        return "mlx" if apple_silicon(system, machine) and mlx_installed else "torch"
    return setting
