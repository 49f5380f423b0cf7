"""Lockstep for MLX instances: rank 0 schedules, every rank runs the same steps.

mlx-lm's sharded models put their collectives inside the forward pass (a pipeline stage
receives from the stage before it and every rank gathers the last hidden state; a tensor
shard all-sums inside each block), so every rank must call the model with the same rows in the
same order. Before each step rank 0 broadcasts the step header of engine.lockstep (the op, the
sequence ids, a decode's tokens; a prefill's prompt follows in a second broadcast) over the
instance's gloo group, then all ranks run the step on their own MlxExecutor, whose batch cache
therefore moves alike everywhere. Only rank 0 samples: its tokens come back to every rank in
the next decode header.

The gloo group brings the heartbeat and the step timeout of the torch instances (a follower
whose rank 0 is gone stops waiting), and a peer lost inside the model's own collectives is an
mx error: either breaks the instance for good, as on torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from shoal.engine.distributed import PeerLostError, Peers
from shoal.engine.lockstep import Leading
from shoal.engine.sampling import SamplingParams, TokenLogprob
from shoal.engine.wire import HeaderCodec, Op, StepHeader
from shoal.engine_mlx.executor import MlxExecutor

T = TypeVar("T")
FOLLOWER = SamplingParams(max_tokens=1, temperature=0)  # followers never sample


def drop_head(model: Any) -> None:
    """A follower's logits are thrown away (only rank 0 samples): make its LM head a no-op, so
    it skips the vocabulary-wide matmul every step. The last stage's all_gather (pipeline) or
    the shards' last all_sum (tensor) still runs: the final norm reads its output."""
    import mlx.nn as nn

    if isinstance(getattr(model, "lm_head", None), nn.Module):
        model.lm_head = nn.Identity()
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None and hasattr(embed, "as_linear"):  # tied embeddings: the head
        object.__setattr__(embed, "as_linear", lambda x: x)


def _lost(exc: Exception) -> PeerLostError:
    if isinstance(exc, PeerLostError):
        return exc
    return PeerLostError(f"the MLX group failed: {str(exc).strip() or type(exc).__name__}")


class MlxLockstep(Leading):
    """Rank 0's executor: tells the others each step, then runs it on its own shard."""

    def __init__(self, local: MlxExecutor, peers: Peers, heartbeat_s: float) -> None:
        super().__init__(local.max_batch, heartbeat_s)
        self.local, self.peers, self.config = local, peers, local.config
        self.max_batch, self.max_seq_len = local.max_batch, local.max_seq_len
        self.device = local.device
        self.head = torch.zeros(self.codec.size, dtype=torch.int64)

    def prefill(self, seq_id: int, slot: int, prompt: list[int], params: SamplingParams) -> int:
        def step() -> int:
            self._send(StepHeader(Op.PREFILL, len(prompt), slot, 0, (seq_id,)))
            self.peers.broadcast(torch.tensor(prompt, dtype=torch.int64), 0)
            return self.local.prefill(seq_id, slot, prompt, params)

        return self._run(step)

    def decode(self, ids: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        def step() -> list[int]:
            header = StepHeader(
                Op.DECODE, len(ids), ids=tuple(ids), positions=tuple(positions),
                tokens=tuple(tokens),
            )  # fmt: skip
            self._send(header)
            return self.local.decode(ids, tokens, positions)

        return self._run(step)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        pass  # rows follow the ids each decode header names, on every rank

    def step_logprobs(self) -> dict[int, TokenLogprob]:
        return self.local.step_logprobs()  # rank 0 samples

    def close(self) -> None:
        super().close()
        self.local.close()

    def _send(self, header: StepHeader, h: torch.Tensor | None = None) -> None:
        self.head.copy_(torch.tensor(self.codec.pack(header), dtype=torch.int64))
        self.peers.broadcast(self.head, 0)

    def _run(self, step: Callable[[], T]) -> T:
        """As Leading's, with an mx error (a peer lost inside the model's collectives) told
        as a lost peer."""

        def told() -> T:
            try:
                return step()
            except PeerLostError:
                raise
            except Exception as exc:
                raise _lost(exc) from exc

        return super()._run(told)


class MlxFollower:
    """Ranks 1..n-1: run each step rank 0 broadcasts, until it says stop.

    After `request_stop` it keeps following for up to stop_grace_s (rank 0 may still want to
    say stop), checked after each header: rank 0's heartbeat comes every heartbeat_s."""

    def __init__(self, local: MlxExecutor, peers: Peers, stop_grace_s: float = 3.0) -> None:
        self.local, self.peers = local, peers
        self.codec = HeaderCodec(local.max_batch)
        self.head = torch.zeros(self.codec.size, dtype=torch.int64)
        self.stop_grace_s = stop_grace_s
        self.stop_by: float | None = None
        self.steps = 0

    def request_stop(self) -> None:
        if self.stop_by is None:
            self.stop_by = time.monotonic() + self.stop_grace_s

    def run(self, on_step: Callable[[], None] | None = None) -> None:
        """Follow rank 0's steps; on_step is called after each model step run here."""
        try:
            while True:
                op = self._step()
                if op == Op.STOP or (self.stop_by is not None and time.monotonic() > self.stop_by):
                    return
                if op in (Op.PREFILL, Op.DECODE):
                    self.steps += 1
                    if on_step is not None:
                        on_step()
        except Exception as exc:
            raise _lost(exc) from exc
        finally:
            self.local.close()

    def _step(self) -> Op:
        self.peers.broadcast(self.head, 0)
        header = self.codec.unpack(self.head.tolist())
        if header.op == Op.PREFILL:
            prompt = torch.empty(header.rows, dtype=torch.int64)
            self.peers.broadcast(prompt, 0)
            self.local.prefill(header.ids[0], header.slot, prompt.tolist(), FOLLOWER)
        elif header.op == Op.DECODE:
            self.local.decode(list(header.ids), list(header.tokens), list(header.positions))
        return header.op
