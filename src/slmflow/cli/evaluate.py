"""`slmflow eval`, `slmflow promote`, `slmflow compare`."""

from __future__ import annotations

import json
import sys

import click

DEFAULT_DATA = "builtin:capitals"


def _params(raw: str | None) -> dict | None:
    from slmflow.errors import SlmflowError

    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SlmflowError(f"--params is not JSON: {e.msg}") from e
    if not isinstance(value, dict):
        raise SlmflowError("--params must be a JSON object")
    return value


def _print_metrics(metrics: dict[str, float]) -> None:
    for key, value in sorted(metrics.items()):
        click.echo(f"  {key:<22} {value:.6g}")


@click.command("eval")
@click.argument("model_uri")
@click.option("--data", help=f"JSONL/CSV of {{messages | prompt, expected[, pattern]}}, or {DEFAULT_DATA}.")
@click.option(
    "--perplexity",
    "perplexity_text",
    help="Also score perplexity: of the expected answers of an eval set (builtin:capitals, .jsonl, .csv), or of a text file.",
)
@click.option("--params", "params_json", help="Generation params as JSON, e.g. '{\"max_tokens\": 64}'.")
@click.option("--json", "as_json", is_flag=True, help="Print {run_id, metrics}.")
def eval_command(
    model_uri: str, data: str | None, perplexity_text: str | None, params_json: str | None, as_json: bool
) -> None:
    """Evaluate MODEL_URI offline, log the run, and tag the model version with it."""
    from slmflow.evaluation import evaluate

    data = data if data or perplexity_text else DEFAULT_DATA
    report = evaluate(model_uri, data, perplexity_text=perplexity_text, params=_params(params_json))
    if as_json:
        click.echo(json.dumps({"run_id": report.run_id, "metrics": report.metrics}))
        return
    click.echo(f"evaluation run {report.run_id} of {model_uri}:")
    _print_metrics(report.metrics)


@click.command()
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="champion", show_default=True, help="The alias to move.")
@click.option("--gate", "gates", multiple=True, help="A condition such as 'accuracy>=0.9' (repeatable).")
@click.option(
    "--no-worse-than-current",
    is_flag=True,
    help="Also require each gated metric to be no worse than the alias's current version.",
)
@click.option("--data", default=DEFAULT_DATA, show_default=True, help="Evaluation data.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def promote(
    name: str, version: str, alias: str, gates: tuple[str, ...], no_worse_than_current: bool, data: str, as_json: bool
) -> None:
    """Point ALIAS at NAME/VERSION only if every gate holds on a (reused or fresh) evaluation."""
    from slmflow.evaluation.promotion import Gate
    from slmflow.evaluation.promotion import promote as run_promote

    result = run_promote(
        name, version, alias, [Gate.parse(g) for g in gates], data, no_worse_than_current=no_worse_than_current
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "promoted": result.promoted,
                    "failures": result.failures,
                    "metrics": result.metrics,
                    "eval_run_id": result.eval_run_id,
                }
            )
        )
    elif result.promoted:
        click.echo(f"{name}@{alias} -> version {version} (evaluation run {result.eval_run_id})")
    if not result.promoted:
        for failure in result.failures:
            click.echo(f"error: {failure}", err=True)
        kept = f"version {result.current_version}" if result.current_version else "unset"
        click.echo(f"{name}@{alias} stays at {kept}", err=True)
        sys.exit(1)


@click.command()
@click.argument("uri_a")
@click.argument("uri_b")
@click.option("--data", default=DEFAULT_DATA, show_default=True, help="Evaluation data.")
@click.option("--json", "as_json", is_flag=True, help="Print {run_id, metrics}.")
def compare(uri_a: str, uri_b: str, data: str, as_json: bool) -> None:
    """Compare two models' greedy outputs row by row, and log the diff to MLflow."""
    from slmflow.evaluation.compare import compare as run_compare

    result = run_compare(uri_a, uri_b, data)
    if as_json:
        click.echo(json.dumps({"run_id": result.run_id, "metrics": result.metrics}))
        return
    click.echo(f"comparison run {result.run_id}:")
    _print_metrics(result.metrics)
