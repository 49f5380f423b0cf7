"""The lockstep step protocol: every rank of an instance runs the same batch, step by step.

Rank 0 owns the scheduler (engine/generator.py) and drives it through an executor from here;
the other ranks run a follower loop. Each step carries a small fixed-size int64 header (the
op, the batch layout and positions, the sequence ids, the sampling parameters of an admitted
sequence, and the KV slot moves the scheduler made since the last step), so every rank applies
the same cache moves and runs the same rows. Their encoding is engine/wire.py.

Pipeline: rank r holds stage r. The header and the activations travel rank to rank in ONE
message when they fit the fixed buffer (every decode step does; a gloo send costs a full round
trip, so a second message per hop would double the cost), a long prefill's activations follow
in a second one. The last rank samples, with each sequence's parameters and seeded RNG, and
its token ids go straight back to rank 0.

Tensor parallel: rank 0 broadcasts the header (a decode step's token ids ride in it; a
prefill's prompt follows in a second broadcast), every rank runs its slices with all-reduces
inside the blocks, and rank 0, the only one holding the LM head, samples.

Logprobs: the rank that samples computes them for the sequences whose parameters ask (a
prefill header carries `logprobs`); in a pipeline they follow the token ids to rank 0 in one
more message, sent only in steps where some sequence asks, so other steps cost nothing more.

While nothing runs, rank 0 sends a no-op header every `heartbeat_s`, so a follower's receive
timeout (the step timeout) only fires when rank 0 is really gone. A failed send, receive or
collective breaks the instance for good: the step raises PeerLostError, the scheduler ends its
requests with finish_reason "error", every later step raises at once, and `failure` says why.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from shoal.engine.config import ModelConfig
from shoal.engine.distributed import PeerLostError, Peers
from shoal.engine.generator import SamplerBank
from shoal.engine.model import Step, Transformer
from shoal.engine.sampling import SamplingParams, TokenLogprob
from shoal.engine.sharding import attach_reduce
from shoal.engine.wire import (
    LOGPROB_ROW,
    HeaderCodec,
    Move,
    Op,
    StepHeader,
    Wire,
    activation_shape,
    pack_logprobs,
    unpack_logprobs,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class Leading:
    """Rank 0's life with the other ranks, whatever engine runs its model (the torch
    executors below, engine_mlx.lockstep's): the heartbeat, the stop message and the sticky
    failure. Subclasses send the headers (`_send`)."""

    def __init__(self, max_batch: int, heartbeat_s: float) -> None:
        self.idle_every = heartbeat_s
        self.codec = HeaderCodec(max_batch)
        self.failure: str | None = None

    def idle(self) -> None:
        self._run(lambda: self._send(StepHeader(Op.NOOP)))

    def close(self) -> None:
        """Tell the other ranks to stop (best effort: a broken instance has no one to tell)."""
        if self.failure is None:
            try:
                self._run(lambda: self._send(StepHeader(Op.STOP)))
            except PeerLostError as exc:
                log.warning("could not tell the other ranks to stop: %s", exc)
            self.failure = "the instance is stopped"

    def _run(self, step: Callable[[], T]) -> T:
        """Run one exchange with the other ranks; any error breaks the instance for good."""
        if self.failure is not None:
            raise PeerLostError(self.failure)
        try:
            self._before_step()
            return step()
        except Exception as exc:  # the ranks may now disagree on the step: never go on
            self.failure = str(exc) if isinstance(exc, PeerLostError) else repr(exc)
            raise

    def _before_step(self) -> None:
        """Subclasses: what must reach the other ranks before any step."""

    def _send(self, header: StepHeader, h: torch.Tensor | None = None) -> None:
        raise NotImplementedError


class _Rank0(Leading):
    """What the torch engine's rank-0 executors share: the model and its cache, and the KV
    moves queued for the next header."""

    def __init__(
        self,
        model: Transformer,
        peers: Peers,
        config: ModelConfig,
        max_batch: int,
        max_seq_len: int,
        heartbeat_s: float,
    ) -> None:
        super().__init__(max_batch, heartbeat_s)
        self.model, self.peers, self.config = model, peers, config
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.device = model.device
        self.keep_logits = False  # tests and tools: fetch each step's logits to last_logits
        self.last_logits: torch.Tensor | None = None
        self._moves: list[Move] = []
        model.setup_cache(max_batch, max_seq_len)
        self._prepare()

    def _prepare(self) -> None:
        """Subclasses: allocate the buffers of their protocol."""

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.model.cache.move_slot(src, dst, length)
        if src != dst and length > 0:
            self._moves.append((src, dst, length))

    def _before_step(self) -> None:
        while len(self._moves) > self.codec.max_moves:  # rare: flush what does not fit
            self._send(StepHeader(Op.NOOP))

    def _take_moves(self) -> tuple[Move, ...]:
        taken = self._moves[: self.codec.max_moves]
        del self._moves[: self.codec.max_moves]
        return tuple(taken)


class PipelineExecutor(_Rank0):
    """Rank 0 of a pipeline: the first stage, the scheduler's executor."""

    def _prepare(self) -> None:
        config, peers, model = self.config, self.peers, self.model
        dtype = model.dtype
        self.wire = Wire(self.codec, config.hidden_size, dtype, peers.device)
        self.reply = torch.zeros(self.max_batch, dtype=torch.int64, device=peers.device)
        self.last_rank = peers.world_size - 1
        self.asking: set[int] = set()  # sequences whose logprobs the last rank sends
        self.logprobs: dict[int, TokenLogprob] = {}

    def step_logprobs(self) -> dict[int, TokenLogprob]:
        return self.logprobs

    def prefill(self, seq_id: int, slot: int, prompt: list[int], params: SamplingParams) -> int:
        if params.logprobs is not None:
            self.asking.add(seq_id)

        def step() -> list[int]:
            tokens = torch.tensor([prompt], device=self.device)
            h = self.model(tokens, Step.prefill(slot, 0, len(prompt), self.device))
            header = StepHeader(Op.PREFILL, len(prompt), slot, 0, (seq_id,), params=params)
            return self._exchange(header, h)

        return self._run(step)[0]

    def decode(self, ids: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        self.asking &= set(ids)

        def step() -> list[int]:
            rows = torch.tensor([[t] for t in tokens], device=self.device)
            h = self.model(rows, Step.decode(positions, self.device))
            header = StepHeader(Op.DECODE, len(ids), ids=tuple(ids), positions=tuple(positions))
            return self._exchange(header, h)

        return self._run(step)

    def _exchange(self, header: StepHeader, h: torch.Tensor) -> list[int]:
        self._send(dataclasses.replace(header, want_logits=self.keep_logits), h)
        self.peers.recv(self.reply, self.last_rank)
        n = 1 if header.op == Op.PREFILL else header.rows
        chosen = self.reply[:n].tolist()
        asking = [row for row, i in enumerate(header.ids) if i in self.asking]
        self.logprobs = {}
        if asking:
            packed = torch.empty(
                len(asking), LOGPROB_ROW, dtype=torch.float64, device=self.peers.device
            )
            self.peers.recv(packed, self.last_rank)
            found = unpack_logprobs(packed, [chosen[row] for row in asking])
            self.logprobs = {header.ids[row]: lp for row, lp in zip(asking, found, strict=True)}
        if self.keep_logits:
            logits = torch.empty(n, self.config.vocab_size, device=self.peers.device)
            self.peers.recv(logits, self.last_rank)
            self.last_logits = logits.cpu()
        return chosen

    def _send(self, header: StepHeader, h: torch.Tensor | None = None) -> None:
        header = dataclasses.replace(header, moves=self._take_moves(), inline=self.wire.fits(h))
        self.wire.put(header, h)
        self.peers.send(self.wire.buf, 1)
        if h is not None and not header.inline:
            self.peers.send(h.to(self.peers.device).contiguous(), 1)


class TensorExecutor(_Rank0):
    """Rank 0 of a tensor-parallel instance: broadcasts each step, runs its slices, samples."""

    def _prepare(self) -> None:
        model, peers = self.model, self.peers
        attach_reduce(model, peers.all_reduce)
        self.head = torch.zeros(self.codec.size, dtype=torch.int64, device=peers.device)
        self.sampler = SamplerBank()

    def prefill(self, seq_id: int, slot: int, prompt: list[int], params: SamplingParams) -> int:
        def step() -> list[int]:
            self._send(StepHeader(Op.PREFILL, len(prompt), slot, 0, (seq_id,)))
            tokens = torch.tensor(prompt, device=self.peers.device)
            self.peers.broadcast(tokens, 0)
            step = Step.prefill(slot, 0, len(prompt), self.device)
            logits = self.model(tokens[None].to(self.device), step)
            self.sampler.admit(seq_id, params)
            return self._sample([seq_id], logits)

        return self._run(step)[0]

    def decode(self, ids: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        def step() -> list[int]:
            self._send(
                StepHeader(
                    Op.DECODE,
                    len(ids),
                    ids=tuple(ids),
                    positions=tuple(positions),
                    tokens=tuple(tokens),
                )
            )
            rows = torch.tensor([[t] for t in tokens], device=self.device)
            logits = self.model(rows, Step.decode(positions, self.device))
            self.sampler.retain(ids)
            return self._sample(ids, logits)

        return self._run(step)

    def _sample(self, ids: list[int], logits: torch.Tensor) -> list[int]:
        if self.keep_logits:
            self.last_logits = logits.float().cpu()
        return self.sampler.sample(ids, logits)

    def step_logprobs(self) -> dict[int, TokenLogprob]:
        return self.sampler.logprobs

    def _send(self, header: StepHeader, h: torch.Tensor | None = None) -> None:
        header = dataclasses.replace(header, moves=self._take_moves())
        self.head.copy_(torch.tensor(self.codec.pack(header), dtype=torch.int64))
        self.peers.broadcast(self.head, 0)


class Follower:
    """Ranks 1..n-1: receive each step, apply its KV moves, run it, pass it on.

    `run` returns when rank 0 says stop, and raises PeerLostError when a peer goes away.
    After `request_stop` it keeps following for up to stop_grace_s, so that when every rank
    is told to stop at once rank 0 still finds this one to say stop to; then it returns
    anyway (checked after each message: rank 0's heartbeat comes every heartbeat_s).
    """

    def __init__(
        self,
        model: Transformer,
        peers: Peers,
        config: ModelConfig,
        sharding: str,
        max_batch: int,
        max_seq_len: int,
        stop_grace_s: float = 3.0,
    ) -> None:
        self.model, self.peers, self.config, self.sharding = model, peers, config, sharding
        self.device = model.device
        self.codec = HeaderCodec(max_batch)
        self.stop_grace_s = stop_grace_s
        self.stop_by: float | None = None
        self.steps = 0
        model.setup_cache(max_batch, max_seq_len)
        rank, world = peers.rank, peers.world_size
        self.is_last = rank == world - 1
        if sharding == "tensor":
            attach_reduce(model, peers.all_reduce)
            self.head = torch.zeros(self.codec.size, dtype=torch.int64, device=peers.device)
        else:
            dtype = model.dtype
            self.wire = Wire(self.codec, config.hidden_size, dtype, peers.device)
            self.sampler = SamplerBank()
            self.reply = torch.zeros(max_batch, dtype=torch.int64, device=peers.device)

    def request_stop(self) -> None:
        if self.stop_by is None:
            self.stop_by = time.monotonic() + self.stop_grace_s

    def run(self, on_step: Callable[[], None] | None = None) -> None:
        """Follow rank 0's steps; on_step is called after each model step run here."""
        receive = self._tensor_step if self.sharding == "tensor" else self._pipeline_step
        while True:
            op = receive()
            if op == Op.STOP or (self.stop_by is not None and time.monotonic() > self.stop_by):
                return
            if op in (Op.PREFILL, Op.DECODE):
                self.steps += 1
                if on_step is not None:
                    on_step()

    def _apply_moves(self, header: StepHeader) -> None:
        for src, dst, length in header.moves:
            self.model.cache.move_slot(src, dst, length)

    def _tensor_step(self) -> Op:
        self.peers.broadcast(self.head, 0)
        header = self.codec.unpack(self.head.tolist())
        self._apply_moves(header)
        if header.op == Op.PREFILL:
            tokens = torch.empty(header.rows, dtype=torch.int64, device=self.peers.device)
            self.peers.broadcast(tokens, 0)
            self.model(tokens[None].to(self.device), header.step(self.device))
        elif header.op == Op.DECODE:
            rows = torch.tensor(header.tokens, device=self.device)[:, None]
            self.model(rows, header.step(self.device))
        return header.op

    def _pipeline_step(self) -> Op:
        rank, wire = self.peers.rank, self.wire
        self.peers.recv(wire.buf, rank - 1)
        header = wire.header()
        self._apply_moves(header)
        if header.op in (Op.NOOP, Op.STOP):
            if not self.is_last:
                self.peers.send(wire.buf, rank + 1)
            return header.op
        shape = activation_shape(header, self.config.hidden_size)
        if header.inline:
            x = wire.acts[: shape[0] * shape[1] * shape[2]].view(shape)
        else:
            x = torch.empty(shape, dtype=wire.acts.dtype, device=self.peers.device)
            self.peers.recv(x, rank - 1)
        out = self.model(x.to(self.device), header.step(self.device))
        if not self.is_last:
            if header.inline:
                wire.acts[: out.numel()].copy_(out.reshape(-1))
            self.peers.send(wire.buf, rank + 1)
            if not header.inline:
                self.peers.send(out.to(self.peers.device).contiguous(), rank + 1)
            return header.op
        ids = list(header.ids)
        if header.op == Op.PREFILL:
            assert header.params is not None, "a prefill header carries the sampling parameters"
            self.sampler.admit(ids[0], header.params)
        else:
            self.sampler.retain(ids)
        chosen = self.sampler.sample(ids, out)
        self.reply[: len(chosen)] = torch.tensor(chosen)
        self.peers.send(self.reply, 0)
        if self.sampler.logprobs:  # rank 0 knows which rows ask: the same ids, in order
            found = [self.sampler.logprobs[i] for i in ids if i in self.sampler.logprobs]
            self.peers.send(pack_logprobs(found).to(self.peers.device), 0)
        if header.want_logits:
            self.peers.send(out.float().to(self.peers.device).contiguous(), 0)
        return header.op
