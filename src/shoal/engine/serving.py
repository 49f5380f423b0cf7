"""One model served on this node: tokenizer + weights + generator behind a small interface."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.engine.generator import Event, Generator
from shoal.engine.sampling import SamplingParams
from shoal.engine.tokenizer import Tokenizer
from shoal.engine.weights import load_model, release_freed_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupResult:
    text: str
    seconds: float


class ServedModel:
    def __init__(self, model_id: str, tokenizer: Tokenizer, generator: Generator) -> None:
        self.id = model_id
        self.tokenizer = tokenizer
        self.generator = generator
        self.created = int(time.time())

    @classmethod
    def load(
        cls,
        model_id: str,
        path: str | Path,
        *,
        device: str = "cpu",
        max_batch: int = 4,
        max_seq_len: int | None = None,
        tokenizer_cache: Path | None = None,
    ) -> ServedModel:
        started = time.monotonic()
        model = load_model(path, device=device)
        tokenizer = Tokenizer.load(path, tokenizer_cache)
        release_freed_memory()
        generator = Generator(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
        generator.start()
        log.info("loaded %s from %s in %.1fs", model_id, path, time.monotonic() - started)
        return cls(model_id, tokenizer, generator)

    @property
    def context_length(self) -> int:
        return self.generator.max_seq_len

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        answer_prefix: str = "",
    ) -> list[int]:
        """The chat template's prompt; `answer_prefix` starts the assistant's answer."""
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools)
        return self.tokenizer.encode(text + answer_prefix, add_special_tokens=False)

    def text_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Events of one request; closing the iterator early cancels it."""
        return self.generator.stream(prompt, params)

    def generate_blocking(
        self, prompt: list[int], params: SamplingParams, timeout: float = 120.0
    ) -> list[Event]:
        """Run one request to the end from a non-async thread (startup warm-up, tools)."""
        events: list[Event] = []
        done = threading.Event()

        def collect(event: Event) -> None:
            events.append(event)
            if event.finish_reason is not None:
                done.set()

        self.generator.submit(prompt, params, collect)
        if not done.wait(timeout):
            raise TimeoutError(f"generation did not finish in {timeout:.0f}s")
        return events

    def warm_up(self) -> WarmupResult:
        """A real greedy generation: the node reports healthy only after this succeeds."""
        started = time.monotonic()
        prompt = self.chat_prompt([{"role": "user", "content": "Say hello."}])
        events = self.generate_blocking(prompt, SamplingParams(max_tokens=4, temperature=0))
        last = events[-1]
        if last.finish_reason == "error" or last.completion_tokens == 0:
            raise RuntimeError(f"warm-up generation failed: {last.error or 'no tokens'}")
        return WarmupResult("".join(e.text for e in events), time.monotonic() - started)

    def close(self) -> None:
        self.generator.stop()
