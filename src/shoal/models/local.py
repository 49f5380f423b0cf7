"""Models this node holds on its own disk, described without loading their weights."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import platform
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from shoal.engine.config import ModelConfig, UnsupportedModelError
from shoal.engine.footprint import held_bits, held_bytes
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
    quantize: str = "auto",
) -> LocalModel:
    """Read a model's shape from its metadata: GGUF header or config.json + safetensors headers.
    The digest of its manifest (paths and sizes) lets placement keep to nodes whose files agree.
    `backends` are those the node and the model's card allow; of them the held model keeps the
    ones whose engine loads it (an architecture only mlx-lm knows runs on ring/jaccl only)."""
    gguf = path.suffix == ".gguf"
    torch_ok = gguf or not mlx_quantized(path)  # shoal's torch engine reads no MLX packing
    try:
        config, tensors, data_bytes = _gguf_shape(path) if gguf else _hf_shape(path)
    except UnsupportedModelError:
        if gguf or not mlx_installed():
            raise
        config, tensors, data_bytes = _hf_shape(path, lenient=True)
        torch_ok = False
    params = sum(math.prod(shape) for _, _, shape in tensors)
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
        weight_bytes=torch_weight_bytes(tensors, config, device, quantize, dtype_bytes),
        dtype_bytes=dtype_bytes,
        context_length=config.max_position_embeddings,
        arch=config.arch,
        backends=tuple(b for b in backends if torch_ok or b in MLX_BACKENDS),
        mlx_layouts=mlx_layouts(config.arch) if mlx else (),
        mlx_weight_bytes=params * mlx_float_bytes if gguf else data_bytes,
        files_digest=(manifest or build_manifest(model_id, source or path)).digest,
    )
    return LocalModel(model_id, path, held, source)


Tensor = tuple[str, str, tuple[int, ...]]  # HF name, stored type (GGUF type or dtype), shape
_FUSED = re.compile(r".*\.(?:self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.weight")


def torch_weight_bytes(
    tensors: list[Tensor], config: ModelConfig, device: str, quantize: str, dtype_bytes: int
) -> int:
    """What the torch engine's weights take resident once loaded (engine.quant.held_bits):
    4-bit GGUF blocks 4-bit, other quantized types and --quantize int8 8-bit, 16-bit
    safetensors 16-bit on the CPU; the compute dtype elsewhere. A tied head is the
    embedding's bytes, counted once; a fused q|k|v or gate|up whose parts differ in bits is
    held as int8, as the loader does."""
    device = device.split(":")[0]
    bits: dict[str, int | None] = {}
    fused: dict[str, set[int | None]] = {}
    for name, kind, shape in tensors:
        if len(shape) < 2:
            continue
        rows = math.prod(shape[:-1])
        b = held_bits(kind, rows, device, quantize)
        if name == "model.embed_tokens.weight" and b == 4:
            b = 8  # embeddings are looked up by row: kept 8-bit
        bits[name] = b
        if _FUSED.fullmatch(name):  # keyed by layer and block: ...layers.3.self_attn
            fused.setdefault(name.rsplit(".", 2)[0], set()).add(b)
    total = 0
    for name, _, shape in tensors:
        if len(shape) < 2:
            total += math.prod(shape) * dtype_bytes
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the loader ties it to the embedding
        b = bits[name]
        parts = fused.get(name.rsplit(".", 2)[0], set()) if _FUSED.fullmatch(name) else set()
        if 4 in parts and len(parts) > 1:  # 4-bit beside other bits: cat_rows meets at int8
            b = 8
        total += held_bytes(b, math.prod(shape[:-1]), shape[-1], dtype_bytes)
    return total


def mlx_quantized(path: Path) -> bool:
    """An MLX dir whose weights mlx-lm's quantizer packed (mlx-community's 4-/8-bit)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization" in config


def mlx_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("mlx", "mlx_lm"))


_ASK_MLX_LM = (
    "import json, sys; from shoal.engine_mlx.load import supports; "
    "print(json.dumps(supports(sys.argv[1])))"
)


@functools.cache
def mlx_layouts(arch: str) -> tuple[str, ...]:
    """How mlx-lm can split `arch` across nodes (from its model classes), asked in a child
    process: importing mlx-lm pulls in transformers and torch, ~250 MB the node would keep
    for good for one answer per architecture."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _ASK_MLX_LM, arch],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        tensor, pipeline = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("cannot ask mlx-lm how it splits %s: %s", arch, exc)
        return ()
    return (*(("pipeline",) if pipeline else ()), *(("tensor",) if tensor else ()))


def local_models(
    configured: tuple[str, Path] | None,
    device: str = "cpu",
    store: ModelStore | None = None,
    cards: dict[str, ModelCard] | None = None,
    backends: tuple[str, ...] = ("gloo", "nccl"),
    quantize: str = "auto",
) -> dict[str, LocalModel]:
    """The configured --model (if any), every complete model in the store, and the bundled
    model when it is installed. A store dir that is partial or unreadable is left out with a
    log line: `shoal audit` and its manifest say what is wrong with it."""
    found: dict[str, LocalModel] = {}

    def allowed(model_id: str) -> tuple[str, ...]:  # what the node runs and the card permits
        return card_for(cards or {}, model_id).backends_on(backends)

    if configured is not None:
        model_id, path = configured
        found[model_id] = describe(
            model_id, path, device, backends=allowed(model_id), quantize=quantize
        )
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
                stored.model_id,
                path,
                device,
                stored.path,
                manifest,
                allowed(stored.model_id),
                quantize,
            )
        except Exception as exc:  # one bad dir must not stop the node
            log.warning("not serving %s from %s: %s", stored.model_id, stored.path, exc)
    try:
        bundled = bundled_model_path()
    except FileNotFoundError:
        return found
    if BUNDLED_MODEL_ID not in found:
        found[BUNDLED_MODEL_ID] = describe(
            BUNDLED_MODEL_ID,
            bundled,
            device,
            backends=allowed(BUNDLED_MODEL_ID),
            quantize=quantize,
        )
    return found


def _gguf_shape(path: Path) -> tuple[ModelConfig, list[Tensor], int]:
    from shoal.engine.gguf_file import GGUFFile, gguf_to_hf_name

    reader = GGUFFile(path)
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf_fields(
        reader.metadata, has_output_weight="output.weight" in names
    )
    tensors = [
        (gguf_to_hf_name(t.name), t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))
        for t in reader.tensors
    ]
    return config, tensors, path.stat().st_size


def _hf_shape(path: Path, lenient: bool = False) -> tuple[ModelConfig, list[Tensor], int]:
    """(config, tensors, bytes of tensor data) from config.json and the safetensors headers.
    A quantized tensor's bytes are what it takes loaded on mlx; its element count is of its
    packed words. lenient: any architecture (mlx-lm's business), for the MLX engine."""
    if lenient:
        from shoal.engine_mlx.load import check_dir, serving_config

        config = serving_config(check_dir(path))
    else:
        config = ModelConfig.from_hf_dir(path)
    tensors: list[Tensor] = []
    data_bytes = 0
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:  # the header alone: 8-byte length, then JSON
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, v in header.items():
            if name != "__metadata__":
                tensors.append((name, str(v["dtype"]), tuple(v["shape"])))
                data_bytes += v["data_offsets"][1] - v["data_offsets"][0]
    return config, tensors, data_bytes
