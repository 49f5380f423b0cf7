"""What machine this is, in a few words: "MacBookPro18,2 · Apple M1 Max".

Read once at start (macOS: sysctl; Linux: DMI product name, or the device tree's model on boards
without DMI, and the CPU's model name from /proc/cpuinfo). Firmware fills unset fields with
placeholders ("To Be Filled By O.E.M."); `device_label` drops them. Reading never raises: a
machine that tells nothing is labelled by its OS and architecture.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from shoal.cluster.interfaces import run_tool

log = logging.getLogger(__name__)

SEPARATOR = " · "
PLACEHOLDERS = frozenset(
    {
        "",
        "to be filled by o.e.m.",
        "system product name",
        "system version",
        "default string",
        "none",
        "not specified",
        "not applicable",
        "n/a",
        "unknown",
        "o.e.m.",
        "oem",
        "x.x",
    }
)


def device_label(system: str, model: str, chip: str) -> str:
    """`model · chip`, leaving out placeholders and a part said twice; `system` only where
    both are placeholders."""
    parts: list[str] = []
    for part in (model, chip):
        text = " ".join(part.replace("\x00", " ").split())
        if text.lower() not in PLACEHOLDERS and text not in parts:
            parts.append(text)
    if parts:
        return SEPARATOR.join(parts)
    system = " ".join(system.split())
    return "" if system.lower() in PLACEHOLDERS else system


def cpu_model_name(cpuinfo: str) -> str:
    """The first "model name" line of /proc/cpuinfo; "" where there is none (many ARM boards)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "model name":
            return value.strip()
    return ""


def local_device_label(root: Path = Path("/")) -> str:
    """This machine's label; `root` stands in for / in tests."""
    system = platform.system()
    fallback = f"{system} {platform.machine()}".strip()
    try:
        if system == "Darwin":
            model = run_tool(["sysctl", "-n", "hw.model"]) or ""
            chip = run_tool(["sysctl", "-n", "machdep.cpu.brand_string"]) or ""
        else:
            model = _read(root / "sys/devices/virtual/dmi/id/product_name") or _read(
                root / "sys/firmware/devicetree/base/model"
            )
            chip = cpu_model_name(_read(root / "proc/cpuinfo"))
        return device_label(fallback, model, chip)
    except Exception as exc:  # a label is never worth a failed start
        log.debug("cannot read the device name: %s", exc)
        return fallback


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
