"""Preallocated KV cache: one slot per running sequence, every layer of this shard.

Active sequences always occupy slots [0, n) (the scheduler compacts on finish), so a decode
step attends over a plain view `k[:n, :, :kv_len]` with no gather.
"""

from __future__ import annotations

import math
import mmap

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_batch: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, 2, max_batch, num_kv_heads, max_seq_len, head_dim)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        if torch.device(device).type == "cpu":
            # Anonymous mmap pages read as zero and take memory only once written, so a
            # full-context cache costs RSS in proportion to the tokens actually held. (numpy's
            # zeros would ask for 2 MB huge pages: every touched row would cost 2 MB.)
            size = math.prod(shape) * dtype.itemsize
            self._buffer = mmap.mmap(-1, size)
            self.data = torch.frombuffer(self._buffer, dtype=dtype).view(shape)
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first `length` positions from slot `src` to slot `dst`."""
        if src != dst and length > 0:
            self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]
