"""Served requests, recorded as traces by `slmflow serve`, turned into evaluation data.

Each exported row is the request's messages (or prompt), the answer that was served as `expected`
and the settings that decided it (`params`: see `replayed_params`), so `slmflow eval --data FILE`
against a candidate version measures how often it answers as production did, and `slmflow compare`
shows where it differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from slmflow.errors import SlmflowError
from slmflow.generation.params import SamplingParams

STATUSES = ("ok", "cancelled", "timed_out", "error")


@dataclass(frozen=True)
class TraceFilter:
    since: datetime | None = None
    until: datetime | None = None
    model_version: str | None = None
    status: str | None = "ok"  # ok, cancelled, timed_out, error (any error_<status>), or None: all

    def filter_string(self) -> str:
        clauses = []
        if self.since:
            clauses.append(f"trace.timestamp_ms >= {int(self.since.timestamp() * 1000)}")
        if self.until:
            clauses.append(f"trace.timestamp_ms <= {int(self.until.timestamp() * 1000)}")
        if self.model_version:
            clauses.append(f"tags.`slmflow.model_version` = '{self.model_version}'")
        if self.status and self.status != "error":
            clauses.append(f"tags.`slmflow.status` = '{self.status}'")
        return " AND ".join(clauses)


def export_traces(experiment: str, output: Path, where: TraceFilter, limit: int = 10_000) -> int:
    """Write the served requests of `experiment` matching `where` as JSONL eval rows; return how many."""
    import mlflow

    if where.status is not None and where.status not in STATUSES:
        raise SlmflowError(f"unknown status {where.status!r}; choose one of {', '.join(STATUSES)}")
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise SlmflowError(f"no experiment named {experiment!r}: it holds the traces `slmflow serve` recorded")
    traces = mlflow.search_traces(
        locations=[found.experiment_id],
        filter_string=where.filter_string() or None,
        max_results=limit,
        return_type="list",
    )
    rows = [row for trace in traces if (row := _row(trace, where)) is not None]
    if not rows:
        raise SlmflowError(f"no served request in {experiment!r} matches; nothing written")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    partial.replace(output)
    return len(rows)


def _row(trace: Any, where: TraceFilter) -> dict[str, Any] | None:
    """An eval row from one trace: None for traces without content or a served answer."""
    tags = trace.info.tags
    if where.status == "error" and not tags.get("slmflow.status", "").startswith("error_"):
        return None
    root = next((span for span in trace.data.spans if span.parent_id is None), None)
    if root is None or not isinstance(root.inputs, dict) or not isinstance(root.outputs, dict):
        return None
    inputs, choices = root.inputs, root.outputs.get("choices") or []
    if not choices or "text" not in choices[0]:  # recorded without content (trace_content off)
        return None
    question = {key: inputs[key] for key in ("messages", "prompt") if key in inputs}
    if not question:
        return None
    params = replayed_params(inputs)
    if "max_tokens" not in params and (bound := _served_bound(root.outputs)) is not None:
        params["max_tokens"] = bound
    return {
        **question,
        "expected": choices[0]["text"],
        **({"params": params} if params else {}),
        "trace_id": trace.info.trace_id,
        "model_version": tags.get("slmflow.model_version"),
    }


def _served_bound(outputs: dict[str, Any]) -> int | None:
    """The length that cut a served answer whose request set no max_tokens: the server's own bound
    (the served model's packaged max_tokens, else the room left in its context), which the version
    it is replayed on need not share (another packaged max_tokens, or the evaluation's 256). None
    where the answer ended on its own, or where usage counts several choices."""
    choices, usage = outputs.get("choices") or [], outputs.get("usage") or {}
    tokens = usage.get("completion_tokens")
    if len(choices) == 1 and choices[0].get("finish_reason") == "length" and isinstance(tokens, int) and tokens > 0:
        return tokens
    return None


def replayed_params(request: dict[str, Any]) -> dict[str, Any]:
    """The settings of a served request that decided its answer, for its replay: its length bound and
    stop sequences; its sampling where the request set a temperature, and only if that is greedy or
    seeded (an unseeded sample cannot be reproduced: such a row, like one that left the temperature
    to the model, is evaluated greedily, the evaluation's default)."""
    sampling = SamplingParams.from_mapping(request)  # the server's own reading of the request
    params: dict[str, Any] = {}
    if sampling.max_tokens is not None:
        params["max_tokens"] = sampling.max_tokens
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    temperature = sampling.temperature
    if temperature == 0 or (temperature is not None and sampling.seed is not None):
        sampled = {key: getattr(sampling, key) for key in ("temperature", "top_p", "top_k", "seed")}
        params.update({key: value for key, value in sampled.items() if value is not None})
    return params
