"""Models this node holds on its own disk, described without loading their weights."""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from shoal.engine.config import ModelConfig
from shoal.models.bundled import BUNDLED_MODEL_ID, bundled_model_path
from shoal.models.cards import ModelCard, card_for
from shoal.models.manifest import Manifest, build_manifest
from shoal.models.store import ModelStore, load_path
from shoal.schema.report import HeldModel

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
) -> LocalModel:
    """Read a model's shape from its metadata: GGUF header or config.json + safetensors headers.
    The digest of its manifest (paths and sizes) lets placement keep to nodes whose files agree."""
    config, params = _gguf_shape(path) if path.suffix == ".gguf" else _hf_shape(path)
    dtype_bytes = DTYPE_BYTES.get(device.split(":")[0], 4)
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
        files_digest=(manifest or build_manifest(model_id, source or path)).digest,
    )
    return LocalModel(model_id, path, held, source)


def local_models(
    configured: tuple[str, Path] | None,
    device: str = "cpu",
    store: ModelStore | None = None,
    cards: dict[str, ModelCard] | None = None,
) -> dict[str, LocalModel]:
    """The configured --model (if any), every complete model in the store, and the bundled
    model when it is installed. A store dir that is partial or unreadable is left out with a
    log line: `shoal audit` and its manifest say what is wrong with it."""
    found: dict[str, LocalModel] = {}
    if configured is not None:
        found[configured[0]] = describe(configured[0], configured[1], device)
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
            found[stored.model_id] = describe(
                stored.model_id, load_path(stored.path, card.file), device, stored.path, manifest
            )
        except Exception as exc:  # one bad dir must not stop the node
            log.warning("not serving %s from %s: %s", stored.model_id, stored.path, exc)
    try:
        bundled = bundled_model_path()
    except FileNotFoundError:
        return found
    if BUNDLED_MODEL_ID not in found:
        found[BUNDLED_MODEL_ID] = describe(BUNDLED_MODEL_ID, bundled, device)
    return found


def _gguf_shape(path: Path) -> tuple[ModelConfig, int]:
    import gguf

    from shoal.engine.weights import read_gguf_metadata

    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf_fields(
        read_gguf_metadata(reader), has_output_weight="output.weight" in names
    )
    return config, sum(int(t.n_elements) for t in reader.tensors)


def _hf_shape(path: Path) -> tuple[ModelConfig, int]:
    config = ModelConfig.from_hf_dir(path)
    params = 0
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:  # the header alone: 8-byte length, then JSON
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        params += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return config, params
