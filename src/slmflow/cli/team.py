"""`slmflow server`: a team tracking server on this machine (PostgreSQL + proxied artifacts + auth)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from slmflow.teamserver import TeamServer


@click.command("server")
@click.option(
    "--folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the database, artifacts and credentials live.  [default: SLMFLOW_HOME/team]",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--auth/--no-auth", default=True, show_default=True, help="MLflow's basic auth: users and permissions.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="mlflow server workers.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's address and files as one JSON line.")
def server(folder: Path | None, host: str, port: int, auth: bool, workers: int, as_json: bool) -> None:
    """Run a team tracking server: PostgreSQL store, proxied artifacts, basic auth; Ctrl-C stops it."""
    from slmflow import teamserver
    from slmflow.paths import slmflow_home

    spec = teamserver.TeamServerSpec(
        folder=(folder or slmflow_home() / "team").absolute(), host=host, port=port, auth=auth, workers=workers
    )
    say = (lambda message: None) if as_json else (lambda message: click.echo(message, err=True))
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    running = teamserver.start(spec, say)
    try:
        if as_json:
            click.echo(json.dumps(running.describe()), nl=True)
        else:
            _explain(running)
        while not stopping.is_set() and running.mlflow.poll() is None:
            stopping.wait(1.0)
        if running.mlflow.poll() is not None and not stopping.is_set():
            click.echo(f"error: mlflow server exited ({running.mlflow.returncode}); see {spec.folder}", err=True)
    finally:
        say("stopping")
        running.stop()


def _explain(running: TeamServer) -> None:
    about = running.describe()
    click.echo(f"team tracking server at {running.url}")
    click.echo(f"  store: {about['backend_store']}; artifacts (proxied): {about['artifacts']}")
    click.echo("clients need:")
    for key, value in running.client_env().items():
        shown = "$(cat " + about["password_file"] + ")" if key == "MLFLOW_TRACKING_PASSWORD" else value
        click.echo(f"  export {key}={shown}")
    click.echo("Ctrl-C stops it; the data stays in the folder for the next start.")
