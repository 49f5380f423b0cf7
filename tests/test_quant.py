"""Weights kept quantized: each GGUF type against its float32 dequantization, and the bundled
model in its quantized layout against the float32 reference.

Tolerances, and why:
- 4-bit types (Q4_0, Q4_1, Q4_K) load without loss (QuantWeight.dequantize == gguf's own
  dequantization); their products differ from the float32 product only by the bfloat16
  activations and scales the CPU kernel takes: within 2 % of the output's largest value.
- 8-bit types (Q8_0, and Q5_K/Q6_K requantised to int8 per row) add int8 rounding of at most
  half a step (row max / 254): within 3 %.
- The whole model: teacher-forced top-1 agreement with the float32 reference over 256
  positions >= 97 % (we measure 99.6 %), max |logit difference| < 1.5 (we measure 0.62; logits
  span about +-30), the same first 16 greedy tokens, and "Paris".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine_reference import SMOLLM_PROMPT, greedy_tokens

from shoal.engine.gguf_file import GGUFFile
from shoal.engine.model import Step
from shoal.engine.quant import (
    Int4Linear,
    Int8Linear,
    QuantizationError,
    QuantWeight,
    cat_rows,
    from_gguf,
    make_linear,
)
from shoal.engine.tokenizer import Tokenizer
from shoal.engine.weights import load_model
from shoal.models.local import describe

from engine_helpers import bundled_gguf

pytestmark = pytest.mark.timeout(300)

ROWS, COLS = 64, 512  # K-quants need whole 256-wide super-blocks


def gguf_tensor(qtype: str, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(raw bytes [ROWS, bytes per row], float32 dequantization) of a random tensor."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    if qtype in ("Q4_0", "Q4_1", "Q8_0"):
        raw = gguf.quants.quantize(rng.normal(0, 0.1, (ROWS, COLS)).astype(np.float32), t)
    else:  # gguf has no numpy quantizer for K-quants: any bytes are valid but the scales
        block, nbytes = gguf.GGML_QUANT_SIZES[t]
        blocks = rng.integers(0, 256, (ROWS * COLS // block, nbytes), dtype=np.uint8)
        scales = rng.uniform(1e-3, 2e-3, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
        if qtype == "Q6_K":  # its one scale d is the last two bytes
            blocks[:, -2:] = scales[:, :2]
        else:  # d and dmin lead the block
            blocks[:, :4] = scales
        raw = blocks.reshape(ROWS, -1)
    dense = gguf.quants.dequantize(raw, t).reshape(ROWS, COLS)
    return raw, torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))


CASES = {  # type: (bits it is kept in, layer, tolerance relative to the output's max)
    "Q4_0": (4, Int4Linear, 0.02),
    "Q4_1": (4, Int4Linear, 0.02),
    "Q4_K": (4, Int4Linear, 0.02),
    "Q8_0": (8, Int8Linear, 0.03),
    "Q5_K": (8, Int8Linear, 0.03),
    "Q6_K": (8, Int8Linear, 0.03),
}


@pytest.mark.parametrize("qtype", CASES)
def test_each_gguf_type_multiplies_like_its_float32_dequantization(qtype):
    bits, layer_type, tolerance = CASES[qtype]
    raw, dense = gguf_tensor(qtype)
    w = from_gguf(qtype, raw, (ROWS, COLS))
    assert w.bits == bits and w.shape == (ROWS, COLS)
    if bits == 4:  # 4-bit blocks map onto torch's int4 groups exactly
        assert torch.allclose(w.dequantize(), dense, atol=1e-6, rtol=1e-5)
    layer = make_linear(w, None, torch.device("cpu"), torch.float32)
    assert isinstance(layer, layer_type)
    x = torch.randn(3, 2, COLS)
    expected = x @ dense.T
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_quantized_weights_slice_and_join_like_tensors():
    raw, dense = gguf_tensor("Q4_1")
    w = from_gguf("Q4_1", raw, (ROWS, COLS))
    assert torch.allclose(w.narrow(0, 16, 32).dequantize(), dense[16:48], atol=1e-6)
    assert torch.allclose(w.narrow(1, 64, 128).dequantize(), dense[:, 64:192], atol=1e-6)
    top, bottom = w.chunk(2)
    assert torch.allclose(cat_rows([top, bottom]).dequantize(), dense, atol=1e-6)
    order = torch.randperm(ROWS)
    assert torch.allclose(w.rows(order).dequantize(), dense[order], atol=1e-6)
    with pytest.raises(QuantizationError, match="groups"):
        w.narrow(1, 8, 64)  # not on a 32-column group boundary
    # 4-bit and 8-bit halves (a Q4_K q/k beside a Q6_K v) meet at int8
    raw8, dense8 = gguf_tensor("Q6_K")
    mixed = cat_rows([w, from_gguf("Q6_K", raw8, (ROWS, COLS))])
    assert mixed.bits == 8 and mixed.shape == (2 * ROWS, COLS)
    both = torch.cat([dense, dense8])
    assert (mixed.dequantize() - both).abs().max() <= both.abs().amax(1).max() / 200


def test_int8_at_load_for_dense_weights():
    w = torch.randn(96, 64)
    layer = make_linear(w, torch.randn(96), torch.device("cpu"), torch.float32, "int8")
    assert isinstance(layer, Int8Linear)
    x = torch.randn(4, 64)
    expected = x @ w.T + layer.bias
    assert (layer(x) - expected).abs().max() <= 0.03 * expected.abs().max()
    assert QuantWeight.int8(w).nbytes == 96 * 64 + 96 * 2


@pytest.fixture(scope="module")
def bundled_pair():
    path = bundled_gguf()
    return load_model(path), load_model(path, quantize="none")


def test_bundled_model_stays_quantized_in_memory(bundled_pair):
    from shoal.engine.quant import module_bytes

    quantized, reference = bundled_pair
    file_bytes = bundled_gguf().stat().st_size
    assert module_bytes(quantized) <= 1.0 * file_bytes  # Q4_1 layers 4-bit, Q8_0 embedding 8-bit
    assert module_bytes(reference) > 5 * file_bytes  # float32
    assert isinstance(quantized.layers[0].feed_forward.w13, Int4Linear)
    assert quantized.lm_head is quantized.embed.head()  # tied: one 8-bit copy
    # what the node reports for placement, from the header alone, is what loading holds
    for model, mode in ((quantized, "auto"), (reference, "none")):
        held = describe("m", bundled_gguf(), quantize=mode).held
        assert held.weight_bytes == module_bytes(model)


def test_the_lean_gguf_reader_reads_what_gguf_reads():
    import gguf

    path = bundled_gguf()
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape)
        assert np.array_equal(a.data, b.data)
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["llama.block_count"] == 30
    assert ours.metadata["tokenizer.ggml.tokens.length"] == 49152  # arrays: their length


def test_bundled_model_quantized_matches_the_float32_reference(bundled_pair, tmp_path):
    quantized, reference = bundled_pair
    greedy = greedy_tokens(reference, SMOLLM_PROMPT, 256)
    answer = greedy_tokens(quantized, SMOLLM_PROMPT, 16)
    assert answer == greedy[:16]
    assert "Paris" in Tokenizer.load(bundled_gguf(), tmp_path).decode(answer)
    seq = SMOLLM_PROMPT + greedy

    def logits(model):
        model.setup_cache(1, len(seq))
        return model(torch.tensor([seq]), Step.prefill(0, 0, len(seq)), all_logits=True)[0]

    ours, ref = logits(quantized), logits(reference)
    scored = slice(len(SMOLLM_PROMPT) - 1, len(seq) - 1)  # the 256 predicted positions
    agreement = (ours[scored].argmax(-1) == ref[scored].argmax(-1)).float().mean().item()
    assert agreement >= 0.97
    assert (ours - ref).abs().max().item() < 1.5


def test_bundled_model_quantized_batched_decode_matches_solo_rows(bundled_pair):
    """Rows at different positions decoded together give what each gives alone: the int4 and
    int8 kernels are row-independent; attention over a longer, masked cache moves float32
    sums by ~1e-7, which bfloat16 activations can round either way, hence a tolerance."""
    quantized, _ = bundled_pair
    prompts = [SMOLLM_PROMPT, SMOLLM_PROMPT[:9], SMOLLM_PROMPT[3:]]
    quantized.setup_cache(len(prompts), 64)
    last = []
    for slot, p in enumerate(prompts):
        last.append(int(quantized(torch.tensor([p]), Step.prefill(slot, 0, len(p))).argmax()))
    batched = quantized(torch.tensor([[t] for t in last]), Step.decode([len(p) for p in prompts]))
    for slot, p in enumerate(prompts):
        quantized.setup_cache(1, 64)
        quantized(torch.tensor([p]), Step.prefill(0, 0, len(p)))
        solo = quantized(torch.tensor([[last[slot]]]), Step.decode([len(p)]))[0]
        assert batched[slot].argmax() == solo.argmax()
        assert (batched[slot] - solo).abs().max() < 0.5
