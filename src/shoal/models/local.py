"""Models this node holds on its own disk, described without loading their weights."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

from shoal.engine.config import ModelConfig, UnsupportedModelError
from shoal.models.bundled import BUNDLED_MODEL_ID, bundled_model_path
from shoal.models.cards import ModelCard, card_for
from shoal.models.manifest import Manifest, build_manifest
from shoal.models.store import ModelStore, load_path
from shoal.runner.spec import apple_silicon
from shoal.schema.report import MLX_BACKENDS, HeldModel

log = logging.getLogger(__name__)

DTYPE_BYTES = {"cpu": 4, "cuda": 2, "mps": 2}  # what load_model materialises per device


@dataclass(frozen=True)
class LocalModel:
    model_id: str
    path: Path  # what the engine loads: an HF dir or a GGUF file
    held: HeldModel
    source: Path | None = None  # what its manifest lists: the store dir (default: path)

    def manifest(self, hash: bool = False) -> Manifest:
        return build_manifest(self.model_id, self.source or self.path, hash=hash)


def describe(
    model_id: str,
    path: Path,
    device: str = "cpu",
    source: Path | None = None,
    manifest: Manifest | None = None,
    backends: tuple[str, ...] = ("gloo", "nccl"),
) -> LocalModel:
    """Read a model's shape from its metadata: GGUF header or config.json + safetensors headers.
    The digest of its manifest (paths and sizes) lets placement keep to nodes whose files agree.
    `backends` are those the node and the model's card allow; of them the held model keeps the
    ones whose engine loads it (an architecture only mlx-lm knows runs on ring/jaccl only)."""
    gguf = path.suffix == ".gguf"
    torch_ok = gguf or not mlx_quantized(path)  # shoal's torch engine reads no MLX packing
    try:
        config, params, data_bytes = _gguf_shape(path) if gguf else _hf_shape(path)
    except UnsupportedModelError:
        if gguf or not mlx_installed():
            raise
        config, params, data_bytes = _hf_shape(path, lenient=True)
        torch_ok = False
    mlx = mlx_installed() and bool(MLX_BACKENDS & set(backends))
    dtype_bytes = DTYPE_BYTES.get(device.split(":")[0], 4)
    # a GGUF is converted for mlx (engine_mlx.convert: float16 on Metal, float32 on its CPU);
    # safetensors load as their files hold them
    mlx_float_bytes = 2 if apple_silicon(platform.system(), platform.machine()) else 4
    held = HeldModel(
        model_id=model_id,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        weight_bytes=params * dtype_bytes,
        dtype_bytes=dtype_bytes,
        context_length=config.max_position_embeddings,
        arch=config.arch,
        backends=tuple(b for b in backends if torch_ok or b in MLX_BACKENDS),
        mlx_layouts=mlx_layouts(config.arch) if mlx else (),
        mlx_weight_bytes=params * mlx_float_bytes if gguf else data_bytes,
        files_digest=(manifest or build_manifest(model_id, source or path)).digest,
    )
    return LocalModel(model_id, path, held, source)


def mlx_quantized(path: Path) -> bool:
    """An MLX dir whose weights mlx-lm's quantizer packed (mlx-community's 4-/8-bit)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization" in config


def mlx_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("mlx", "mlx_lm"))


def mlx_layouts(arch: str) -> tuple[str, ...]:
    """How mlx-lm can split `arch` across nodes (from its model classes)."""
    from shoal.engine_mlx.load import supports

    tensor, pipeline = supports(arch)
    return (*(("pipeline",) if pipeline else ()), *(("tensor",) if tensor else ()))


def local_models(
    configured: tuple[str, Path] | None,
    device: str = "cpu",
    store: ModelStore | None = None,
    cards: dict[str, ModelCard] | None = None,
    backends: tuple[str, ...] = ("gloo", "nccl"),
) -> dict[str, LocalModel]:
    """The configured --model (if any), every complete model in the store, and the bundled
    model when it is installed. A store dir that is partial or unreadable is left out with a
    log line: `shoal audit` and its manifest say what is wrong with it."""
    found: dict[str, LocalModel] = {}

    def allowed(model_id: str) -> tuple[str, ...]:  # what the node runs and the card permits
        return card_for(cards or {}, model_id).backends_on(backends)

    if configured is not None:
        model_id, path = configured
        found[model_id] = describe(model_id, path, device, backends=allowed(model_id))
    for stored in store.models() if store is not None else ():
        if stored.model_id in found:
            continue
        card = card_for(cards or {}, stored.model_id)
        manifest = build_manifest(stored.model_id, stored.path)
        if manifest.partials or manifest.missing:
            log.info(
                "not serving %s from %s: %s",
                stored.model_id,
                stored.path,
                "partial download" if manifest.partials else f"missing {manifest.missing}",
            )
            continue
        try:
            path = load_path(stored.path, card.file)
            found[stored.model_id] = describe(
                stored.model_id, path, device, stored.path, manifest, allowed(stored.model_id)
            )
        except Exception as exc:  # one bad dir must not stop the node
            log.warning("not serving %s from %s: %s", stored.model_id, stored.path, exc)
    try:
        bundled = bundled_model_path()
    except FileNotFoundError:
        return found
    if BUNDLED_MODEL_ID not in found:
        found[BUNDLED_MODEL_ID] = describe(
            BUNDLED_MODEL_ID, bundled, device, backends=allowed(BUNDLED_MODEL_ID)
        )
    return found


def _gguf_shape(path: Path) -> tuple[ModelConfig, int, int]:
    import gguf

    from shoal.engine.weights import read_gguf_metadata

    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf_fields(
        read_gguf_metadata(reader), has_output_weight="output.weight" in names
    )
    return config, sum(int(t.n_elements) for t in reader.tensors), path.stat().st_size


def _hf_shape(path: Path, lenient: bool = False) -> tuple[ModelConfig, int, int]:
    """(config, parameters, bytes of tensor data) from config.json and the safetensors
    headers. A quantized tensor's bytes are what it takes loaded on mlx; its element count is
    of its packed words. lenient: any architecture (mlx-lm's business), for the MLX engine."""
    if lenient:
        from shoal.engine_mlx.load import check_dir, serving_config

        config = serving_config(check_dir(path))
    else:
        config = ModelConfig.from_hf_dir(path)
    params = data_bytes = 0
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:  # the header alone: 8-byte length, then JSON
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        params += sum(math.prod(v["shape"]) for v in tensors)
        data_bytes += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in tensors)
    return config, params, data_bytes
