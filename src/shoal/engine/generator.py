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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from shoal.engine.model import Step, Transformer
from shoal.engine.sampling import SamplingParams, make_generator, sample_batch
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
    rng: torch.Generator | None = None
    cancelled: bool = False
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        """Tokens whose K/V are (or are about to be) in the cache."""
        return len(self.prompt) + len(self.output)


class ContextLengthError(ValueError):
    pass


class Generator:
    """Owns the model, its KV cache and the scheduler thread."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 4,
        max_seq_len: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = min(
            max_seq_len or model.config.max_position_embeddings,
            model.config.max_position_embeddings,
        )
        self.eos_ids = frozenset(tokenizer.eos_ids) | frozenset(model.config.eos_token_ids)
        model.setup_cache(max_batch, self.max_seq_len)
        self.device = next(model.parameters()).device
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="shoal-generator", daemon=True)
        self.stats = {"steps": 0, "max_batch_seen": 0, "tokens": 0}

    # -- public API (any thread) ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=10)

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
            rng=make_generator(params),
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
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._active):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception as exc:  # a failed step ends its requests, never the server
                log.exception("generation step failed")
                for seq in self._active + list(self._waiting):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                self._active.clear()
                self._waiting.clear()
        for seq in self._active + list(self._waiting):
            self._finish(seq, "error", error="the server is shutting down")

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
        tokens = torch.tensor([[s.output[-1]] for s in batch], device=self.device)
        logits = self.model(tokens, Step.decode([s.length - 1 for s in batch], self.device))
        self._accept(batch, logits)
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))

    def _prefill(self, seq: Sequence) -> None:
        seq.slot = len(self._active)
        self._active.append(seq)
        tokens = torch.tensor([seq.prompt], device=self.device)
        logits = self.model(tokens, Step.prefill(seq.slot, 0, len(seq.prompt), self.device))
        self._accept([seq], logits)

    def _accept(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        chosen = sample_batch(logits, [s.params for s in batch], [s.rng for s in batch])
        for seq, token in zip(batch, chosen, strict=True):
            self._advance(seq, token)
        self._active = [s for s in self._active if s.finish_reason is None]
        self._compact()

    def _advance(self, seq: Sequence, token: int) -> None:
        seq.output.append(token)
        self.stats["tokens"] += 1
        if token in self.eos_ids and not seq.params.ignore_eos:
            return self._finish(seq, "stop", text=seq.stopper.flush())
        text, stopped = seq.stopper.feed(seq.decoder.feed(token))
        if stopped:
            return self._finish(seq, "stop", text=text, token=token)
        if len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_seq_len:
            return self._finish(seq, "length", text=text + seq.stopper.flush(), token=token)
        if text:
            seq.on_event(Event(text, (token,), len(seq.prompt), len(seq.output)))

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
        seq.on_event(Event(text, ids, len(seq.prompt), len(seq.output), reason, error))

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
                self.model.cache.move_slot(seq.slot, slot, seq.length)
                seq.slot = slot
