"""One MLX model in this process, batched: the Executor the scheduler (engine.generator) drives.

Each admitted sequence is prefilled on its own KV cache, then merged into one left-padded batch
cache (mlx-lm's BatchKVCache, one per layer); a decode step runs every running sequence as one
batch. Rows of sequences that finished are dropped at the next step (`filter`), so the
scheduler's slot moves need nothing here. Sampling is shoal's (engine.sampling), so both
engines sample the same way from the same logits.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import torch
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from shoal.engine.config import ModelConfig
from shoal.engine.generator import SamplerBank
from shoal.engine.sampling import SamplingParams, TokenLogprob

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the attention scratch memory


class MlxExecutor:
    idle_every = None
    failure = None
    device = torch.device("cpu")  # where sampling runs; the model runs on mlx's device

    def __init__(
        self, model: Any, config: ModelConfig, max_batch: int, max_seq_len: int, sample: bool = True
    ) -> None:
        self.model = model
        self.sample = sample  # False on an MLX instance's followers: rank 0 samples
        self.config = config
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.sampler = SamplerBank()
        self._cache: list[BatchKVCache] | None = None
        self._rows: list[int] = []  # the sequence id of each batch-cache row

    def prefill(self, seq_id: int, slot: int, prompt: list[int], params: SamplingParams) -> int:
        self.sampler.admit(seq_id, params)
        cache = make_prompt_cache(self.model)
        for start in range(0, len(prompt) - 1, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, len(prompt) - 1)
            self.model(mx.array([prompt[start:end]]), cache=cache)
            mx.eval([c.state for c in cache])
        logits = self.model(mx.array([prompt[-1:]]), cache=cache)
        merged = [BatchKVCache.merge([c]) for c in cache]
        if self._cache is None:
            self._cache = merged
        else:
            for batch, one in zip(self._cache, merged, strict=True):
                batch.extend(one)
        self._rows.append(seq_id)
        return self._sample([seq_id], logits)[0]

    def decode(self, ids: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        self.sampler.retain(ids)
        self._keep(ids)
        assert self._cache is not None
        logits = self.model(mx.array([[t] for t in tokens]), cache=self._cache)
        return self._sample(ids, logits)

    def _keep(self, ids: list[int]) -> None:
        """Only the rows of `ids`, in that order (sequences that finished are dropped)."""
        if ids == self._rows:
            return
        rows = [self._rows.index(i) for i in ids]
        assert self._cache is not None
        for layer in self._cache:
            layer.filter(mx.array(rows))
        self._rows = list(ids)

    def _sample(self, ids: list[int], logits: mx.array) -> list[int]:
        last = logits[:, -1, :]
        if not self.sample:
            mx.eval(last)  # on every rank: the model's collectives run here
            return [0] * len(ids)
        plain = [self.sampler.params[i] for i in ids]
        if all(p.greedy and p.logprobs is None for p in plain):  # argmax where the logits are
            self.sampler.logprobs = {}
            return mx.argmax(last, axis=-1).tolist()  # type: ignore[return-value]
        last = last.astype(mx.float32)
        mx.eval(last)
        return self.sampler.sample(ids, torch.from_numpy(np.array(last, copy=True)))

    def move_slot(self, src: int, dst: int, length: int) -> None:
        pass  # rows follow the ids decode is given

    def step_logprobs(self) -> dict[int, TokenLogprob]:
        return self.sampler.logprobs

    def idle(self) -> None:
        pass

    def close(self) -> None:
        self._cache, self._rows = None, []
