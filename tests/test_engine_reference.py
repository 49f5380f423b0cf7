"""The engine against transformers on the same weights: logits, greedy tokens, layer shards."""

from __future__ import annotations

import pytest
import torch

from shoal.engine.model import Step, Transformer
from shoal.engine.weights import load_model, open_source

from engine_helpers import bundled_gguf, save_tiny_gguf, save_tiny_model

pytestmark = pytest.mark.timeout(300)


def greedy_tokens(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Prefill then n-1 decode steps through the KV cache, one sequence in slot 0."""
    model.setup_cache(1, len(prompt) + n)
    logits = model(torch.tensor([prompt]), Step.prefill(0, 0, len(prompt)))
    out = [int(logits.argmax(-1))]
    while len(out) < n:
        pos = len(prompt) + len(out) - 1
        logits = model(torch.tensor([[out[-1]]]), Step.decode([pos]))
        out.append(int(logits.argmax(-1)))
    return out


def full_logits(model: Transformer, prompt: list[int]) -> torch.Tensor:
    model.setup_cache(1, len(prompt))
    return model(torch.tensor([prompt]), Step.prefill(0, 0, len(prompt)), all_logits=True)[0]


def reference_greedy(ref, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    # No EOS: min_new_tokens would mask it out of the logits, which our greedy loop never does.
    ref.generation_config.eos_token_id = None
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM

    path = bundled_gguf()
    ref = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return load_model(path, quantize="none"), ref  # transformers dequantizes to float32


# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" and a
# few more ids, fixed so the test does not depend on the tokenizer.
SMOLLM_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def test_smollm_logits_match_transformers(smollm):
    ours, ref = smollm
    with torch.no_grad():
        expected = ref(torch.tensor([SMOLLM_PROMPT])).logits[0]
    assert (full_logits(ours, SMOLLM_PROMPT) - expected).abs().max().item() < 1e-3


def test_smollm_greedy_continuation_matches_transformers(smollm):
    ours, ref = smollm
    assert greedy_tokens(ours, SMOLLM_PROMPT, 32) == reference_greedy(ref, SMOLLM_PROMPT, 32)


TINY_CASES = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "linear_rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # mixture of experts: softmax top-2 of 4, raw (qwen3_moe's default) or renormalised, and
    # a dense layer among the sparse ones (mlp_only_layers)
    "qwen3_moe": ("qwen3_moe", {"mlp_only_layers": [1]}),
    "qwen3_moe_norm": ("qwen3_moe", {"norm_topk_prob": True}),
    "mixtral": ("mixtral", {}),
    "yarn_rope": (
        "qwen2",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(TINY_CASES))
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    kind, overrides = TINY_CASES[request.param]
    path = save_tiny_model(kind, tmp_path_factory.mktemp(request.param), **overrides)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


TINY_PROMPT = [1, 5, 17, 42, 8, 93, 11, 60, 3, 77, 21, 34]


def test_tiny_model_logits_and_greedy_match_transformers(tiny):
    path, ref = tiny
    ours = load_model(path)
    with torch.no_grad():
        expected = ref(torch.tensor([TINY_PROMPT])).logits[0]
    assert (full_logits(ours, TINY_PROMPT) - expected).abs().max().item() < 1e-3
    assert greedy_tokens(ours, TINY_PROMPT, 32) == reference_greedy(ref, TINY_PROMPT, 32)


@pytest.mark.parametrize("cuts", [(1, 3), (2, 3), (1, 2)])
def test_layer_range_shards_reproduce_full_model_hidden_states(tiny, cuts):
    path, ref = tiny
    a, b = cuts
    source = open_source(path)
    stages = [load_model(path, r, source=source) for r in ((0, a), (a, b), (b, 4))]
    assert [s.layer_range for s in stages] == [(0, a), (a, b), (b, 4)]
    assert stages[0].lm_head is None and stages[1].embed is None and stages[2].embed is None
    with torch.no_grad():
        hf = ref(torch.tensor([TINY_PROMPT]), output_hidden_states=True).hidden_states
    n = len(TINY_PROMPT)
    x: torch.Tensor = torch.tensor([TINY_PROMPT])
    for stage in stages:
        stage.setup_cache(1, n)
        x = stage(x, Step.prefill(0, 0, n), all_logits=True)
        if stage.layer_range[1] < 4:  # hidden states after layer `end` of the full model
            assert (x - hf[stage.layer_range[1]]).abs().max().item() < 1e-4
    assert (x[0] - full_logits(load_model(path, source=source), TINY_PROMPT)).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_moe_gguf_loads_like_its_safetensors(kind, qtype, tmp_path):
    """llama.cpp's layout of the same weights: stacked 3-D experts, GGUF names, Mixtral as a
    "llama" GGUF with permuted Q/K rows. F32 equals the safetensors model, greedy tokens and
    all; Q8_0 (experts kept
    int8 in memory) stays within its rounding."""
    hf = save_tiny_model(kind, tmp_path / "hf", mlp_only_layers=[1] if kind == "qwen3_moe" else [])
    gguf_model = load_model(save_tiny_gguf(hf, tmp_path / "m.gguf", qtype))
    reference = load_model(hf)
    assert gguf_model.config.arch == kind and gguf_model.config.num_experts == 4
    expected = full_logits(reference, TINY_PROMPT)
    diff = (full_logits(gguf_model, TINY_PROMPT) - expected).abs().max().item()
    # Q8_0's own rounding moves this tiny model's logits by 2.3 % of their range, int8 rows
    # and bfloat16 activations on top by 3.3 % (measured)
    assert diff < (1e-4 if qtype == "F32" else 0.05 * expected.abs().max().item())
    if qtype == "F32":  # a random tiny model's near-ties make greedy tokens fork on rounding
        assert greedy_tokens(gguf_model, TINY_PROMPT, 32) == greedy_tokens(
            reference, TINY_PROMPT, 32
        )
