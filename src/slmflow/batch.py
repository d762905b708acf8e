"""Batch inference on Apache Spark: an `onnx_genai` model over a Spark DataFrame or a file.

Scoring goes through `mlflow.pyfunc.spark_udf(env_manager="local")`, applied to a *scoring copy* of
the model: the same MLflow model, with its pyfunc loader pointed at this module. Why not the model's
own pyfunc:
- Spark needs one result per row. The flavor's `predict` answers a whole batch or raises for all of
  it; the scorer turns a bad row (an empty prompt, a prompt over the context length) into that row's
  `error` and answers the others.
- In local mode MLflow loads the model again in every task; the scorer keeps one loaded model per
  Python worker process, however many partitions that worker scores.
- The prompt task's `predict` returns text only; the scorer returns the finish reason and token
  counts of both tasks.
Each pandas batch Spark hands a worker is submitted to the engine at once, so the flavor's
scheduler batches the rows of a partition together, as one `predict` call on them would.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmflow.errors import SlmflowError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from slmflow.generation.engine import TokenStream
    from slmflow.generation.params import SamplingParams
    from slmflow.onnx_genai.pyfunc import OnnxGenAIPyfunc

RESULT_COLUMNS = ("completion", "finish_reason", "prompt_tokens", "completion_tokens", "error")
# The UDF returns each record as JSON: MLflow's struct results cannot hold nulls (None becomes the
# string "None", and a null count fails the cast), and an error row has no completion.
_RECORD_SCHEMA = "completion STRING, finish_reason STRING, prompt_tokens BIGINT, completion_tokens BIGINT, error STRING"
# Rows per pandas batch, hence per `predict` call: many engine batches (8 rows each by default) per
# call keep the partly filled last one rare, and the engine's queue takes 256 waiting requests.
RECORDS_PER_BATCH = 256
INPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
OUTPUT_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_ARTIFACT_LIMIT = 10 * 1024 * 1024  # outputs up to this size are logged to the run


# --- driver side ------------------------------------------------------------------------------


def score_dataframe(
    df: DataFrame, model_uri: str, column: str | None = None, params: dict[str, Any] | None = None
) -> DataFrame:
    """`df` with the model's answer to each row's `column` in RESULT_COLUMNS (lazy, as partitioned).

    `column` holds a prompt string or, for chat models, a messages array; a chat model wraps a plain
    string as one user message. It defaults to `messages` if `df` has one, else `prompt`. `params`
    are per-call generation params (max_tokens, temperature, ...), checked here before any work.
    """
    import mlflow
    from pyspark.sql import functions as F

    from slmflow.generation.params import SamplingParams

    column = column or ("messages" if "messages" in df.columns else "prompt")
    _check_columns(df, column)
    SamplingParams.from_mapping(params or {})  # fail before the job, not in every row of it
    with tempfile.TemporaryDirectory(prefix="slmflow-batch-") as folder:
        scoring = _scoring_copy(model_uri, Path(folder))
        model_input = F.struct(_input_column(df, column, scoring.input_name).alias(scoring.input_name))
        if unknown := sorted(set(params or {}) - scoring.param_names):  # MLflow would silently drop them
            allowed = ", ".join(sorted(scoring.param_names))
            raise SlmflowError(f"unknown param(s) {', '.join(unknown)}; this model takes {allowed}")
        # spark_udf copies the model (local mode) or ships it to the executors (cluster) right away.
        udf = mlflow.pyfunc.spark_udf(
            df.sparkSession, str(scoring.path), result_type="string", env_manager="local", params=params or None
        )
    scored = df.withColumn("_slmflow_record", F.from_json(udf(model_input), _RECORD_SCHEMA))
    results = [F.col(f"_slmflow_record.{c}") for c in RESULT_COLUMNS]
    return scored.select(*[F.col(f"`{c}`") for c in df.columns], *results)


def _check_columns(df: DataFrame, column: str) -> None:
    if column not in df.columns:
        raise SlmflowError(f"the input has no column {column!r}; its columns: {', '.join(df.columns)}")
    if taken := [c for c in RESULT_COLUMNS if c in df.columns]:
        raise SlmflowError(f"the input already has column(s) {', '.join(taken)}; rename them first")


@dataclass(frozen=True)
class _ScoringCopy:
    path: Path
    input_name: str  # the model's input field: messages (chat) or prompt
    param_names: frozenset[str]


def _scoring_copy(model_uri: str, folder: Path) -> _ScoringCopy:
    """Download the model into `folder` and point its pyfunc loader at this module's scorer."""
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Schema

    from slmflow.onnx_genai import FLAVOR_NAME

    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder)))
    model = Model.load(str(path))
    if FLAVOR_NAME not in model.flavors:
        raise SlmflowError(f"{model_uri} is not an {FLAVOR_NAME} model (its flavors: {', '.join(model.flavors)})")
    pyfunc = model.flavors["python_function"]
    pyfunc["loader_module"] = __name__
    # Executors import slmflow from their own environment (env_manager="local"): the model's copy of
    # the flavor code would shadow this module's package.
    pyfunc.pop("code", None)
    pyfunc.pop("streamable", None)  # the scorer answers whole batches only
    params = model.signature.params if model.signature else None
    # No input schema: a malformed row must reach the scorer and become that row's error, where
    # MLflow's schema enforcement would fail the whole batch. The params schema stays, or MLflow
    # would drop the params.
    model.signature = ModelSignature(inputs=None, outputs=Schema([ColSpec(DataType.string)]), params=params)  # type: ignore[arg-type]  # MLflow's hint omits its own None default
    model.save(str(path / "MLmodel"))
    task = model.flavors[FLAVOR_NAME].get("task", "chat")
    names = frozenset(p.name for p in params.params) if params else frozenset()
    return _ScoringCopy(path, "messages" if task == "chat" else "prompt", names)


def _input_column(df: DataFrame, column: str, input_name: str) -> Column:
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, StringType

    kind = df.schema[column].dataType
    if isinstance(kind, StringType):
        if input_name == "messages":
            return F.array(F.struct(F.lit("user").alias("role"), F.col(f"`{column}`").alias("content")))
        return F.col(f"`{column}`")
    if isinstance(kind, ArrayType) and input_name == "messages":
        return F.col(f"`{column}`")
    wanted = "a string or a messages array" if input_name == "messages" else "a prompt string"
    raise SlmflowError(f"column {column!r} holds {kind.simpleString()}; this model takes {wanted}")


# --- executor side: the scoring copy's pyfunc ----------------------------------------------------

_SCORERS: dict[str, BatchScorer] = {}  # one per model per Python worker, kept across tasks


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> BatchScorer:
    """MLflow's loader hook for the scoring copy (`path` is its `model` folder)."""
    from mlflow.models import Model

    # The model's uuid, not its path: every spark_udf call copies the model to a new folder.
    key = Model.load(str(Path(path).parent)).model_uuid or os.path.realpath(path)
    if key not in _SCORERS:
        _SCORERS[key] = BatchScorer(_load_flavor_pyfunc(path, model_config))
    return _SCORERS[key]


def _load_flavor_pyfunc(path: str, model_config: dict[str, Any] | None) -> OnnxGenAIPyfunc:
    """The flavor's own pyfunc, with as many intra-op threads as Spark gives the task."""
    from slmflow.onnx_genai import _load_pyfunc as load_flavor_pyfunc

    config = dict(model_config or {})
    # With N task slots on a machine, N engines that each take every core would oversubscribe it.
    if cpus := _task_cpus():
        config["intra_op_threads"] = cpus
    return load_flavor_pyfunc(path, config)


def _task_cpus() -> int | None:
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.cpus() if context else None


class BatchScorer:
    """Answers every row with one JSON record (RESULT_COLUMNS); a bad row gets an error, not the batch."""

    def __init__(self, pyfunc: OnnxGenAIPyfunc) -> None:
        self.pyfunc = pyfunc

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from slmflow.onnx_genai.pyfunc import _rows

        rows = _rows(model_input)
        # More waiting requests than the engine's queue takes would be refused as Overloaded.
        size = self.pyfunc.engine.options.max_queue
        records = [r for start in range(0, len(rows), size) for r in self._score(rows[start : start + size], params)]
        return [json.dumps(r) for r in records]

    def _score(self, rows: list[dict[str, Any]], params: dict[str, Any] | None) -> list[dict[str, Any]]:
        # Render and tokenize every row first, then submit them all before waiting for any: the
        # engine starts a batch as soon as one request waits, so a quick submit loop fills it.
        requests = [self._prepare(row, params) for row in rows]
        pending = [r if isinstance(r, SlmflowError) else self._submit(*r) for r in requests]
        return [_record(p) for p in pending]

    def _prepare(
        self, row: dict[str, Any], params: dict[str, Any] | None
    ) -> tuple[list[int], SamplingParams] | SlmflowError:
        try:
            request = self.pyfunc._request(row, params)  # n is not a param of batch scoring
            return self.pyfunc.engine.encode(request.prompt), request.sampling
        except SlmflowError as e:
            return e

    def _submit(self, prompt_ids: list[int], sampling: SamplingParams) -> TokenStream | SlmflowError:
        try:
            return self.pyfunc.engine.submit(prompt_ids, sampling)
        except SlmflowError as e:  # e.g. the prompt does not fit the model's context
            return e


def _record(pending: TokenStream | SlmflowError) -> dict[str, Any]:
    if isinstance(pending, SlmflowError):
        return _failed(pending)
    try:
        completion = pending.result()
    except SlmflowError as e:  # the engine failed while generating this row's batch
        return _failed(e)
    return {
        "completion": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.usage.prompt_tokens,
        "completion_tokens": completion.usage.completion_tokens,
        "error": None,
    }


def _failed(error: SlmflowError) -> dict[str, Any]:
    return {**dict.fromkeys(RESULT_COLUMNS), "error": str(error)}


# --- files in, files out, one MLflow run ----------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    run_id: str
    output: str
    rows: int
    error_rows: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 3), "tokens_per_s": round(self.tokens_per_s, 3)}

    def metrics(self) -> dict[str, float]:
        """The run's metrics; `tokens` are generated tokens, as in `tokens_per_s`."""
        return {
            "rows": self.rows,
            "error_rows": self.error_rows,
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.completion_tokens,
            "seconds": self.seconds,
            "rows_per_s": self.rows_per_s,
            "tokens_per_s": self.tokens_per_s,
        }


def run_batch(
    model_uri: str,
    input_path: str,
    output_path: str,
    *,
    column: str | None = None,
    master: str | None = None,
    params: dict[str, Any] | None = None,
    partitions: int | None = None,
    progress: bool = True,
) -> BatchResult:
    """Score a Parquet/CSV/JSONL file into a Parquet/JSONL dataset (a folder), logged as one MLflow run."""
    import mlflow

    read_format = _format(input_path, INPUT_FORMATS, "input")
    write_format = _format(output_path, OUTPUT_FORMATS, "output")
    if Path(output_path).exists():  # a local path; Spark refuses an existing remote one at write time
        raise SlmflowError(f"{output_path} already exists; remove it or choose another output")
    spark, started_here = spark_session(master, progress)
    try:
        df = _read(spark, input_path, read_format)
        rows = df.count()
        partitions = partitions or _default_partitions(rows, spark.sparkContext.defaultParallelism)
        df = _in_order(df, partitions)
        scored = score_dataframe(df, model_uri, column, params)
        with mlflow.start_run(run_name="batch") as run:
            mlflow.log_params(
                {
                    "model_uri": model_uri,
                    "master": spark.sparkContext.master,
                    "input": input_path,
                    "output": output_path,
                    "rows": rows,
                    "column": column or "",
                    "partitions": partitions,
                    "params": json.dumps(params or {}),
                }
            )
            start = time.perf_counter()
            _write(scored, output_path, write_format)
            result = _result(spark, run.info.run_id, output_path, write_format, time.perf_counter() - start)
            mlflow.log_metrics(result.metrics())
            _log_output(output_path)
        return result
    finally:
        if started_here:
            spark.stop()


def _format(path: str, formats: dict[str, str], role: str) -> str:
    suffix = Path(path.rstrip("/")).suffix.lower()
    if suffix not in formats:
        raise SlmflowError(f"cannot tell the {role} format of {path}; name it with one of {', '.join(formats)}")
    return formats[suffix]


def spark_session(master: str | None, progress: bool) -> tuple[SparkSession, bool]:
    """The active Spark session, or a new one on `master` (None: spark-submit's, else local[*])."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        # Not under spark-submit: Python workers default to the `python3` on PATH, which may lack
        # slmflow; env_manager="local" means they run this interpreter's environment.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("slmflow-batch")
    if master:
        builder = builder.master(master)
    builder = (
        builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", str(RECORDS_PER_BATCH))
        .config("spark.python.worker.reuse", "true")  # the scorer's per-worker model cache needs it
        .config("spark.ui.showConsoleProgress", str(progress).lower())
    )
    spark = builder.getOrCreate()
    if active is None:
        spark.sparkContext.setLogLevel("ERROR")  # the progress bar and our one-line result say enough
    return spark, active is None


def _read(spark: SparkSession, path: str, kind: str) -> DataFrame:
    from pyspark.errors import AnalysisException

    reader = spark.read
    if kind == "csv":  # RFC 4180: a header, quoted fields that may hold commas and newlines
        reader = reader.option("header", True).option("multiLine", True).option("escape", '"')
    try:
        return reader.format(kind).load(path)
    except AnalysisException as e:
        raise SlmflowError(f"cannot read {path}: {_first_line(e)}") from e


def _default_partitions(rows: int, parallelism: int) -> int:
    """Every task slot busy; beyond that, about 256 rows a task, up to 4 tasks a slot for balance."""
    return max(1, min(max(parallelism, math.ceil(rows / RECORDS_PER_BATCH)), 4 * parallelism))


def _in_order(df: DataFrame, partitions: int) -> DataFrame:
    """`df` in `partitions` contiguous ranges of its rows, so the output keeps the input's order."""
    from pyspark.sql import functions as F

    ordered = df.withColumn("_slmflow_row", F.monotonically_increasing_id())
    ranges = ordered.repartitionByRange(partitions, "_slmflow_row")
    return ranges.sortWithinPartitions("_slmflow_row").drop("_slmflow_row")


def _write(df: DataFrame, path: str, kind: str) -> None:
    from pyspark.errors import AnalysisException

    writer = df.write.format(kind)
    if kind == "json":
        writer = writer.option("ignoreNullFields", False)  # every line has every column
    try:
        writer.save(path)
    except AnalysisException as e:
        raise SlmflowError(f"cannot write {path}: {_first_line(e)}") from e


def _result(spark: SparkSession, run_id: str, path: str, kind: str, seconds: float) -> BatchResult:
    """Totals read back from the written output: scoring again to count would run the model twice."""
    from pyspark.sql import functions as F

    written = spark.read.schema(_RECORD_SCHEMA).format(kind).load(path)
    totals = written.agg(
        F.count(F.lit(1)).alias("rows"),
        F.count("error").alias("errors"),
        F.coalesce(F.sum("prompt_tokens"), F.lit(0)).alias("prompt"),
        F.coalesce(F.sum("completion_tokens"), F.lit(0)).alias("completion"),
    ).first()
    assert totals is not None  # an aggregate always has one row
    return BatchResult(run_id, path, totals["rows"], totals["errors"], totals["prompt"], totals["completion"], seconds)


def _log_output(path: str) -> None:
    """Log a small local output to the run; a large or remote one stays where it was written."""
    import mlflow

    parts = sorted(Path(path).glob("part-*")) if Path(path).is_dir() else []
    if parts and sum(p.stat().st_size for p in parts) <= _ARTIFACT_LIMIT:
        for part in parts:
            mlflow.log_artifact(str(part), artifact_path="output")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
