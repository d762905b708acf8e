"""Two models' greedy outputs side by side: how often they agree, and how each scores."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from slmflow.evaluation.data import load_eval_set
from slmflow.evaluation.runner import ModelRunner
from slmflow.evaluation.scorers import exact_match, token_agreement


@dataclass(frozen=True)
class Comparison:
    run_id: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]]


def compare(uri_a: str, uri_b: str, data: str) -> Comparison:
    """Run both models over `data` (greedily, unless a row sets its own sampling); log agreement, each
    model's accuracy and the per-row diff."""
    import mlflow

    eval_set = load_eval_set(data)
    runners = ModelRunner(uri_a), ModelRunner(uri_b)
    rows = []
    for row in eval_set.rows:
        a, b = (runner.predict(row).text for runner in runners)
        rows.append(
            {
                "input": row.get("prompt") or row["messages"][-1]["content"],
                "expected": row.get("expected"),
                "a": a,
                "b": b,
                "identical": a == b,
                # Word tokens: the two models need not share a tokenizer.
                "token_agreement": token_agreement(a.split(), b.split()),
            }
        )
    metrics = {
        "identical_share": sum(1 for r in rows if r["identical"]) / len(rows),
        "mean_token_agreement": statistics.fmean(r["token_agreement"] for r in rows),
    }
    for side in ("a", "b"):
        scored = [exact_match(r[side], r["expected"]) for r in rows if r["expected"] is not None]
        if scored:
            metrics[f"accuracy_{side}"] = sum(1 for hit in scored if hit) / len(scored)
    with mlflow.start_run(run_name="compare") as run:
        mlflow.log_params({"model_a": uri_a, "model_b": uri_b, "dataset": eval_set.name, "dataset_rows": len(rows)})
        mlflow.log_metrics(metrics)
        mlflow.log_table({key: [str(r[key]) for r in rows] for key in rows[0]}, artifact_file="comparison.json")
        mlflow.log_text(_diff_text(rows), "diff.md")
    return Comparison(run.info.run_id, metrics, rows)


def _diff_text(rows: list[dict[str, Any]]) -> str:
    lines = ["| # | input | A | B |", "|---|---|---|---|"]
    for number, row in enumerate(rows, start=1):
        if not row["identical"]:
            lines.append(f"| {number} | {row['input']} | {row['a']} | {row['b']} |")
    if len(lines) == 2:
        lines.append("| | all outputs identical | | |")
    return "\n".join(lines) + "\n"
