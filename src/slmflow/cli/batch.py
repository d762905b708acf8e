"""`slmflow batch`: score a file with a model on Apache Spark (registered on `main` by the CLI).

Also runnable as a script, which is what `spark-submit` needs (it runs only `.py` files):
`spark-submit --master URL path/to/slmflow/cli/batch.py MODEL_URI --input ... --output ...`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from slmflow.errors import SlmflowError


@click.command()
@click.argument("model_uri")
@click.option("--input", "input_path", required=True, help="Parquet, CSV or JSONL file (or folder) of prompts.")
@click.option(
    "--output", "output_path", required=True, help="Parquet or JSONL dataset folder to write (must not exist)."
)
@click.option("--column", help="Input column with the prompt or messages [default: messages if present, else prompt].")
@click.option(
    "--master", help="Spark master URL, e.g. local[2] or spark://host:7077 [default: spark-submit's, else local[*]]."
)
@click.option(
    "--params", "params_json", help='Generation params as JSON, e.g. \'{"max_tokens": 64, "temperature": 0}\'.'
)
@click.option(
    "--partitions", type=click.IntRange(min=1), help="Spark partitions to score [default: from rows and cores]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON, without Spark's progress bar.")
def batch(
    model_uri: str,
    input_path: str,
    output_path: str,
    column: str | None,
    master: str | None,
    params_json: str | None,
    partitions: int | None,
    as_json: bool,
) -> None:
    """Answer every row of INPUT with MODEL_URI on Spark, writing OUTPUT and logging an MLflow run."""
    import logging
    import warnings

    from slmflow.batch import run_batch

    # MLflow warns that env_manager="local" does not rebuild the model's environment: that is the
    # point here (executors run this environment), not news. PySpark 4.3 warns about pandas 3,
    # which batch scoring uses only through Arrow batches (covered by tests/test_batch.py).
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    if as_json:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

    result = run_batch(
        model_uri,
        input_path,
        output_path,
        column=column,
        master=master,
        params=_params(params_json),
        partitions=partitions,
        progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(result.as_json()))
        return
    errors = f" ({result.error_rows} with an error)" if result.error_rows else ""
    click.echo(
        f"scored {result.rows} rows{errors} in {result.seconds:.1f}s: {result.rows_per_s:.1f} rows/s, "
        f"{result.tokens_per_s:.1f} tokens/s -> {result.output}"
    )
    click.echo(f"run {result.run_id}")


def _params(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        params = json.loads(text)
    except ValueError as e:
        raise SlmflowError(f"--params is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise SlmflowError("--params must be a JSON object")
    return params


if __name__ == "__main__":  # under spark-submit
    from slmflow.cli import main

    main.add_command(batch)  # this module runs as __main__, so this is its own command object
    main(["batch", *sys.argv[1:]], prog_name="slmflow")
