"""What a node holds of a model, file by file: the input of `shoal audit`.

The file list is the serving artifacts only: huggingface_hub's `.cache/huggingface` metadata
differs naturally between nodes and is left out. Partial-download markers are looked for
everywhere, that metadata dir included, since that is where an interrupted download leaves them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from shoal.models.store import HF_CACHE_DIR

PARTIAL_SUFFIXES = (".incomplete", ".part")
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
HASH_CHUNK = 1 << 20


class ManifestFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the model dir, '/' separated
    size: int
    sha256: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_id: str
    dir: str  # absolute, as this node sees it (MODEL_DIRS in the bootstrap hand-off)
    format: str  # safetensors | gguf | mixed | unknown
    files: tuple[ManifestFile, ...] = ()
    partials: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # required files that are absent
    safetensors_count: int = 0
    gguf_count: int = 0
    total_bytes: int = 0
    hashed: bool = False

    @property
    def digest(self) -> str:
        """Parity in one string: paths and sizes (and hashes when taken)."""
        return files_digest(self.files)


def files_digest(files: tuple[ManifestFile, ...]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.sha256 or ''}\n".encode())
    return h.hexdigest()[:16]


def is_partial(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIXES)


def _is_cache(rel: Path) -> bool:
    return rel.parts[:2] == (HF_CACHE_DIR, "huggingface")


def build_manifest(model_id: str, path: Path, *, hash: bool = False) -> Manifest:
    """The manifest of a model dir, or of a single GGUF file (its dir holds other things)."""
    if path.is_file():
        root, rels = path.parent, [Path(path.name)]
        partials = sorted(p.name for p in root.glob(path.name + ".*") if is_partial(p.name))
    else:
        root = path
        rels, partials = [], []
        for file in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
            rel = file.relative_to(root)
            if is_partial(file.name):
                partials.append(rel.as_posix())
            elif not _is_cache(rel):
                rels.append(rel)
    files = tuple(_entry(root, rel, hash) for rel in rels)
    names = {f.path for f in files}
    safetensors = sum(1 for n in names if n.endswith(".safetensors"))
    ggufs = sum(1 for n in names if n.endswith(".gguf"))
    fmt = (
        "mixed"
        if safetensors and ggufs
        else "safetensors"
        if safetensors
        else "gguf"
        if ggufs
        else "unknown"
    )
    return Manifest(
        model_id=model_id,
        dir=str(path.resolve()),
        format=fmt,
        files=files,
        partials=tuple(partials),
        missing=tuple(missing_required(fmt, names, root)),
        safetensors_count=safetensors,
        gguf_count=ggufs,
        total_bytes=sum(f.size for f in files),
        hashed=hash,
    )


def _entry(root: Path, rel: Path, hash: bool) -> ManifestFile:
    file = root / rel
    try:
        size = file.stat().st_size
    except OSError:  # a dangling symlink: present by name, absent in fact
        return ManifestFile(path=rel.as_posix(), size=-1)
    return ManifestFile(path=rel.as_posix(), size=size, sha256=_sha256(file) if hash else None)


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def missing_required(fmt: str, names: set[str], root: Path) -> list[str]:
    """Files a format cannot load without: config, tokenizer, and for sharded safetensors the
    index plus every shard it names. A GGUF file carries its own config and tokenizer."""
    if fmt == "gguf":
        return []
    if fmt in ("unknown", "mixed") and not names:
        return ["config.json", "*.safetensors or *.gguf"]
    missing = [] if "config.json" in names else ["config.json"]
    if not any(t in names for t in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if not shards:
        missing.append("*.safetensors")
    elif len(shards) > 1 or INDEX_FILE in names:
        if INDEX_FILE not in names:
            missing.append(INDEX_FILE)
        else:
            missing += [s for s in _indexed_shards(root / INDEX_FILE) if s not in names]
    return missing


def _indexed_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, AttributeError):
        return [f"{INDEX_FILE} (unreadable)"]
