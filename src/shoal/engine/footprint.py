"""What a weight costs in memory once the torch engine holds it: the pure twin of
engine.quant.make_linear, importable without torch (the node sizes models for placement
without loading them)."""

from __future__ import annotations

GROUP = 32  # GGUF's 4-bit block, and the int4 group size the engine packs with
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # kept 4-bit without loss; other quantized types: int8
QUANTIZE_MODES = ("auto", "int8", "none")


def held_bits(kind: str, rows: int, device: str, quantize: str) -> int | None:
    """How the loader will hold a matrix stored as `kind` (a GGUF type, or a safetensors dtype:
    F32, F16, BF16): 4 or 8 (quantized), 16 (kept 16-bit), or None for the compute dtype.
    The pure twin of make_linear, for what a model costs before it is loaded."""
    if device.split(":")[0] != "cpu" or quantize == "none":
        return None
    if kind in INT4_TYPES:
        return 4 if rows % 16 == 0 else 8
    if kind not in ("F32", "F16", "BF16"):
        return 8
    if quantize == "int8":
        return 8
    return 16 if kind in ("F16", "BF16") else None


def held_bytes(bits: int | None, rows: int, cols: int, compute_bytes: int) -> int:
    """Resident bytes of a [rows, cols] matrix held as `bits` (see held_bits, QuantWeight)."""
    if bits == 4:
        return rows * cols // 2 + rows * (cols // GROUP) * 4
    if bits == 8:
        return rows * cols + rows * 2
    return rows * cols * (2 if bits == 16 else compute_bytes)
