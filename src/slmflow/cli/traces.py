"""`slmflow traces export`: what `slmflow serve` recorded, as evaluation data."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click


@click.group()
def traces() -> None:
    """Requests recorded by slmflow serve as MLflow traces."""


@traces.command("export")
@click.argument("experiment")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSONL file to write.")
@click.option("--since", type=click.DateTime(), help="Only requests served at or after this time (UTC).")
@click.option("--until", type=click.DateTime(), help="Only requests served at or before this time (UTC).")
@click.option("--model-version", help="Only requests served by this registered version.")
@click.option(
    "--status",
    default="ok",
    show_default=True,
    type=click.Choice(["ok", "cancelled", "timed_out", "error", "all"]),
    help="Only requests that ended so.",
)
@click.option("--limit", default=10_000, show_default=True, help="At most this many traces.")
@click.option("--json", "as_json", is_flag=True, help='Print {"rows": N, "output": PATH}.')
def export(
    experiment: str,
    output: Path,
    since: datetime | None,
    until: datetime | None,
    model_version: str | None,
    status: str,
    limit: int,
    as_json: bool,
) -> None:
    """Write the requests served into EXPERIMENT as eval rows: messages (or prompt) and the served answer."""
    from datetime import UTC

    from slmflow.evaluation.traces import TraceFilter, export_traces

    where = TraceFilter(
        since=since.replace(tzinfo=UTC) if since else None,
        until=until.replace(tzinfo=UTC) if until else None,
        model_version=model_version,
        status=None if status == "all" else status,
    )
    rows = export_traces(experiment, output, where, limit)
    if as_json:
        click.echo(json.dumps({"rows": rows, "output": str(output)}))
    else:
        click.echo(f"{rows} served requests written to {output}; evaluate a candidate on them with:")
        click.echo(f"  slmflow eval MODEL_URI --data {output}")
