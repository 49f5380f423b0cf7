"""This node's runners: one subprocess per (instance, rank) placed here.

Every served model is an instance: the ones the leader's plan places, and this node's solo
instances (a model it serves alone, a 1-rank instance). `reconcile(plan)` starts the runners
they want and stops the ones no longer wanted; the runners' status lines (shoal.runner.spec)
become the RunnerState this node reports. A runner that fails stays failed with its reason
until its instance is dropped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.models.local import LocalModel
from shoal.placement.plan import desired_runners
from shoal.runner.spec import TOKENS_EVERY_S, RunnerSpec, StatusLine, runner_env
from shoal.schema.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS_CAP
from shoal.schema.report import ClusterPlan, InstanceSpec, RunnerState

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # a runner gets this long to stop cleanly before it is killed
ENDED = ("failed", "stopped")
STARTING = ("idle", "loading", "warming")  # busy on the CPU (connecting waits on the network)


@dataclass(frozen=True)
class WorkerSettings:
    serve_host: str = "127.0.0.1"  # where a rank-0 runner's OpenAI endpoint listens
    device: str = "cpu"
    quantize: str = "auto"  # engine.footprint.QUANTIZE_MODES
    max_batch: int = 4
    max_seq_len: int | None = None
    tokenizer_cache: Path | None = None
    cache_dir: Path | None = None
    log_dir: Path | None = None  # runner stderr goes here (one file per runner), else inherited
    # keep one runner process started ahead of need (_spawn) from the start (a node told its
    # peers), else once the plan puts a rank of a multi-node instance here: those move
    spare: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # rank 0's endpoint refuses larger (413)
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP  # and gives a request at most this many tokens
    secret: bytes | None = field(default=None, repr=False)  # the cluster secret, for rank 0


def _die_with_parent() -> None:
    """A runner must not outlive a node that was killed: its ranks' sockets close at once, so
    the instance's other ranks fail their steps now instead of at a collective timeout."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def endpoint_host(serve_host: str, solo: bool) -> str:
    """Where a rank 0's endpoint listens: on the API's --host, since any node may relay to a
    placed instance at any address it has of this one; a model this node serves alone only
    this node relays to (api.router dials loopback), so there it listens on loopback only."""
    if solo and serve_host in ("0.0.0.0", "", "::"):
        return "::1" if serve_host == "::" else "127.0.0.1"
    return serve_host


def _spawn(
    log: Path | None, secret: bytes | None, warm: tuple[str, ...] = (), cache: Path | None = None
) -> subprocess.Popen[bytes]:
    """A runner process that imports everything (torch: seconds of a move or a restart), then
    waits for its spec on stdin: the worker keeps one ready, so a new runner starts at once.
    While it waits it builds the tokenizer caches of `warm` (GGUF files) in `cache`: a node
    that becomes rank 0 for the first time after a move would spend 10-20 s on that."""
    args = [f"--warm-tokenizer={path}" for path in warm]
    args += [f"--tokenizer-cache={cache}"] if cache is not None and warm else []
    stderr = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        stderr = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "shoal.runner", "--spec-stdin", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=runner_env(os.environ, secret),  # the secret in the env: argv is public (ps)
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    finally:
        if stderr is not None:
            stderr.close()  # the child holds its own copy


@dataclass
class _Spare:
    proc: subprocess.Popen[bytes]
    log: Path | None

    def take(self, runner_id: str, spec: RunnerSpec) -> subprocess.Popen[bytes] | None:
        """The process, given its spec (None if it died meanwhile); its log renamed for it."""
        if self.proc.poll() is not None or self.proc.stdin is None:
            return None
        try:
            self.proc.stdin.write(spec.model_dump_json().encode() + b"\n")
            self.proc.stdin.close()
        except OSError:  # it died between the check and the write
            return None
        if self.log is not None and not (named := self.log.with_name(f"{runner_id}.log")).exists():
            self.log.rename(named)  # the child's open file follows the rename
        return self.proc

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: it exits once its imports are done
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Runner:
    """One runner subprocess and the newest status it reported."""

    def __init__(
        self,
        spec: RunnerSpec,
        runner_id: str,
        log_dir: Path | None,
        secret: bytes | None = None,
        spare: _Spare | None = None,
    ) -> None:
        self.spec = spec
        self.state = RunnerState(
            runner_id=runner_id,
            instance_id=spec.instance_id,
            model_id=spec.model_id,
            rank=spec.rank,
            status="idle",
            since=time.time(),
        )
        self._lock = threading.Lock()
        self._last_count = (time.monotonic(), 0)
        proc = spare.take(runner_id, spec) if spare is not None else None
        if proc is None:  # no spare (or it died): a process of its own, given its spec alike
            proc = _spawn(log_dir / f"{runner_id}.log" if log_dir is not None else None, secret)
            if _Spare(proc, None).take(runner_id, spec) is None:
                log.warning("runner %s exited before it got its spec", runner_id)
        self.proc = proc
        self._update(pid=self.proc.pid)
        threading.Thread(target=self._read, name=f"runner-{runner_id}", daemon=True).start()

    def _update(self, **changes: object) -> None:
        with self._lock:
            if "status" in changes and changes["status"] != self.state.status:
                changes["since"] = time.time()
            self.state = self.state.model_copy(update=changes)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = StatusLine.model_validate_json(raw)
            except ValueError:
                log.debug("runner %s: %s", self.state.runner_id, raw.decode(errors="replace"))
                continue
            changes: dict[str, object] = {"status": line.status, "reason": line.reason}
            if line.port is not None:
                changes["port"] = line.port
            if line.context_length is not None:
                changes["context_length"] = line.context_length
            if line.tokens is not None:
                changes.update(self._rate(line.tokens))
            if line.layers is not None or line.status != "loading":
                changes["layers"] = line.layers
            self._update(**changes)
            if line.layers is not None and line.layers[0] not in (0, line.layers[1]):
                continue  # progress within loading: in the state, not one log line per layer
            log.info(
                "runner %s: %s%s",
                self.state.runner_id,
                line.status,
                f" ({line.reason})" if line.reason else "",
            )
        code = self.proc.wait()
        if self.state.status not in ENDED:  # died without saying why
            reason = f"the runner process exited with code {code}"
            if code < 0:
                reason = f"the runner process was killed by {signal.Signals(-code).name}"
            self._update(status="failed", reason=reason)

    def _rate(self, tokens: int) -> dict[str, object]:
        """tok/s between two token counts taken while generating."""
        now, (then, before) = time.monotonic(), self._last_count
        self._last_count = (now, tokens)
        if tokens <= before or now - then > 3 * TOKENS_EVERY_S:  # idle in between: no rate,
            return {"tokens": tokens, "tok_s": None}  # nor the last one (placement.throughput)
        return {"tokens": tokens, "tok_s": round((tokens - before) / (now - then), 2)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("runner %s ignored SIGTERM; killing it", self.state.runner_id)
                self.proc.kill()
                self.proc.wait(timeout=5)


class Worker:
    def __init__(
        self,
        node_id: str,
        models: dict[str, LocalModel],
        settings: WorkerSettings,
        solo: tuple[InstanceSpec, ...] = (),
    ) -> None:
        self.node_id = node_id
        self.models = models
        self.settings = settings
        self.solo = solo  # the models this node serves alone, as 1-rank instances
        self._runners: dict[str, _Runner] = {}
        self._missing: dict[str, RunnerState] = {}  # runners we cannot start, and why
        self._lock = threading.Lock()
        self._spare: _Spare | None = None
        self._spares = 0  # spares started (their log files' numbers)
        self._clustered = settings.spare  # whether to keep a spare

    def states(self) -> tuple[RunnerState, ...]:
        with self._lock:
            states = [r.state for r in self._runners.values()] + list(self._missing.values())
        return tuple(sorted(states, key=lambda s: s.runner_id))

    def reconcile(self, plan: ClusterPlan) -> None:
        """Start what the plan wants here, stop what it no longer wants (stops run in threads)."""
        wanted = desired_runners(plan, self.node_id, self.solo)
        with self._lock:
            gone = [self._runners.pop(rid) for rid in list(self._runners) if rid not in wanted]
            for rid in [r for r in self._missing if r not in wanted]:
                del self._missing[rid]
            for rid, (instance, rank) in wanted.items():
                if rid not in self._runners and rid not in self._missing:
                    self._start(rid, instance, rank)
            if any(len(instance.nodes) > 1 for instance, _ in wanted.values()):
                self._clustered = True
            self._keep_spare()
        for runner in gone:
            log.info("stopping runner %s: its instance left the plan", runner.state.runner_id)
            threading.Thread(target=runner.stop, name="runner-stop", daemon=True).start()

    def _start(self, rid: str, instance: InstanceSpec, rank: int) -> None:
        local = self.models.get(instance.model_id)
        if local is None:
            self._missing[rid] = RunnerState(
                runner_id=rid,
                instance_id=instance.instance_id,
                model_id=instance.model_id,
                rank=rank,
                status="failed",
                since=time.time(),
                reason=f"this node does not hold {instance.model_id}",
            )
            return
        s = self.settings
        spec = RunnerSpec(
            instance_id=instance.instance_id,
            model_id=instance.model_id,
            model_path=str(local.path),
            sharding=instance.sharding,  # type: ignore[arg-type]
            backend=instance.backend,  # type: ignore[arg-type]
            engine=instance.engine,  # type: ignore[arg-type]
            rank=rank,
            world_size=len(instance.nodes),
            layer_range=instance.layer_ranges[rank],
            store_host=instance.store_address,
            store_port=instance.store_port,
            ifname=instance.rank_interfaces[rank] if rank < len(instance.rank_interfaces) else None,
            rank_hosts=instance.rank_addresses,
            rdma_devices=instance.rdma_devices,
            device=s.device,
            quantize=s.quantize,  # type: ignore[arg-type]
            max_batch=s.max_batch,
            max_seq_len=s.max_seq_len,
            serve_host=endpoint_host(s.serve_host, any(i == instance for i in self.solo)),
            max_body_bytes=s.max_body_bytes,
            max_tokens_cap=s.max_tokens_cap,
            tokenizer_cache=str(s.tokenizer_cache) if s.tokenizer_cache else None,
            cache_dir=str(s.cache_dir) if s.cache_dir else None,
        )
        spare, self._spare = self._spare, None
        log.info(
            "starting runner %s%s: rank %d/%d of %s, layers %s, store %s:%d via %s",
            rid,
            " (the spare)" if spare is not None else "",
            rank,
            spec.world_size,
            instance.model_id,
            spec.layer_range,
            spec.store_host,
            spec.store_port,
            spec.ifname or "any interface",
        )
        self._runners[rid] = _Runner(spec, rid, s.log_dir, s.secret, spare)

    def _keep_spare(self) -> None:
        """Start the next spare once no runner here is starting (its imports would slow their
        load on a busy host); the one we hold, if it died, is replaced."""
        if self._spare is not None and self._spare.proc.poll() is not None:
            self._spare = None
        if not self._clustered or self._spare is not None:
            return
        if any(r.state.status in STARTING for r in self._runners.values()):
            return
        self._spares += 1
        d = self.settings.log_dir
        log = d / f"spare-{os.getpid()}-{self._spares}.log" if d is not None else None
        ggufs = tuple(str(m.path) for m in self.models.values() if m.path.suffix == ".gguf")
        cache = self.settings.tokenizer_cache
        self._spare = _Spare(_spawn(log, self.settings.secret, ggufs, cache), log)

    def stop_all(self) -> None:
        with self._lock:
            runners = list(self._runners.values())
            self._runners.clear()
            spare, self._spare = self._spare, None
            self._clustered = False  # and no new one
        if spare is not None:
            spare.close()
        threads = [threading.Thread(target=r.stop, daemon=True) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=STOP_GRACE_S + 6)
