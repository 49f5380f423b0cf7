"""The GPUs torch can use on this machine, found without importing torch where none can be.

Importing torch costs a process ~230 MB resident and ~2 s; the node process itself runs no
model (its runners do), so it imports torch only where there is something for torch to find:
an NVIDIA driver (CUDA) or an Apple-silicon Mac (MPS).
"""

from __future__ import annotations

import functools
import platform
import shutil
from pathlib import Path

from shoal.runner.spec import apple_silicon
from shoal.schema.report import GpuInfo


def could_have_gpu(system: str, machine: str, nvidia_driver: bool) -> bool:
    return nvidia_driver or apple_silicon(system, machine)


def nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


@functools.cache
def torch_gpus() -> tuple[GpuInfo, ...]:
    """CUDA devices (name, memory) and the Apple GPU, as torch sees them."""
    if not could_have_gpu(platform.system(), platform.machine(), nvidia_driver()):
        return ()
    import torch

    gpus = [
        GpuInfo(
            name=torch.cuda.get_device_name(i),
            backend="cuda",
            memory_total=torch.cuda.get_device_properties(i).total_memory,
        )
        for i in range(torch.cuda.device_count())
    ]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        gpus.append(GpuInfo(name="Apple GPU", backend="mps"))
    return tuple(gpus)


def has(backend: str) -> bool:
    return any(g.backend == backend for g in torch_gpus())


def pick_device(requested: str = "auto") -> str:
    """--device auto: cuda where torch sees a CUDA GPU, else cpu."""
    if requested != "auto":
        return requested
    return "cuda" if has("cuda") else "cpu"
