"""The device label: model and chip, without firmware placeholders, read without failing."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.cluster.machine import cpu_model_name, device_label, local_device_label

# (system, model, chip) -> label
LABEL_CASES = {
    "mac": (("Darwin arm64", "MacBookPro18,2", "Apple M1 Max"), "MacBookPro18,2 · Apple M1 Max"),
    "linux_box": (
        ("Linux x86_64", "PowerEdge R750", "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"),
        "PowerEdge R750 · Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
    ),
    "oem_placeholder_model": (
        ("Linux x86_64", "To Be Filled By O.E.M.", "AMD Ryzen 9 7950X 16-Core Processor"),
        "AMD Ryzen 9 7950X 16-Core Processor",
    ),
    "asus_placeholder": (("Linux x86_64", "System Product Name", "AMD Ryzen 7"), "AMD Ryzen 7"),
    "default_string": (("Linux x86_64", "Default string", "Intel i5"), "Intel i5"),
    "none_text": (("Linux x86_64", "None", "Intel i5"), "Intel i5"),
    "no_cpu_model_name": (("Linux aarch64", "Jetson AGX Orin", ""), "Jetson AGX Orin"),
    "device_tree_nul_and_spaces": (
        ("Linux aarch64", "Raspberry Pi 5 Model B Rev 1.0\x00", "  Cortex  A76 "),
        "Raspberry Pi 5 Model B Rev 1.0 · Cortex A76",
    ),
    "same_part_twice": (("Linux x86_64", "Apple M2", "Apple M2"), "Apple M2"),
    "nothing_known_falls_back_to_system": (("Linux x86_64", "", "  "), "Linux x86_64"),
    "nothing_at_all": (("", "None", ""), ""),
}


@pytest.mark.parametrize(("parts", "label"), LABEL_CASES.values(), ids=LABEL_CASES)
def test_device_label(parts: tuple[str, str, str], label: str) -> None:
    assert device_label(*parts) == label


CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) @ 2.30GHz\n"


@pytest.mark.parametrize(
    ("text", "name"),
    [(CPUINFO, "Intel(R) Xeon(R) @ 2.30GHz"), ("processor : 0\nBogoMIPS : 50.00\n", ""), ("", "")],
)
def test_cpu_model_name(text: str, name: str) -> None:
    assert cpu_model_name(text) == name


def test_reading_a_machine_that_tells_nothing_does_not_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("platform.system", lambda: "Linux")
    monkeypatch.setattr("platform.machine", lambda: "riscv64")
    assert local_device_label(tmp_path) == "Linux riscv64"
    dmi = tmp_path / "sys/devices/virtual/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "product_name").write_text("ThinkStation P620\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(CPUINFO)
    assert local_device_label(tmp_path) == "ThinkStation P620 · Intel(R) Xeon(R) @ 2.30GHz"
