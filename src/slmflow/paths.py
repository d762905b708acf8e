"""Where slmflow keeps its own files (fixtures, caches)."""

from __future__ import annotations

import os
from pathlib import Path


def slmflow_home() -> Path:
    """`SLMFLOW_HOME`, or `~/.cache/slmflow`: tests point it at a temporary folder."""
    return Path(os.environ.get("SLMFLOW_HOME") or Path.home() / ".cache" / "slmflow")
