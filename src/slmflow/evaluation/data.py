"""Evaluation data: JSONL/CSV files of {messages | prompt, expected[, pattern][, params]} and the built-in sets."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from slmflow.errors import InvalidRequest, SlmflowError
from slmflow.generation.params import SamplingParams

BUILTIN_PREFIX = "builtin:"
BUILTIN_SETS = {
    # Held-out phrasings of the tiny fixture's training questions (see checkpoints/task.py).
    "capitals": "capitals_eval.jsonl",
    # 20 everyday questions for a real instruct model, most with a fact the answer must contain.
    "everyday": "everyday_eval.jsonl",
    # A plain English text of about 550 tokens, for perplexity (what `package` measures its cost on).
    "reference": "reference.txt",
}


# Generation settings a row may carry ("params"): its answer is generated with them, over the
# evaluation's defaults and under the caller's --params. `slmflow traces export` writes those of each
# served request, so that replaying it on the version that served it gives the same answer.
ROW_PARAMS = ("max_tokens", "stop", "temperature", "top_p", "top_k", "seed")


@dataclass(frozen=True)
class EvalSet:
    name: str
    rows: list[dict[str, Any]]
    digest: str  # identifies the data, so an earlier evaluation on it can be reused


def is_eval_set(source: str) -> bool:
    name = BUILTIN_SETS.get(source.removeprefix(BUILTIN_PREFIX), "") if source.startswith(BUILTIN_PREFIX) else source
    return Path(name).suffix.lower() in {".jsonl", ".json", ".csv"}


def load_eval_set(source: str) -> EvalSet:
    """Read `source`: `builtin:NAME`, or a .jsonl/.json/.csv file."""
    text, name = _read(source)
    suffix = Path(source).suffix.lower()
    rows = _csv_rows(text) if suffix == ".csv" else _json_rows(text, source)
    if not rows:
        raise SlmflowError(f"{source} holds no rows")
    rows = [_check_row(row, number) for number, row in enumerate(rows, start=1)]
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    return EvalSet(name=name, rows=rows, digest=digest)


def load_text(source: str) -> str:
    """A plain text file, for perplexity."""
    text, _ = _read(source)
    if not text.strip():
        raise SlmflowError(f"{source} is empty")
    return text


def _read(source: str) -> tuple[str, str]:
    if source.startswith(BUILTIN_PREFIX):
        key = source[len(BUILTIN_PREFIX) :]
        if key not in BUILTIN_SETS:
            raise SlmflowError(
                f"unknown built-in set {source!r}; choose one of {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_SETS)}"
            )
        return resources.files("slmflow.data").joinpath(BUILTIN_SETS[key]).read_text(), source
    try:
        return Path(source).read_text(), Path(source).name
    except (OSError, UnicodeDecodeError) as e:
        raise SlmflowError(f"cannot read {source}: {e.strerror if isinstance(e, OSError) else e}") from e


def _json_rows(text: str, source: str) -> list[Any]:
    stripped = text.strip()
    try:
        if stripped.startswith("["):
            return json.loads(stripped)
        return [json.loads(line) for line in stripped.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise SlmflowError(f"{source} is not valid JSON Lines: line {e.lineno}: {e.msg}") from e


def _csv_rows(text: str) -> list[dict[str, Any]]:
    rows = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        clean: dict[str, Any] = {k: v for k, v in row.items() if k and v not in (None, "")}
        if "messages" in clean:
            try:
                clean["messages"] = json.loads(clean["messages"])
            except json.JSONDecodeError as e:
                raise SlmflowError(f"a CSV messages cell is not JSON: {e.msg}") from e
        rows.append(clean)
    return rows


def _check_row(row: Any, number: int) -> dict[str, Any]:
    if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
        raise SlmflowError(f"row {number} needs exactly one of 'messages' or 'prompt'")
    for key in ("expected", "pattern", "prompt"):
        if key in row and not isinstance(row[key], str):
            raise SlmflowError(f"row {number}: {key!r} must be a string")
    if "params" in row:
        _check_params(row["params"], number)
    return {k: row[k] for k in ("messages", "prompt", "expected", "pattern", "params") if k in row}


def _check_params(params: Any, number: int) -> None:
    if not isinstance(params, dict) or not params.keys() <= set(ROW_PARAMS):
        raise SlmflowError(f"row {number}: 'params' must be an object of {', '.join(ROW_PARAMS)}")
    try:
        SamplingParams.from_mapping(params)
    except InvalidRequest as e:
        raise SlmflowError(f"row {number}: params: {e}") from e
