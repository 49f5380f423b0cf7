"""What a model costs in memory as the torch engine holds it, and placement using that cost:
a model that fits only quantized is placed (quantized), one that fits nowhere is refused
with the numbers."""

from __future__ import annotations

import dataclasses

import pytest

from shoal.engine.config import ModelConfig
from shoal.engine.footprint import held_bits, held_bytes
from shoal.models.local import describe, torch_weight_bytes
from shoal.placement.plan import model_spec
from shoal.placement.planner import Placement, PlacementRequest, Refusal, plan
from shoal.schema.report import NodeReport, Resources

from engine_helpers import bundled_gguf

GIB = 1024**3


@pytest.mark.parametrize(
    ("kind", "rows", "device", "quantize", "bits"),
    [
        ("Q4_1", 576, "cpu", "auto", 4),  # 4-bit blocks stay 4-bit
        ("Q4_K", 576, "cpu", "auto", 4),
        ("Q4_0", 100, "cpu", "auto", 8),  # the int4 kernel packs rows in 16s: int8
        ("Q8_0", 576, "cpu", "auto", 8),
        ("Q6_K", 576, "cpu", "auto", 8),
        ("BF16", 576, "cpu", "auto", 16),  # 16-bit safetensors stay 16-bit
        ("F32", 576, "cpu", "auto", None),  # the compute dtype
        ("F32", 576, "cpu", "int8", 8),  # --quantize int8
        ("BF16", 576, "cpu", "int8", 8),
        ("Q4_1", 576, "cpu", "none", None),  # --quantize none: dequantized
        ("Q4_1", 576, "cuda", "auto", None),  # GPUs: dequantized to bf16/fp16
        ("Q4_1", 576, "cuda:1", "int8", None),
    ],
)
def test_held_bits(kind, rows, device, quantize, bits) -> None:
    assert held_bits(kind, rows, device, quantize) == bits


def test_held_bytes() -> None:
    assert held_bytes(4, 64, 512, 4) == 64 * 256 + 64 * 16 * 4  # nibbles + bf16 scale/zero
    assert held_bytes(8, 64, 512, 4) == 64 * 512 + 64 * 2  # bytes + a bf16 scale per row
    assert held_bytes(16, 64, 512, 4) == 64 * 512 * 2
    assert held_bytes(None, 64, 512, 4) == 64 * 512 * 4


CONFIG = ModelConfig("llama", 96, 64, 128, 1, 4, 2, 16, tie_word_embeddings=True)
LAYER = [
    ("model.layers.0.self_attn.q_proj.weight", "Q4_K", (64, 64)),
    ("model.layers.0.self_attn.k_proj.weight", "Q4_K", (32, 64)),
    ("model.layers.0.self_attn.v_proj.weight", "Q6_K", (32, 64)),  # mixed: the fused qkv is int8
    ("model.layers.0.mlp.gate_proj.weight", "Q4_K", (128, 64)),
    ("model.layers.0.mlp.up_proj.weight", "Q4_K", (128, 64)),
    ("model.layers.0.input_layernorm.weight", "F32", (64,)),
    ("model.embed_tokens.weight", "Q4_K", (96, 64)),  # looked up by row: 8-bit
    ("lm_head.weight", "Q4_K", (96, 64)),  # tied: counted once
]


def test_torch_weight_bytes_follows_the_loader() -> None:
    expected = (
        held_bytes(8, 64, 64, 4) + held_bytes(8, 32, 64, 4) * 2  # q|k|v met at int8
        + held_bytes(4, 128, 64, 4) * 2  # gate|up both 4-bit
        + 64 * 4  # the norm in float32
        + held_bytes(8, 96, 64, 4)  # the embedding, the head's bytes too
    )  # fmt: skip
    assert torch_weight_bytes(LAYER, CONFIG, "cpu", "auto", 4) == expected
    untied = dataclasses.replace(CONFIG, tie_word_embeddings=False)
    head = held_bytes(4, 96, 64, 4)
    assert torch_weight_bytes(LAYER, untied, "cpu", "auto", 4) == expected + head
    dense = sum(64 * n for n in (64, 32, 32, 128, 128, 96)) * 2 + 64 * 2
    assert torch_weight_bytes(LAYER, CONFIG, "cuda", "auto", 2) == dense


def node(name: str, gib: float) -> NodeReport:
    return NodeReport(node_id=name, resources=Resources(ram_available=int(gib * GIB)))


def test_a_model_that_fits_only_quantized_is_placed_and_one_that_fits_nowhere_is_refused():
    path = bundled_gguf()
    quantized = model_spec(describe("smol", path, quantize="auto").held)
    full = model_spec(describe("smol", path, quantize="none").held)
    assert full.weight_bytes > 5 * quantized.weight_bytes  # float32 vs 4-bit/8-bit
    # weights 0.09 GiB quantized, 0.50 GiB in float32; KV 0.18 GiB for 4096 tokens; 0.5 headroom
    reports = [node("a", 1.0)]
    assert isinstance(plan(PlacementRequest(quantized), reports, 0.0), Placement)
    refused = plan(PlacementRequest(full), reports, 0.0)
    assert isinstance(refused, Refusal)
    assert "node a has 1.0 GiB available, needs 1.2 GiB (weights 0.5 + KV 0.2 + headroom 0.5)" in [
        r.text for r in refused.reasons
    ]
    nowhere = plan(PlacementRequest(quantized), [node("a", 0.6), node("b", 0.6)], 0.0)
    assert isinstance(nowhere, Refusal)
    texts = [r.text for r in nowhere.reasons]
    assert (
        "node a has 0.6 GiB available, needs 0.8 GiB (weights 0.1 + KV 0.2 + headroom 0.5)" in texts
    )
