"""What a lockstep step puts on the wire: the step header and its fixed int64 layout, a
pipeline hop's one-message buffer, and the logprobs a pipeline's last rank sends back.

Pure encoding (engine.lockstep sends and receives these); every rank of an instance builds
them with the same sizes, so both ends of each message agree on its length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import torch

from shoal.engine.model import Step
from shoal.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob


class Op(IntEnum):
    NOOP = 0  # heartbeat (it may still carry KV moves)
    PREFILL = 1
    DECODE = 2
    STOP = 3


Move = tuple[int, int, int]  # KV slot move: (src, dst, length), as KVCache.move_slot


@dataclass(frozen=True)
class StepHeader:
    op: Op
    rows: int = 0  # decode: sequences in the batch; prefill: prompt tokens
    slot: int = 0  # prefill: the admitted sequence's KV slot
    start: int = 0  # prefill: position of its first token
    ids: tuple[int, ...] = ()  # decode: sequence id per row; prefill: the admitted one's
    positions: tuple[int, ...] = ()  # decode: position of each row's token
    tokens: tuple[int, ...] = ()  # decode: each row's token (tensor parallel only)
    moves: tuple[Move, ...] = ()  # applied before the step
    params: SamplingParams | None = None  # prefill: the admitted sequence's sampling
    inline: bool = True  # pipeline: the activations are in this message
    want_logits: bool = False  # the sampler also returns the logits (tests, tools)

    def step(self, device: torch.device) -> Step:
        if self.op == Op.PREFILL:
            return Step.prefill(self.slot, self.start, self.rows, device)
        return Step.decode(list(self.positions), device)


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


def _signed64(x: int) -> int:
    x &= (1 << 64) - 1  # torch seeds are taken modulo 2**64 too
    return x - (1 << 64) if x >= 1 << 63 else x


class HeaderCodec:
    """StepHeader <-> a fixed-size list of int64: 20 fields, then ids, positions and tokens
    (max_batch each), then room for max_moves moves. Of the sampling parameters only what
    the sampler reads travels (temperature, top_p, top_k, min_p and the three penalties as
    float64 bits, the seed, how many top logprobs: -1 for none);
    stop strings, max_tokens and EOS handling stay with rank 0's scheduler."""

    FIXED = 20

    def __init__(self, max_batch: int, max_moves: int | None = None) -> None:
        self.max_batch = max_batch
        self.max_moves = max_moves or 2 * max_batch
        self.size = self.FIXED + 3 * max_batch + 3 * self.max_moves

    def pack(self, h: StepHeader) -> list[int]:
        n, b = len(h.ids), self.max_batch
        if n > b or len(h.positions) > b or len(h.tokens) > b or len(h.moves) > self.max_moves:
            raise ValueError(f"step header too large for batch {b}: {h}")
        p = h.params
        v = [0] * self.size
        v[:7] = [h.op, h.rows, h.slot, h.start, n, len(h.moves), h.inline | h.want_logits << 1]
        if p is not None:
            seed = 0 if p.seed is None else _signed64(p.seed)
            v[7:12] = [1, _f2i(p.temperature), _f2i(p.top_p), p.top_k, _f2i(p.min_p)]
            v[12:14] = [p.seed is not None, seed]
            v[14:17] = [_f2i(x) for x in (p.presence_penalty, p.frequency_penalty)] + [
                _f2i(p.repetition_penalty)
            ]
            v[17] = -1 if p.logprobs is None else p.logprobs
        f = self.FIXED
        v[f : f + n] = h.ids
        v[f + b : f + b + len(h.positions)] = h.positions
        v[f + 2 * b : f + 2 * b + len(h.tokens)] = h.tokens
        m = f + 3 * b
        v[m : m + 3 * len(h.moves)] = [x for move in h.moves for x in move]
        return v

    def unpack(self, v: list[int]) -> StepHeader:
        op, rows, slot, start, n, n_moves, flags = v[:7]
        params = None
        if v[7]:
            seed = v[13] & ((1 << 64) - 1) if v[12] else None
            params = SamplingParams(
                temperature=_i2f(v[8]),
                top_p=_i2f(v[9]),
                top_k=v[10],
                min_p=_i2f(v[11]),
                seed=seed,
                presence_penalty=_i2f(v[14]),
                frequency_penalty=_i2f(v[15]),
                repetition_penalty=_i2f(v[16]),
                logprobs=None if v[17] < 0 else v[17],
            )
        f, b = self.FIXED, self.max_batch
        decode = op == Op.DECODE
        m = f + 3 * b
        return StepHeader(
            op=Op(op),
            rows=rows,
            slot=slot,
            start=start,
            ids=tuple(v[f : f + n]),
            positions=tuple(v[f + b : f + b + rows]) if decode else (),
            tokens=tuple(v[f + 2 * b : f + 2 * b + rows]) if decode else (),
            moves=tuple(tuple(v[i : i + 3]) for i in range(m, m + 3 * n_moves, 3)),
            params=params,
            inline=bool(flags & 1),
            want_logits=bool(flags & 2),
        )


class Wire:
    """One pipeline hop's fixed-size message: the header, then room for the activations of a
    full decode batch. Sent whole every time, so both ends always agree on its size."""

    def __init__(
        self, codec: HeaderCodec, hidden: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.codec = codec
        head_bytes = codec.size * 8
        self.room = codec.max_batch * hidden
        self.buf = torch.zeros(head_bytes + self.room * dtype.itemsize, dtype=torch.uint8)
        self.buf = self.buf.to(device)
        self.head = self.buf[:head_bytes].view(torch.int64)
        self.acts = self.buf[head_bytes:].view(dtype)

    def fits(self, h: torch.Tensor | None) -> bool:
        return h is None or h.numel() <= self.room

    def put(self, header: StepHeader, h: torch.Tensor | None = None) -> None:
        self.head.copy_(torch.tensor(self.codec.pack(header), dtype=torch.int64))
        if h is not None and header.inline:
            self.acts[: h.numel()].copy_(h.reshape(-1))

    def header(self) -> StepHeader:
        return self.codec.unpack(self.head.tolist())


LOGPROB_ROW = 2 + 2 * MAX_TOP_LOGPROBS  # logprob, k, then k token ids and k logprobs


def pack_logprobs(found: list[TokenLogprob]) -> torch.Tensor:
    """Logprobs of some rows as one float64 tensor [rows, LOGPROB_ROW] (ids are exact in
    float64); the token ids themselves travel in the reply."""
    out = torch.zeros(len(found), LOGPROB_ROW, dtype=torch.float64)
    for row, lp in enumerate(found):
        k = len(lp.top)
        out[row, :2] = torch.tensor([lp.logprob, k], dtype=torch.float64)
        if k:
            out[row, 2 : 2 + k] = torch.tensor([t for t, _ in lp.top], dtype=torch.float64)
            out[row, 2 + MAX_TOP_LOGPROBS : 2 + MAX_TOP_LOGPROBS + k] = torch.tensor(
                [x for _, x in lp.top], dtype=torch.float64
            )
    return out


def unpack_logprobs(packed: torch.Tensor, tokens: list[int]) -> list[TokenLogprob]:
    rows = packed.tolist()
    found = []
    for token, row in zip(tokens, rows, strict=True):
        k, m = int(row[1]), MAX_TOP_LOGPROBS
        top = zip(row[2 : 2 + k], row[2 + m : 2 + m + k], strict=True)
        top = tuple((int(t), x) for t, x in top)
        found.append(TokenLogprob(token, row[0], top))
    return found


def activation_shape(header: StepHeader, hidden: int) -> tuple[int, int, int]:
    return (1, header.rows, hidden) if header.op == Op.PREFILL else (header.rows, 1, hidden)
