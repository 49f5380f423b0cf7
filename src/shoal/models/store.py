"""Where models live on disk: one writable store plus extra read-only dirs.

A model's dir is its Hugging Face id with `/` replaced by `--` (exo's convention, so an
existing exo store can be named as a read-only dir and works as is):
`<store>/HuggingFaceTB--SmolLM2-135M-Instruct/config.json`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "SHOAL_MODELS_DIR"
READONLY_DIRS_ENV = "SHOAL_MODELS_READONLY_DIRS"  # os.pathsep-separated
HF_CACHE_DIR = ".cache"  # huggingface_hub's local-dir metadata; never a serving artifact


def dir_name(model_id: str) -> str:
    """`org/name` -> `org--name`: one path component, reversible for ids without `--`."""
    return model_id.strip("/").replace("/", "--")


def model_id_of(name: str) -> str:
    """`org--name` -> `org/name`; a dir name without `--` is its own id."""
    return name.replace("--", "/", 1)


def validate_model_id(model_id: str) -> str:
    """An id that is safe as a dir name: `org/name` or `name`, no `..`, no empty parts."""
    parts = model_id.split("/")
    if not model_id or len(parts) > 2 or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{model_id!r} is not a model id: use ORG/NAME as on Hugging Face")
    if any(c.isspace() or c == "\\" for c in model_id):
        raise ValueError(f"{model_id!r} is not a model id: no spaces or backslashes")
    return model_id


def gguf_files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*.gguf") if p.is_file())


def looks_like_model(path: Path) -> bool:
    """An HF dir (config.json) or a dir of GGUF files; contents are checked by the manifest."""
    return path.is_dir() and ((path / "config.json").is_file() or bool(gguf_files(path)))


def load_path(model_dir: Path, file: str | None = None) -> Path:
    """What the engine loads: the dir for safetensors, else the GGUF file (the card's choice,
    or the only/first one)."""
    if file:
        return model_dir / file
    if (model_dir / "config.json").is_file():
        return model_dir
    ggufs = gguf_files(model_dir)
    return ggufs[0] if ggufs else model_dir


@dataclass(frozen=True)
class StoredModel:
    model_id: str
    path: Path  # the model's dir
    writable: bool  # in the store shoal downloads into, not a read-only extra dir


@dataclass(frozen=True)
class ModelStore:
    root: Path  # downloads land here
    readonly: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, data_dir: Path, env: Mapping[str, str] = os.environ) -> ModelStore:
        root = Path(env.get(MODELS_DIR_ENV) or data_dir / "models").expanduser()
        return cls(root, parse_dirs(env.get(READONLY_DIRS_ENV, "")))

    def dir_for(self, model_id: str) -> Path:
        """Where a download of this model goes."""
        return self.root / dir_name(validate_model_id(model_id))

    def find(self, model_id: str) -> StoredModel | None:
        """The first dir holding this model: the writable store first, then the extra dirs."""
        name = dir_name(model_id)
        for base, writable in self._bases():
            path = base / name
            if looks_like_model(path):
                return StoredModel(model_id, path, writable)
        return None

    def models(self) -> Iterator[StoredModel]:
        """Every model dir, each id once (the writable store wins)."""
        seen: set[str] = set()
        for base, writable in self._bases():
            if not base.is_dir():
                continue
            for path in sorted(base.iterdir()):
                model_id = model_id_of(path.name)
                if model_id not in seen and looks_like_model(path):
                    seen.add(model_id)
                    yield StoredModel(model_id, path, writable)

    def _bases(self) -> Iterator[tuple[Path, bool]]:
        yield self.root, True
        for extra in self.readonly:
            yield extra, False


def parse_dirs(text: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in text.split(os.pathsep) if p.strip())
