"""One rank of one instance, in its own process: `python -m shoal.runner --spec-json J`.

The contract with the node's worker is shoal.runner.spec (the spec in, status lines out). A
1-rank instance (a model a node serves alone) needs no process group: it loads, warms up and
serves. Rank 0 of any instance serves shoal.runner.endpoint on its own port.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

import torch
import uvicorn

from shoal.engine.distributed import InitError, PeerLostError, Peers, join
from shoal.engine.generator import Executor, Generator
from shoal.engine.serving import ServedModel
from shoal.engine.tokenizer import Tokenizer
from shoal.engine.weights import bound_heap_growth
from shoal.runner.build import Following, Rank, open_rank, rendezvous_of
from shoal.runner.endpoint import Readiness, create_endpoint
from shoal.runner.spec import TOKENS_EVERY_S, RunnerSpec, StatusLine, runner_secret
from shoal.schema.limits import DEFAULT_CLIENT_TIMEOUT_S
from shoal.web.limits import server_limits
from shoal.web.signed import SignedPeers

log = logging.getLogger("shoal.runner")

THREADS_ENV = "SHOAL_TORCH_THREADS"  # torch threads per rank (several ranks may share a host)
LOAD_TIMEOUT_S = 900.0  # every rank holds its shard within this, or the instance fails
IDLE_DEBOUNCE_S = 0.5  # rank 0 reports "ready" again after this long without requests


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
        context_length: int | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        line = StatusLine(
            status=status, reason=reason, port=port, tokens=tokens,
            context_length=context_length, layers=layers,
        )  # fmt: skip
        with self._lock:
            self.current = status
            self.stream.write(line.model_dump_json(exclude_none=True) + "\n")
            self.stream.flush()


class Runner:
    def __init__(self, spec: RunnerSpec, status: StatusWriter) -> None:
        self.spec = spec
        self.status = status
        self.stopping = threading.Event()
        self.serving = False
        self.follower: Following | None = None
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
            rank = open_rank(spec)  # the model's config, no weights yet: a bad spec fails here
            if spec.world_size > 1:  # a model served alone meets nobody
                self.peers = join(rendezvous_of(spec))
            self.status("loading")
            model = rank.load(self.peers, self._loaded)
            tokenizer = (
                Tokenizer.load(spec.model_path, spec.tokenizer_cache) if spec.rank == 0 else None
            )
            if self.peers is not None:
                self.peers.wait_until_all_loaded(LOAD_TIMEOUT_S)
            self.status("warming")
            self.serving = True
            if self.stopping.is_set():
                return self._stopped()
            if spec.rank == 0:
                return self._serve(rank, model, tokenizer)
            return self._follow(rank, model)
        except Exception as exc:
            return self._failed(exc)

    def _failed(self, exc: Exception) -> int:
        log.error("rank %d failed", self.spec.rank, exc_info=exc)
        reason = (
            str(exc)
            if isinstance(exc, (InitError, PeerLostError))
            else f"{type(exc).__name__}: {exc}"
        )
        if self.peers is not None:
            self.peers.report_failure(reason)
        self.status("failed", reason)
        return 1

    def _loaded(self, done: int, of: int) -> None:
        self.status("loading", layers=(done, of))

    def _stopped(self) -> int:
        self.status("stopped")
        return 0

    def _follow(self, rank: Rank, model: Any) -> int:
        assert self.peers is not None
        self.follower = rank.follower(self.peers, model)
        if self.stopping.is_set():
            self.follower.request_stop()

        def first_step() -> None:
            if self.status.current == "warming":  # the warm-up generation passed through here
                self.status("ready")

        self.follower.run(on_step=first_step)
        return self._stopped()

    def _serve(self, rank: Rank, model: Any, tokenizer: Tokenizer) -> int:
        spec = self.spec
        sock = bind_socket(spec.serve_host, spec.serve_port)
        port = sock.getsockname()[1]
        executor = rank.executor(self.peers, model)
        generator = Generator(executor, tokenizer)
        served = ServedModel(spec.model_id, tokenizer, generator)
        readiness = Readiness(reason=f"warming up {spec.model_id}")
        # with the cluster secret, only signed calls (the nodes' relays): every path
        app = create_endpoint(served, readiness, spec.max_body_bytes, spec.max_tokens_cap)
        endpoint = SignedPeers(app, runner_secret(os.environ),
                               f"{spec.instance_id}/rank0", peer_only=None)  # fmt: skip
        server = uvicorn.Server(
            uvicorn.Config(
                endpoint,
                log_level="warning",
                lifespan="off",
                access_log=False,
                **server_limits(DEFAULT_CLIENT_TIMEOUT_S),
            )
        )
        threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="shoal-api", daemon=True
        ).start()
        outcome = _Serving(executor)
        supervisor = threading.Thread(
            target=self._supervise,
            args=(served, readiness, server, port, outcome),
            name="shoal-supervisor",
            daemon=True,
        )
        supervisor.start()
        generator.run()  # the scheduler on the thread that loaded the model (Generator.run)
        supervisor.join()
        return self._served(outcome)

    def _supervise(
        self,
        served: ServedModel,
        readiness: Readiness,
        server: uvicorn.Server,
        port: int,
        outcome: _Serving,
    ) -> None:
        """Warm up, report, watch; then stop the scheduler. If the scheduler is stuck in a
        step (a peer lost inside a collective), this thread ends the process itself."""
        generator = served.generator
        try:
            result = served.warm_up()
            log.info(
                "warm-up through %d ranks: %r in %.2fs",
                self.spec.world_size,
                result.text,
                result.seconds,
            )
            readiness.ready = True
            self.status("ready", port=port, context_length=served.context_length)
            outcome.failure = self._watch(generator, outcome.executor, port)
        except Exception as exc:
            outcome.error = exc
        finally:
            readiness.ready = False
            readiness.reason = "the instance is stopping"
            server.should_exit = True
            outcome.scheduler_ended = generator.stop()
        if not outcome.scheduler_ended:
            _exit(self._served(outcome))

    def _served(self, outcome: _Serving) -> int:
        """The exit code once serving ended: failed, or stopped and the ranks released."""
        if outcome.error is not None:
            return self._failed(outcome.error)
        if outcome.failure is not None:
            time.sleep(0.5)  # let the error responses of the failed requests go out
            return self._failed(PeerLostError(outcome.failure))
        if outcome.scheduler_ended:  # only one thread may talk to the other ranks
            outcome.executor.close()
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


@dataclass
class _Serving:
    """How a rank 0's serving ended, written by its supervisor thread."""

    executor: Executor
    failure: str | None = None  # the instance broke (a peer lost)
    error: Exception | None = None  # warm-up or watching failed
    scheduler_ended: bool = False


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


def _warm_tokenizers(paths: list[str], cache_dir: str | None) -> None:
    for path in paths:  # the cache is written by rename: a rank 0 loading it meanwhile is safe
        try:
            Tokenizer.load(path, cache_dir)
        except Exception as exc:  # the runner that needs it says why, if it does
            log.warning("could not build the tokenizer cache of %s: %s", path, exc)


def main(argv: list[str] | None = None) -> None:
    # Status lines own the real stdout; anything else printing to stdout lands on stderr.
    status = StatusWriter(os.fdopen(os.dup(1), "w", buffering=1))
    os.dup2(2, 1)
    parser = argparse.ArgumentParser(prog="python -m shoal.runner")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--spec-json", help="a RunnerSpec as JSON")
    given.add_argument(
        "--spec-stdin",
        action="store_true",
        help="read the RunnerSpec as one JSON line from stdin: a spare runner, its imports done "
        "before the worker needs it",
    )
    parser.add_argument(
        "--warm-tokenizer",
        action="append",
        default=[],
        metavar="GGUF",
        help="a spare builds this GGUF's tokenizer cache while it waits (seconds a first rank 0 "
        "on this node would spend after a move)",
    )
    parser.add_argument("--tokenizer-cache", help="where the tokenizer caches are")
    args = parser.parse_args(argv)
    if args.spec_stdin:
        if args.warm_tokenizer:
            threading.Thread(
                target=_warm_tokenizers,
                args=(args.warm_tokenizer, args.tokenizer_cache),
                name="shoal-warm-tokenizers",
                daemon=True,
            ).start()
        args.spec_json = sys.stdin.readline()
        if not args.spec_json:  # the worker closed it: not needed after all
            _exit(0)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
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
    bound_heap_growth()
    logging.getLogger().handlers[0].setFormatter(
        logging.Formatter(f"%(asctime)s rank {spec.rank} %(levelname)s %(name)s: %(message)s")
    )
    runner = Runner(spec, status)
    signal.signal(signal.SIGTERM, runner.on_sigterm)
    _exit(runner.run())


if __name__ == "__main__":
    main()
