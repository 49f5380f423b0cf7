"""Opening a model dir for the MLX engine: what mlx-lm loads, checked first so a bad dir is a
clear refusal (the missing file or the unsupported architecture named), never a crash loop."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.engine.config import ModelConfig, UnsupportedModelError


class MlxModelError(ValueError):
    """The dir cannot be served by the MLX engine; the message names the file or field."""


def read_config(path: str | Path) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise MlxModelError(f"{config_file} is missing: an MLX model dir holds config.json")
    return json.loads(config_file.read_text())


def model_type(config: dict[str, Any]) -> str:
    return str(config.get("model_type", ""))


# Plain layer stacks (embed -> layers -> norm) whose mlx-lm classes have no `pipeline`: shoal
# splits them into stages itself (engine_mlx.stages), the way mlx-lm's PipelineMixin does.
STAGEABLE = frozenset({"llama", "mistral", "qwen3"})


def supports(arch: str) -> tuple[bool, bool]:
    """(tensor, pipeline) for mlx-lm's `arch`: its Model can `shard` across a group, and one of
    its classes (the Model or its inner text model, often through mlx-lm's PipelineMixin) can
    `pipeline` its layers, or it is a plain layer stack shoal stages itself."""
    try:
        module = importlib.import_module(f"mlx_lm.models.{arch}")
    except ImportError:
        return False, False
    # its own classes and the ones it builds on (kimi_k25 wraps deepseek_v3's text model)
    classes = [
        c for c in vars(module).values()
        if isinstance(c, type) and c.__module__.startswith("mlx_lm.models.")
        and c.__module__ != "mlx_lm.models.pipeline"
    ]  # fmt: skip
    return hasattr(getattr(module, "Model", None), "shard"), arch in STAGEABLE or any(
        hasattr(c, "pipeline") for c in classes
    )


def check_sharding(arch: str, sharding: str) -> None:
    """Refuse a layout mlx-lm cannot run `arch` in, naming both."""
    tensor, pipeline = supports(arch)
    if sharding == "tensor" and not tensor:
        raise UnsupportedModelError(f"mlx-lm cannot shard {arch} for tensor parallel")
    if sharding == "pipeline" and not pipeline:
        raise UnsupportedModelError(
            f"mlx-lm cannot split {arch} into pipeline stages"
            + (": use tensor parallel" if tensor else "")
        )


def check_dir(path: str | Path) -> dict[str, Any]:
    """The dir's config, once its architecture is known to mlx-lm and every weight file its
    index names is there."""
    root = Path(path)
    config = read_config(root)
    arch = model_type(config)
    try:
        importlib.import_module(f"mlx_lm.models.{arch}")
    except ImportError:
        raise UnsupportedModelError(
            f"model_type {arch!r} in {root / 'config.json'} is not an architecture mlx-lm supports"
        ) from None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(f for f in wanted if not (root / f).is_file())
        if missing:
            raise MlxModelError(f"{root} lacks {', '.join(missing)} (named by {index.name})")
    elif not any(root.glob("*.safetensors")):
        raise MlxModelError(f"{root} holds no .safetensors weights")
    return config


def serving_config(config: dict[str, Any]) -> ModelConfig:
    """What the scheduler needs of any model (context window, stop tokens), from its config;
    the architecture itself is mlx-lm's business."""
    text = config.get("text_config") or config
    eos = text.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    heads = int(text.get("num_attention_heads", 1))
    hidden = int(text.get("hidden_size", 0))
    return ModelConfig(
        arch=model_type(config),
        vocab_size=int(text.get("vocab_size", 0)),
        hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size", 0)),
        num_layers=int(text.get("num_hidden_layers", 0)),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or (hidden // heads if heads else 0)),
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        bos_token_id=text.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def load(
    path: str | Path,
    group: Any = None,
    sharding: str = "pipeline",
    layers: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Any, ModelConfig]:
    """The mlx-lm model (quantized layers stay quantized) and its serving config. With a group
    of several ranks, this rank's part only: its pipeline stage `layers` (shoal's rank order)
    or its tensor shard. Weights load lazily, so the layers another stage holds are never read."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    config = check_dir(path)
    serving = serving_config(config)
    model, _ = load_model(Path(path), lazy=True)
    if group is not None and group.size() > 1:
        check_sharding(model_type(config), sharding)
        if sharding == "tensor":
            model.shard(group)
        else:
            from shoal.engine_mlx.group import mlx_rank, pipeline_split
            from shoal.engine_mlx.stages import stage

            start, end = layers or (0, serving.num_layers)
            inner = getattr(model, "model", None)
            if hasattr(inner, "pipeline"):
                world = group.size()
                rank = mlx_rank(group.rank(), world)  # the mapping is its own inverse
                inner.pipeline(group, pipeline_split(start, end, serving.num_layers, rank, world))
            elif model_type(config) in STAGEABLE:
                stage(model, group, start, end)
            else:  # the pipeline is on a class deeper down
                raise UnsupportedModelError(
                    f"mlx-lm's {model_type(config)} has no pipeline on its text model"
                )
    held = [layer for layer in model.layers if layer is not None]  # this rank's, in order
    for done, layer in enumerate(held, start=1):  # read layer by layer: progress to report
        mx.eval(layer.parameters())
        if progress is not None:
            progress(done, len(held))
    mx.eval(model.parameters())  # embeddings, norms, the head
    return model, serving
