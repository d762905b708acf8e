"""Measured quality: evaluate a model on a data set (offline scorers), log it, link it to the version.

Summary metrics of an evaluation run (what gates refer to):
- `accuracy`: share of rows whose output equals `expected` exactly (stripped);
- `contains`: share whose output contains `expected` (case-insensitive);
- `regex`: share whose output matches the row's `pattern`;
- `mean_latency_s`, `p95_latency_s`, `tokens_per_s`, `mean_response_chars`;
- `perplexity` when asked: of the `expected` answers given their prompts for an evaluation set,
  or of the whole text for a plain text file.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from slmflow.errors import SlmflowError
from slmflow.evaluation.data import is_eval_set, load_eval_set, load_text
from slmflow.evaluation.runner import ModelRunner, Prediction
from slmflow.evaluation.scorers import contains, exact_match, mlflow_scorers, regex_match
from slmflow.registry import registered_version

EVAL_RUN_TAG = "slmflow.eval_run_id"  # set on a model version: its latest evaluation run
EVAL_OF_TAG = "slmflow.eval_of"  # set on an evaluation run: "name/version" it measured
DIGEST_TAG = "slmflow.eval_dataset_digest"


@dataclass
class EvalReport:
    run_id: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False


def evaluate(
    model_uri: str,
    data: str | None = None,
    *,
    perplexity_text: str | None = None,
    params: dict[str, Any] | None = None,
) -> EvalReport:
    """Evaluate `model_uri` on `data` and/or score `perplexity_text`, in a new MLflow run."""
    import mlflow

    if data is None and perplexity_text is None:
        raise SlmflowError("nothing to evaluate: give --data and/or --perplexity")
    eval_set = load_eval_set(data) if data else None
    version = registered_version(model_uri)
    runner = ModelRunner(model_uri, params)
    with mlflow.start_run(run_name=f"eval-{eval_set.name if eval_set else 'perplexity'}") as run:
        mlflow.log_params(
            {"model_uri": model_uri, "flavor": runner.flavor, **({"params": str(params)} if params else {})}
        )
        if version:
            mlflow.set_tag(EVAL_OF_TAG, f"{version[0]}/{version[1]}")
        metrics: dict[str, float] = {}
        rows: list[dict[str, Any]] = []
        if eval_set:
            mlflow.log_params({"dataset": eval_set.name, "dataset_rows": len(eval_set.rows)})
            mlflow.set_tag(DIGEST_TAG, eval_set.digest)
            rows, row_metrics = _score_rows(runner, eval_set.rows)
            metrics |= row_metrics
        if perplexity_text:
            metrics["perplexity"], metrics["perplexity_tokens"] = _perplexity(runner, perplexity_text)
            mlflow.log_param("perplexity_data", perplexity_text)
        mlflow.log_metrics(metrics)
        mlflow.log_dict({"model_uri": model_uri, "metrics": metrics}, "eval_summary.json")
    if version:
        _link(version, run.info.run_id)
    return EvalReport(run.info.run_id, metrics, rows)


def _perplexity(runner: ModelRunner, source: str) -> tuple[float, int]:
    if is_eval_set(source):
        return runner.answer_perplexity(load_eval_set(source).rows)
    return runner.text_perplexity(load_text(source))


def _score_rows(runner: ModelRunner, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Predict every row, log MLflow GenAI assessments and the per-row table; return summary metrics."""
    import mlflow

    predictions = [runner.predict(row) for row in rows]
    with contextlib.redirect_stdout(sys.stderr), _scoring_workers(2):  # its banner would corrupt our --json output
        mlflow.genai.evaluate(data=_genai_records(rows, predictions), scorers=mlflow_scorers())
    table = [_table_row(row, p) for row, p in zip(rows, predictions, strict=True)]
    mlflow.log_table(
        {key: [str(r.get(key)) for r in table] for key in table[0]},
        artifact_file="eval_table.json",
    )
    return table, _summary(table, predictions)


@contextlib.contextmanager
def _scoring_workers(count: int) -> Iterator[None]:
    """Have `mlflow.genai.evaluate` score with `count` threads unless the user chose a number.

    Its default of 10 threads each writing a trace to a SQLite store exhausted SQLAlchemy's
    connection pool: every row waited out a 30 s pool timeout and the traces were lost (measured:
    100 s for 60 rows, 60 "Failed to log trace" warnings; 2 threads: a few seconds, none lost). Our
    scorers are string checks, so more threads buy nothing anyway.
    """
    name = "MLFLOW_GENAI_EVAL_MAX_WORKERS"
    chosen = os.environ.get(name)
    os.environ[name] = chosen or str(count)
    try:
        yield
    finally:
        if chosen is None:
            os.environ.pop(name, None)


def _genai_records(rows: list[dict[str, Any]], predictions: list[Prediction]) -> list[dict[str, Any]]:
    records = []
    for row, prediction in zip(rows, predictions, strict=True):
        expectations = {
            k: v for k, v in (("expected_response", row.get("expected")), ("pattern", row.get("pattern"))) if v
        }
        records.append(
            {
                "inputs": {k: row[k] for k in ("messages", "prompt") if k in row},
                "outputs": prediction.as_outputs(),
                "expectations": expectations,
            }
        )
    return records


def _table_row(row: dict[str, Any], prediction: Prediction) -> dict[str, Any]:
    question = row.get("prompt") or row["messages"][-1]["content"]
    return {
        "input": question,
        "expected": row.get("expected"),
        "output": prediction.text,
        "exact_match": exact_match(prediction.text, row.get("expected")),
        "contains": contains(prediction.text, row.get("expected")),
        "regex": regex_match(prediction.text, row.get("pattern")),
        "latency_s": round(prediction.latency_s, 4),
        "completion_tokens": prediction.completion_tokens,
    }


def _summary(table: list[dict[str, Any]], predictions: list[Prediction]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, metric in (("exact_match", "accuracy"), ("contains", "contains"), ("regex", "regex")):
        scored = [r[name] for r in table if r[name] is not None]
        if scored:
            metrics[metric] = sum(scored) / len(scored)
    latencies = sorted(p.latency_s for p in predictions)
    metrics["mean_latency_s"] = statistics.fmean(latencies)
    metrics["p95_latency_s"] = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    metrics["mean_response_chars"] = statistics.fmean(len(p.text) for p in predictions)
    tokens = [p.completion_tokens for p in predictions]
    if all(t is not None for t in tokens):
        metrics["tokens_per_s"] = sum(tokens) / sum(latencies)  # type: ignore[arg-type]
    return metrics


def _link(version: tuple[str, str], run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_model_version_tag(version[0], version[1], EVAL_RUN_TAG, run_id)


def find_eval_run(name: str, version: str, digest: str) -> EvalReport | None:
    """The latest finished evaluation of `name/version` on the data with `digest`, if any."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{EVAL_OF_TAG}` = '{name}/{version}' and tags.`{DIGEST_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        return None
    return EvalReport(runs[0].info.run_id, dict(runs[0].data.metrics), reused=True)
