"""Continuous batching on one model: a scheduler thread admits requests into free KV slots,
prefills them, and decodes every running sequence together, one token per step.

Requests join and leave between steps; the active sequences always sit in slots [0, n) so a
decode step is a single batched forward over a contiguous view of the cache.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shoal.engine.config import ModelConfig
from shoal.engine.model import Step, Transformer
from shoal.engine.sampling import (
    SamplingParams,
    TokenLogprob,
    logprobs_of,
    make_generator,
    sample_batch,
)
from shoal.engine.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """A piece of a sequence's output; the last one has a finish_reason."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of this event's tokens, when the request asked
    stop_sequence: str | None = None  # the stop string that ended it (finish_reason "stop")


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    decoder: IncrementalDecoder
    stopper: StopMatcher
    id: int = 0
    slot: int = -1
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent in an event

    @property
    def length(self) -> int:
        """Tokens whose K/V are (or are about to be) in the cache."""
        return len(self.prompt) + len(self.output)

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        taken, self.logprobs = tuple(self.logprobs), []
        return taken


SHUTTING_DOWN = "the server is shutting down"  # finish_reason "aborted": safe to retry


class ContextLengthError(ValueError):
    pass


class Executor(Protocol):
    """Runs the model steps the scheduler decides, and samples their tokens.

    LocalExecutor runs the whole model in this process; engine/lockstep.py has executors that
    drive the same steps on several ranks. An executor is built for a fixed batch and context
    size (its KV caches, on every rank, are allocated once). Its methods are called from the
    scheduler thread only.
    """

    config: ModelConfig
    device: torch.device  # where this rank's model runs
    max_batch: int
    max_seq_len: int
    idle_every: float | None  # call idle() this often while nothing runs (None: never)
    failure: str | None  # why this executor can no longer step (None while it can)

    def prefill(self, seq_id: int, slot: int, prompt: list[int], params: SamplingParams) -> int:
        """Admit a sequence into KV slot `slot`: its prompt's K/V, then its first token."""
        ...

    def decode(self, ids: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        """One token for each running sequence; rows are slots 0..n-1 in order. Sequences
        that are not in `ids` have finished, and their sampling state may go."""
        ...

    def move_slot(self, src: int, dst: int, length: int) -> None: ...

    def step_logprobs(self) -> dict[int, TokenLogprob]:
        """The last step's logprobs, by sequence id, of the sequences that ask for them."""
        ...

    def idle(self) -> None: ...

    def close(self) -> None:
        """After the scheduler thread has ended: release the other ranks."""
        ...


class SamplerBank:
    """Each running sequence's sampling parameters and private RNG, by sequence id."""

    def __init__(self) -> None:
        self.params: dict[int, SamplingParams] = {}
        self.rngs: dict[int, torch.Generator | None] = {}
        self.seen: dict[int, Counter[int]] = {}  # generated tokens, for the penalties
        self.logprobs: dict[int, TokenLogprob] = {}  # the last sample()'s, for those asking

    def admit(self, seq_id: int, params: SamplingParams) -> None:
        self.params[seq_id] = params
        self.rngs[seq_id] = make_generator(params)
        self.seen[seq_id] = Counter()

    def retain(self, ids: list[int]) -> None:
        if len(self.params) != len(ids):
            keep = set(ids)
            for gone in [i for i in self.params if i not in keep]:
                del self.params[gone], self.rngs[gone], self.seen[gone]

    def sample(self, ids: list[int], logits: torch.Tensor) -> list[int]:
        params = [self.params[i] for i in ids]
        seen = [self.seen[i] for i in ids]
        chosen = sample_batch(logits, params, [self.rngs[i] for i in ids], seen)
        for counts, p, token in zip(seen, params, chosen, strict=True):
            if p.penalized:
                counts[token] += 1
        asking = [row for row, p in enumerate(params) if p.logprobs is not None]
        self.logprobs = {}
        if asking:
            found = logprobs_of(
                logits[asking],
                [chosen[row] for row in asking],
                [params[row].logprobs or 0 for row in asking],
            )
            self.logprobs = {ids[row]: lp for row, lp in zip(asking, found, strict=True)}
        return chosen


class LocalExecutor:
    """The whole model in this process, sampling beside it."""

    idle_every = None
    failure = None

    def __init__(self, model: Transformer, max_batch: int, max_seq_len: int) -> None:
        self.model = model
        self.config = model.config
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.device = model.device
        self.sampler = SamplerBank()
        self.keep_logits = False  # tests and tools: keep each step's logits in last_logits
        self.last_logits: torch.Tensor | None = None
        model.setup_cache(max_batch, max_seq_len)

    def prefill(self, seq_id: int, slot: int, prompt: list[int], params: SamplingParams) -> int:
        self.sampler.admit(seq_id, params)
        tokens = torch.tensor([prompt], device=self.device)
        logits = self.model(tokens, Step.prefill(slot, 0, len(prompt), self.device))
        return self._sample([seq_id], logits)[0]

    def decode(self, ids: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        self.sampler.retain(ids)
        rows = torch.tensor([[t] for t in tokens], device=self.device)
        return self._sample(ids, self.model(rows, Step.decode(positions, self.device)))

    def _sample(self, ids: list[int], logits: torch.Tensor) -> list[int]:
        if self.keep_logits:
            self.last_logits = logits.float().cpu()
        return self.sampler.sample(ids, logits)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.model.cache.move_slot(src, dst, length)

    def step_logprobs(self) -> dict[int, TokenLogprob]:
        return self.sampler.logprobs

    def idle(self) -> None:
        pass

    def close(self) -> None:
        pass


def context_length(config: ModelConfig, requested: int | None) -> int:
    """The context window a generator (and every rank's KV cache) is built for."""
    return min(requested or config.max_position_embeddings, config.max_position_embeddings)


class Generator:
    """Owns the scheduler thread; the executor owns the model and its KV cache.

    `model` is a Transformer (run here, through a LocalExecutor) or an Executor, whose batch
    and context sizes then win.
    """

    def __init__(
        self,
        model: Transformer | Executor,
        tokenizer: Tokenizer,
        max_batch: int = 4,
        max_seq_len: int | None = None,
    ) -> None:
        if isinstance(model, Transformer):
            model = LocalExecutor(model, max_batch, context_length(model.config, max_seq_len))
        self.executor: Executor = model
        self.tokenizer = tokenizer
        self.max_batch = model.max_batch
        self.max_seq_len = model.max_seq_len
        self.device = model.device
        self.eos_ids = frozenset(tokenizer.eos_ids) | frozenset(model.config.eos_token_ids)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="shoal-generator", daemon=True)
        self._running, self._ended = threading.Event(), threading.Event()
        self.stats = {"steps": 0, "max_batch_seen": 0, "batched_steps": 0, "tokens": 0}

    # -- public API (any thread) ------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduler on a thread of its own (in-process use: tests, tools)."""
        self._thread.start()

    def run(self) -> None:
        """Run the scheduler on the calling thread until stop() (the runner's way).

        Call it from the thread that loaded the model: OpenMP keeps one thread team per
        calling thread, and once one thread has used it, torch ops on another ran a decode
        step ~40% slower here (45 vs 72 tok/s, SmolLM2 int4, 2 threads).
        """
        self._loop()

    def stop(self) -> bool:
        """End the scheduler; False if it is still inside a step after 10 s."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        return not self._running.is_set() or self._ended.wait(timeout=10)

    @property
    def in_flight(self) -> int:
        """Requests queued or decoding."""
        return len(self._active) + len(self._waiting)

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ContextLengthError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this model's context window is "
                f"{self.max_seq_len} tokens, so at most {self.max_seq_len - 1} fit with room "
                "for one generated token"
            )

    def submit(
        self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None]
    ) -> Sequence:
        """Queue a request; on_event is called from the scheduler thread."""
        self.check_prompt(prompt)
        seq = Sequence(
            prompt=list(prompt),
            params=params,
            on_event=on_event,
            decoder=IncrementalDecoder(self.tokenizer),
            stopper=StopMatcher(params.stop),
            id=next(self._ids),
        )
        with self._wake:
            if self._stopping:
                raise RuntimeError("the generator is shutting down")
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # the scheduler frees its slot before the next step
        with self._wake:
            self._wake.notify()

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Async iterator of events; leaving the loop early cancels the sequence."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        seq = self.submit(prompt, params, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if seq.finish_reason is None:
                self.cancel(seq)

    # -- scheduler thread -------------------------------------------------------------------

    def _loop(self) -> None:
        self._running.set()
        try:
            self._schedule()
        finally:
            self._ended.set()

    def _schedule(self) -> None:
        torch.set_grad_enabled(False)
        idle_every = self.executor.idle_every
        while True:
            with self._wake:
                if not (self._stopping or self._waiting or self._active):
                    self._wake.wait(idle_every)
                if self._stopping:
                    break
                busy = bool(self._waiting or self._active)
            try:
                if busy:
                    self._step()
                elif self.executor.failure is None:  # a heartbeat for the other ranks
                    self.executor.idle()
            except Exception as exc:  # a failed step ends its requests, never the server
                log.exception("generation step failed")
                for seq in self._active + list(self._waiting):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                self._active.clear()
                self._waiting.clear()
        for seq in self._active + list(self._waiting):
            self._finish(seq, "aborted", error=SHUTTING_DOWN)

    def _step(self) -> None:
        self._drop_cancelled()
        while len(self._active) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            self._prefill(seq)
        self._drop_cancelled()
        if not self._active:
            return
        batch = self._active
        chosen = self.executor.decode(
            [s.id for s in batch], [s.output[-1] for s in batch], [s.length - 1 for s in batch]
        )
        self._accept(batch, chosen)
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        self.stats["batched_steps"] += len(batch) > 1  # steps that served several requests

    def _prefill(self, seq: Sequence) -> None:
        seq.slot = len(self._active)
        self._active.append(seq)
        self._accept([seq], [self.executor.prefill(seq.id, seq.slot, seq.prompt, seq.params)])

    def _accept(self, batch: list[Sequence], chosen: list[int]) -> None:
        logprobs = self.executor.step_logprobs()
        for seq, token in zip(batch, chosen, strict=True):
            if seq.id in logprobs:
                seq.logprobs.append(logprobs[seq.id])
            self._advance(seq, token)
        self._active = [s for s in self._active if s.finish_reason is None]
        self._compact()

    def _advance(self, seq: Sequence, token: int) -> None:
        seq.output.append(token)
        self.stats["tokens"] += 1
        if token in self.eos_ids and not seq.params.ignore_eos:
            seq.logprobs = seq.logprobs[:-1]  # the end-of-sequence token is not in the text
            return self._finish(seq, "stop", text=seq.stopper.flush())
        text, stopped = seq.stopper.feed(seq.decoder.feed(token))
        if stopped:
            return self._finish(seq, "stop", text=text, token=token)
        if len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_seq_len:
            return self._finish(seq, "length", text=text + seq.stopper.flush(), token=token)
        if text:
            lps = seq.take_logprobs()
            seq.on_event(Event(text, (token,), len(seq.prompt), len(seq.output), logprobs=lps))

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        text: str = "",
        token: int | None = None,
        error: str | None = None,
    ) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        ids = () if token is None else (token,)
        logprobs, matched = seq.take_logprobs(), seq.stopper.matched
        seq.on_event(
            Event(text, ids, len(seq.prompt), len(seq.output), reason, error, logprobs, matched)
        )

    def _drop_cancelled(self) -> None:
        for seq in self._active:
            if seq.cancelled:
                self._finish(seq, "cancelled")
        self._active = [s for s in self._active if s.finish_reason is None]
        self._compact()

    def _compact(self) -> None:
        """Keep the cache rows of the active sequences in slots [0, n), in list order."""
        for slot, seq in enumerate(self._active):
            if seq.slot != slot:
                self.executor.move_slot(seq.slot, slot, seq.length)
                seq.slot = slot
