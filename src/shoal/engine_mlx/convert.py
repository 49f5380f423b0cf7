"""A GGUF file as an MLX model dir (config.json, tokenizer, safetensors), built once in the
cache: the bundled SmolLM2 becomes servable by the MLX engine. Optionally quantized with
mlx-lm's own quantizer (4 or 8 bits), so the dir is what mlx-community publishes.

Unquantized weights are float16 where mlx runs on Metal and float32 where it runs on the CPU:
mlx's CPU float16 kernels are about 3x slower than its float32 ones (SmolLM2 decode measured
on mlx[cpu] here: 2.6 vs 7.8 tok/s)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from shoal.engine.config import ModelConfig
from shoal.engine.tokenizer import Tokenizer
from shoal.engine.weights import GGUFSource

DONE = "shoal-converted.json"  # written last: a dir without it is an interrupted conversion


def hf_config(c: ModelConfig) -> dict[str, Any]:
    """The HF config.json mlx-lm reads for a model the torch engine parsed from GGUF."""
    return {
        "model_type": c.arch,
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
                "mistral": "MistralForCausalLM",
            }.get(c.arch, "LlamaForCausalLM")
        ],  # fmt: skip
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) != 1 else c.eos_token_ids[0],
    }


def float_dtype(metal: bool) -> str:
    return "float16" if metal else "float32"


def on_metal() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def converted_dir(gguf: str | Path, cache: str | Path, bits: int | None = None) -> Path:
    """Where the conversion of that file (by path, size and mtime) lives in the cache."""
    p = Path(gguf)
    stat = p.stat()
    dtype = float_dtype(on_metal())
    key = f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{bits}:{dtype}"
    key = hashlib.sha256(key.encode())
    return Path(cache) / "mlx" / f"{p.stem}-{key.hexdigest()[:12]}"


def convert_gguf(gguf: str | Path, cache: str | Path, bits: int | None = None) -> Path:
    """The MLX dir for `gguf` (float weights, or `bits`-bit quantized), converting once."""
    out = converted_dir(gguf, cache, bits)
    if (out / DONE).is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = GGUFSource(gguf)
    config = hf_config(source.config)
    _write_weights(source, tmp, config, bits)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = Tokenizer.from_gguf(gguf, cache_dir=Path(cache) / "tokenizers")
    tokenizer.save_hf_dir(tmp)
    (tmp / DONE).write_text(json.dumps({"from": str(Path(gguf).resolve()), "bits": bits}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _write_weights(source: GGUFSource, out: Path, config: dict[str, Any], bits: int | None) -> None:
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, quantize_model, save_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    dtype = getattr(mx, float_dtype(on_metal()))
    weights = {n: mx.array(source.get(n).numpy()).astype(dtype) for n in source.names()}
    # strict: a tensor the class does not expect, or one it lacks, fails the conversion
    model.load_weights(list(model.sanitize(weights).items()))
    if bits is not None:
        model, config_q = quantize_model(model, config, group_size=64, bits=bits)
        config.update(config_q)
    mx.eval(model.parameters())
    save_model(out, model)
