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

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal, TextIO

import torch
import uvicorn
from pydantic import BaseModel, ConfigDict

from shoal.engine.config import ModelConfig
from shoal.engine.distributed import InitError, PeerLostError, Peers, Rendezvous, join
from shoal.engine.generator import Executor, Generator, LocalExecutor, context_length
from shoal.engine.lockstep import Follower, PipelineExecutor, TensorExecutor
from shoal.engine.model import Transformer
from shoal.engine.serving import ServedModel
from shoal.engine.sharding import load_tensor_shard, tensor_parallel_config
from shoal.engine.tokenizer import Tokenizer
from shoal.engine.weights import WeightSource, load_model, open_source, release_freed_memory

log = logging.getLogger("shoal.runner")

THREADS_ENV = "SHOAL_TORCH_THREADS"  # torch threads per rank (several ranks may share a host)


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


# -- building one rank ------------------------------------------------------------------------

LOAD_TIMEOUT_S = 900.0  # every rank holds its shard within this, or the instance fails
TOKENS_EVERY_S = 2.0  # rank 0 reports its token count this often while generating
IDLE_DEBOUNCE_S = 0.5  # rank 0 reports "ready" again after this long without requests


def rendezvous_of(spec: RunnerSpec) -> Rendezvous:
    return Rendezvous(
        rank=spec.rank,
        world_size=spec.world_size,
        store_host=spec.store_host,
        store_port=spec.store_port,
        backend=spec.backend,
        ifname=spec.ifname,
        attempts=spec.init_attempts,
        window_s=spec.init_window_s,
        step_timeout_s=spec.step_timeout_s,
    )


def check_spec(spec: RunnerSpec, config: ModelConfig) -> None:
    """Refuse a spec this rank cannot take part in, before any weights are read."""
    start, end = spec.layer_range
    last = spec.rank == spec.world_size - 1
    if not 0 <= spec.rank < spec.world_size:
        raise ValueError(f"rank {spec.rank} is outside world size {spec.world_size}")
    if spec.heartbeat_s >= spec.step_timeout_s:
        raise ValueError("heartbeat_s must be shorter than step_timeout_s")
    if spec.sharding == "tensor":
        if (start, end) != (0, config.num_layers):
            raise ValueError(
                f"tensor parallel ranks hold every layer: layer_range must be "
                f"(0, {config.num_layers}), not {spec.layer_range}"
            )
        tensor_parallel_config(config, spec.world_size)  # raises ShardingError
        return
    if spec.world_size > 1 and (
        (spec.rank == 0) != (start == 0) or last != (end == config.num_layers)
    ):
        raise ValueError(
            f"pipeline rank {spec.rank} of {spec.world_size} holds stage {spec.rank}: layers "
            f"{spec.layer_range} do not fit (the model has {config.num_layers} layers; rank 0 "
            "starts at layer 0 and the last rank ends with the last layer)"
        )


def load_rank_model(spec: RunnerSpec, source: WeightSource) -> Transformer:
    """This rank's part of the model, and nothing more: its layers or its slices."""
    check_spec(spec, source.config)
    if spec.sharding == "tensor":
        return load_tensor_shard(
            spec.model_path, spec.rank, spec.world_size, spec.device, source=source
        )
    return load_model(spec.model_path, tuple(spec.layer_range), spec.device, source=source)


def build_executor(
    spec: RunnerSpec, peers: Peers, model: Transformer, config: ModelConfig
) -> Executor:
    """Rank 0's executor, for the scheduler."""
    max_seq_len = context_length(config, spec.max_seq_len)
    if spec.world_size == 1:
        return LocalExecutor(model, spec.max_batch, max_seq_len)
    kind = TensorExecutor if spec.sharding == "tensor" else PipelineExecutor
    return kind(
        model,
        peers,
        config,
        max_batch=spec.max_batch,
        max_seq_len=max_seq_len,
        heartbeat_s=spec.heartbeat_s,
    )


def build_follower(
    spec: RunnerSpec, peers: Peers, model: Transformer, config: ModelConfig
) -> Follower:
    return Follower(
        model,
        peers,
        config,
        spec.sharding,
        max_batch=spec.max_batch,
        max_seq_len=context_length(config, spec.max_seq_len),
        stop_grace_s=spec.heartbeat_s + 1.0,
    )


# -- the process --------------------------------------------------------------------------------


class StatusWriter:
    """The status lines on this process's real stdout (everything else goes to stderr)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.current: str | None = None
        self._lock = threading.RLock()  # SIGTERM may write while a line is being written

    def __call__(
        self,
        status: str,
        reason: str | None = None,
        port: int | None = None,
        tokens: int | None = None,
    ) -> None:
        with self._lock:
            self.current = status
            fields = {"status": status, "reason": reason, "port": port}
            line = json.dumps(fields if tokens is None else {**fields, "tokens": tokens})
            self.stream.write(line + "\n")
            self.stream.flush()


@dataclass
class RunnerHost:
    """What the API app needs (ModelHost) from a runner's rank 0."""

    served: ServedModel
    ready: bool = False
    not_ready_reason: str = "warming up"
    cluster: None = None

    @property
    def models(self) -> dict[str, ServedModel]:
        return {self.served.id: self.served}


class Runner:
    def __init__(self, spec: RunnerSpec, status: StatusWriter) -> None:
        self.spec = spec
        self.status = status
        self.stopping = threading.Event()
        self.serving = False
        self.follower: Follower | None = None
        self.peers: Peers | None = None

    def on_sigterm(self, signum: int, frame: object) -> None:
        if not self.serving:  # connecting or loading: nothing to hand over
            self.status("stopped")
            _exit(0)
        self.stopping.set()
        if self.follower is not None:
            self.follower.request_stop()

    def run(self) -> int:
        spec = self.spec
        try:
            self.status("connecting")
            source = open_source(spec.model_path)  # metadata only: refuse a bad spec early
            check_spec(spec, source.config)
            self.peers = join(rendezvous_of(spec))
            self.status("loading")
            model = load_rank_model(spec, source)
            tokenizer = (
                Tokenizer.load(spec.model_path, spec.tokenizer_cache) if spec.rank == 0 else None
            )
            release_freed_memory()
            self.peers.wait_until_all_loaded(LOAD_TIMEOUT_S)
            self.status("warming")
            self.serving = True
            if self.stopping.is_set():
                return self._stopped()
            if spec.rank == 0:
                return self._serve(model, source.config, tokenizer)
            return self._follow(model, source.config)
        except Exception as exc:
            log.exception("rank %d failed", spec.rank)
            reason = (
                str(exc)
                if isinstance(exc, (InitError, PeerLostError))
                else f"{type(exc).__name__}: {exc}"
            )
            if self.peers is not None:
                self.peers.report_failure(reason)
            self.status("failed", reason)
            return 1

    def _stopped(self) -> int:
        self.status("stopped")
        return 0

    def _follow(self, model: Transformer, config: ModelConfig) -> int:
        self.follower = build_follower(self.spec, self.peers, model, config)
        if self.stopping.is_set():
            self.follower.request_stop()

        def first_step() -> None:
            if self.status.current == "warming":  # the warm-up generation passed through here
                self.status("ready")

        self.follower.run(on_step=first_step)
        return self._stopped()

    def _serve(self, model: Transformer, config: ModelConfig, tokenizer: Tokenizer) -> int:
        from shoal.api.app import create_app  # the API imports this module (RunnerSpec)

        spec = self.spec
        sock = bind_socket(spec.serve_host, spec.serve_port)
        port = sock.getsockname()[1]
        executor = build_executor(spec, self.peers, model, config)
        generator = Generator(executor, tokenizer)
        generator.start()
        served = ServedModel(spec.model_id, tokenizer, generator)
        host = RunnerHost(served)
        server = uvicorn.Server(
            uvicorn.Config(create_app(host), log_level="warning", lifespan="off", access_log=False)
        )
        threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="shoal-api", daemon=True
        ).start()
        try:
            result = served.warm_up()
            log.info(
                "warm-up through %d ranks: %r in %.2fs",
                spec.world_size,
                result.text,
                result.seconds,
            )
            host.ready = True
            self.status("ready", port=port)
            failure = self._watch(generator, executor, port)
        finally:
            host.ready = False
            host.not_ready_reason = "the instance is stopping"
            server.should_exit = True
            scheduler_ended = generator.stop()
        if failure is not None:
            time.sleep(0.5)  # let the error responses of the failed requests go out
            raise PeerLostError(failure)
        if scheduler_ended:  # only one thread may talk to the other ranks
            executor.close()
        return self._stopped()

    def _watch(self, generator: Generator, executor: Executor, port: int) -> str | None:
        """Report running/ready until SIGTERM (None) or the instance breaks (the reason)."""
        idle_since: float | None = None
        tokens_seen = generator.stats["tokens"]
        reported_at, reported_tokens = time.monotonic(), tokens_seen
        while not self.stopping.wait(0.1):
            if executor.failure is not None:
                return executor.failure
            tokens, tokens_seen = tokens_seen, generator.stats["tokens"]
            if generator.in_flight or tokens != tokens_seen:  # even a request shorter than 0.1 s
                idle_since = None
                if self.status.current != "running":
                    self.status("running", port=port, tokens=tokens_seen)
            elif self.status.current == "running":
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= IDLE_DEBOUNCE_S:
                    self.status("ready", port=port, tokens=tokens_seen)
            # the token count now and then, so the node can report this instance's tok/s
            if tokens_seen != reported_tokens and time.monotonic() - reported_at >= TOKENS_EVERY_S:
                self.status(self.status.current or "running", port=port, tokens=tokens_seen)
                reported_at, reported_tokens = time.monotonic(), tokens_seen
        return None


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _exit(code: int) -> None:
    # Skip interpreter teardown: gloo's threads abort the process if its group is destroyed
    # under them, and everything this process owes anyone has been flushed.
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    # Status lines own the real stdout; anything else printing to stdout lands on stderr.
    status = StatusWriter(os.fdopen(os.dup(1), "w", buffering=1))
    os.dup2(2, 1)
    parser = argparse.ArgumentParser(prog="python -m shoal.engine.runner")
    parser.add_argument("--spec-json", required=True, help="a RunnerSpec as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SHOAL_LOG_LEVEL", "INFO"),
        format="%(asctime)s runner %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        spec = RunnerSpec.model_validate_json(args.spec_json)
    except ValueError as exc:
        status("failed", f"invalid runner spec: {exc}")
        _exit(1)
    if threads := os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(threads))
    logging.getLogger().handlers[0].setFormatter(
        logging.Formatter(f"%(asctime)s rank {spec.rank} %(levelname)s %(name)s: %(message)s")
    )
    runner = Runner(spec, status)
    signal.signal(signal.SIGTERM, runner.on_sigterm)
    _exit(runner.run())


if __name__ == "__main__":
    main()
