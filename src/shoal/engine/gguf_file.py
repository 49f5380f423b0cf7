"""A lean GGUF reader: the key/values and tensor table from the header, tensor data as views
of one read-only memory map.

gguf's GGUFReader builds numpy objects for every element of every array field; for a 49k-token
vocabulary that is ~4 s and ~160 MB before the first weight is read, in every process that
looks at the file (the node describing it, each runner loading it). Here array fields are
skipped by length and kept only as their length (`<key>.length`), which is all that
placement and the engine read; the tokenizer, which needs the vocabulary, still reads it with
gguf (once, then from its cache).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF this reader understands."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: the row length first (ne0, ne1, ...)
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # F32/F16: values [.., rows, cols]; other types: bytes [.., rows, bytes]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise GGUFError("the file ends inside its header")
    return struct.unpack("<" + fmt, raw)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    raise GGUFError(f"unknown GGUF value type {kind}")


def _skip_array(f: BinaryIO, kind: int, count: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize("<" + _SCALARS[kind]) * count, 1)
    elif kind == _STRING:
        for _ in range(count):
            f.seek(_read(f, "Q"), 1)
    elif kind == _ARRAY:
        for _ in range(count):
            _skip_array(f, _read(f, "I"), _read(f, "Q"))
    else:
        raise GGUFError(f"unknown GGUF array type {kind}")


class GGUFFile:
    """metadata: key -> value (arrays as `<key>.length`); tensors: in file order."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self.metadata: dict[str, Any] = {}
        infos = []
        with self.path.open("rb") as f:
            if f.read(4) != MAGIC:
                raise GGUFError(f"{self.path} is not a GGUF file (no GGUF magic)")
            version = _read(f, "I")
            if version not in (2, 3):
                raise GGUFError(f"{self.path}: GGUF version {version} is not supported")
            n_tensors, n_kv = _read(f, "Q"), _read(f, "Q")
            for _ in range(n_kv):
                key, kind = _string(f), _read(f, "I")
                if kind == _ARRAY:
                    item, count = _read(f, "I"), _read(f, "Q")
                    self.metadata[key + ".length"] = count
                    _skip_array(f, item, count)
                else:
                    self.metadata[key] = _value(f, kind)
            for _ in range(n_tensors):
                name = _string(f)
                dims = tuple(_read(f, "Q") for _ in range(_read(f, "I")))
                infos.append((name, dims, _read(f, "I"), _read(f, "Q")))
            alignment = int(self.metadata.get("general.alignment", 32))
            start = -(-f.tell() // alignment) * alignment
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors = []
        for name, dims, kind, offset in infos:
            qtype = gguf.GGMLQuantizationType(kind)
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            rows = tuple(reversed(dims[1:]))
            nbytes = int(np.prod(dims)) // block * block_bytes
            raw = self._map[start + offset : start + offset + nbytes]
            if qtype.name in ("F32", "F16"):  # as gguf's reader: typed values, else bytes
                data = raw.view(np.float32 if qtype.name == "F32" else np.float16)
                data = data.reshape(*rows, dims[0])
            else:
                data = raw.reshape(*rows, dims[0] // block * block_bytes)
            self.tensors.append(GGUFTensor(name, dims, qtype, data))


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.gate",  # the experts' router
    # every expert stacked in one 3-D tensor: GGUFSource serves them one by one
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}

_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def gguf_to_hf_name(name: str) -> str:
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES.get(part, part)}.{kind}"
    base, _, kind = name.rpartition(".")
    return f"{_GGUF_GLOBAL_NAMES.get(base, base)}.{kind}"
