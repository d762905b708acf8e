"""Resolve what the user names as a model source: a local folder, a GGUF file or a Hugging Face hub id.

Offline-first: a hub id is looked up in the local Hugging Face cache before the hub is asked, and
the hub is never asked when `HF_HUB_OFFLINE` is set.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slmflow.errors import SlmflowError

SourceKind = Literal["hf", "onnx", "gguf"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


@dataclass(frozen=True)
class Checkpoint:
    """A model folder on disk and what it holds."""

    path: Path  # a folder; for "gguf", the GGUF file
    kind: SourceKind  # "hf": a Hugging Face checkpoint; "onnx": an ONNX Runtime GenAI folder; "gguf"
    source: str  # what the user named, for run params

    @property
    def architecture(self) -> str | None:
        if self.kind == "hf":
            archs = _read_json(self.path / "config.json").get("architectures") or [None]
            return archs[0]
        if self.kind == "gguf":
            from slmflow.checkpoints import gguf

            return gguf.inspect(self.path).architecture
        return _read_json(self.path / "genai_config.json").get("model", {}).get("type")


def resolve(source: str) -> Checkpoint:
    """Find `source` (a folder, or a hub id optionally followed by a subfolder) on disk."""
    path = Path(source).expanduser()
    if path.exists():
        return _inspect_folder(path, source)
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return _inspect_folder(_from_hub(source), source)
    raise SlmflowError(f"model source not found: {source!r} is neither a folder nor a Hugging Face hub id")


def _inspect_folder(path: Path, source: str) -> Checkpoint:
    from slmflow.checkpoints import gguf

    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise SlmflowError(f"model source {source!r} is not readable")
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not gguf.is_gguf(path):
            raise SlmflowError(
                f"model source {source!r} is a file, but not a GGUF file; give a model folder or a .gguf"
            )
        kind: SourceKind = "gguf"
    elif (path / "genai_config.json").is_file():
        kind = "onnx"
    elif (path / "config.json").is_file():
        kind = "hf"
    elif found := gguf.find_gguf(path):
        path, kind = found, "gguf"
    else:
        raise SlmflowError(
            f"{source!r} is neither a Hugging Face checkpoint (no config.json), an ONNX Runtime GenAI model "
            "(no genai_config.json) nor a folder holding a .gguf file"
        )
    checkpoint = Checkpoint(path=path.resolve(), kind=kind, source=source)
    checkpoint.architecture  # noqa: B018 - fails early on an unreadable config or a damaged GGUF
    return checkpoint


def _from_hub(hub_id: str) -> Path:
    """Download (or find in the cache) `owner/name[/subfolder]` and return the folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    owner, name, *sub = hub_id.split("/")
    repo_id, subfolder = f"{owner}/{name}", "/".join(sub)
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if _offline():
            raise SlmflowError(
                f"{hub_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "pass a local folder or download it first"
            ) from None
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise SlmflowError(f"cannot fetch {hub_id!r} from the Hugging Face hub: {_first_line(e)}") from e
    return Path(folder) / subfolder if subfolder else Path(folder)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SlmflowError(f"cannot read {path}: {_first_line(e)}") from e
