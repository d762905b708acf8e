"""The `slmflow` command line: core commands here, one module per further concern beside it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from slmflow import __version__
from slmflow.convert import DEFAULT_PRECISION, DEFAULT_RECIPES, Quantization
from slmflow.errors import SlmflowError
from slmflow.progress import Progress

ARGV = "slmflow.argv"


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 1, never a traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # The subcommand and its arguments, kept to name the model a refused request was about (the
        # group's only options, --version and --help, exit before any subcommand runs).
        ctx.meta[ARGV] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        argv = ctx.meta.get(ARGV, [])
        try:
            return super().invoke(ctx)
        except SlmflowError as e:
            if isinstance(e.__cause__, Exception):
                _remote_failure(e.__cause__, self, ctx, argv)
            _fail(str(e))
        except Exception as e:
            from mlflow.exceptions import MlflowException

            _remote_failure(e, self, ctx, argv)
            if isinstance(e, MlflowException):
                _fail(e.message)
            raise


def _remote_failure(error: Exception, group: click.Group, ctx: click.Context, argv: list[str]) -> None:
    """A tracking server's 401/403 becomes one line naming the user, the permission and the model;
    a server that does not answer, one line saying so."""
    from slmflow import remote

    if absent := remote.unreachable(error):
        _fail(absent)
    if not remote.refusal(error):
        return
    params: dict[str, object] = {}
    command = group.get_command(ctx, argv[0]) if argv else None
    if command is not None:  # the subcommand's arguments parsed again, to name the model it worked on
        with click.Context(command, parent=ctx, resilient_parsing=True) as sub:
            command.parse_args(sub, argv[1:])
            params = dict(sub.params)
    _fail(remote.describe(error, remote.model_name(params)))


def _fail(message: str) -> None:
    click.echo(f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}", err=True)
    sys.exit(1)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich progress bar on stderr fed by (message, done, total) callbacks; silent when disabled."""
    if not enabled:
        yield lambda message, done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=total or None)

        yield update


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="slmflow")
def main() -> None:
    """Small language models as first-class MLflow models."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Our progress bars and one-line results replace the libraries' own chatter."""
    import logging

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    # With a tracking server MLflow writes run links to stdout, which would break `--json` output.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not sys.stderr.isatty():  # MLflow's download bar, in a log, is a line per file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Offline, MLflow cannot fetch a model card or license for a local checkpoint: expected, not news.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@main.command()
@click.option(
    "--size",
    default="tiny",
    show_default=True,
    help="tiny (trained Phi-3, checkable answers), bench (random, realistic shapes) or smol (SmolLM2-135M-Instruct, a real model).",
)
@click.option("--force", is_flag=True, help="Rebuild even if a cached build matches the recipe.")
@click.option("--json", "as_json", is_flag=True, help='Print {"path": ...}.')
def fixture(size: str, force: bool, as_json: bool) -> None:
    """Build (or reuse) a local fixture checkpoint and print its folder."""
    from slmflow.checkpoints.fixture import SIZES, build_fixture
    from slmflow.checkpoints.smol import SMOL, build_smol

    if size not in (*SIZES, SMOL):
        raise SlmflowError(f"unknown fixture size {size!r}; choose one of {', '.join((*SIZES, SMOL))}")
    with progress_bar(not as_json) as progress:
        if size == SMOL:
            path = build_smol(force=force, progress=progress)
        else:
            path = build_fixture(size, force=force, progress=progress)
    click.echo(json.dumps({"path": str(path)}) if as_json else str(path))


@main.command()
@click.argument("source")
@click.option("--route", default="onnx", show_default=True, help="onnx (ONNX Runtime GenAI flavor) or transformers.")
@click.option(
    "--precision",
    default=DEFAULT_PRECISION,
    show_default=True,
    help="ONNX route: int8, int4, fp32, or fp16/bf16 (cuda). Its quality cost is measured and printed.",
)
@click.option("--quant-algo", help="int4/int8: the builder's algorithm: default (RTN), rtn or k_quant.")
@click.option("--block-size", type=int, help="int4/int8: quantization block size (16, 32, 64, 128, 256).")
@click.option(
    "--mixed-precision",
    help="int4: MatMul groups kept at another type, e.g. last_matmul:int8,mixed_layers:int8 ('none' for none).",
)
@click.option("--accuracy-level", type=int, help="int4/int8: 4 = int8 activations (fastest on CPU) ... 1 = float32.")
@click.option("--asymmetric", is_flag=True, help="int4/int8: quantize with zero points.")
@click.option(
    "--builder-option", "builder_options", multiple=True, help="Any further builder option KEY=VALUE (repeatable)."
)
@click.option(
    "--prefill-graph/--no-prefill-graph",
    default=None,
    help="ONNX route: add a graph that reads prompts faster (int8 activations); default: int8 CPU builds.",
)
@click.option("--no-quality", is_flag=True, help="ONNX route: skip measuring the conversion against its source.")
@click.option(
    "--max-quality-loss",
    type=float,
    help="Refuse (FAILED run, nothing registered) a conversion that raises perplexity by more than PCT percent.",
)
@click.option(
    "--task", default="chat", show_default=True, help="ONNX route: chat (OpenAI schema) or prompt ({prompt} -> str)."
)
@click.option("--execution-provider", "provider", default="cpu", show_default=True, help="ONNX route: cpu or cuda.")
@click.option("--name", help="Register the model under this name.")
@click.option("--alias", help="Point this alias of --name at the new version.")
@click.option("--max-tokens", type=int, help="Default max_tokens of the packaged model.")
@click.option("--temperature", type=float, help="Default temperature (0 = greedy).")
@click.option("--top-p", type=float, help="Default top_p.")
@click.option("--top-k", type=int, help="Default top_k.")
@click.option("--json", "as_json", is_flag=True, help="Print {run_id, model_uri, registered_name, version, quality}.")
def package(
    source: str,
    route: str,
    precision: str,
    quant_algo: str | None,
    block_size: int | None,
    mixed_precision: str | None,
    accuracy_level: int | None,
    asymmetric: bool,
    builder_options: tuple[str, ...],
    prefill_graph: bool | None,
    no_quality: bool,
    max_quality_loss: float | None,
    task: str,
    provider: str,
    name: str | None,
    alias: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    as_json: bool,
) -> None:
    """Package SOURCE (hub id, checkpoint, GGUF file or ONNX GenAI folder) as an MLflow model in a new run."""
    from slmflow.packaging import PackageSpec
    from slmflow.packaging import package as run_package

    defaults = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    quantization = _quantization(
        precision, quant_algo, block_size, mixed_precision, accuracy_level, asymmetric, builder_options
    )
    spec = PackageSpec(
        source=source,
        route=route,
        precision=precision,
        task=task,
        provider=provider,
        name=name or None,  # MLproject passes "" for "not set"
        alias=alias or None,
        generation_defaults={k: v for k, v in defaults.items() if v is not None},
        quantization=quantization,
        prefill_graph=prefill_graph,
        measure_quality=not no_quality,
        max_quality_loss=max_quality_loss,
    )
    with progress_bar(not as_json) as progress:
        result = run_package(spec, progress)
    if as_json:
        click.echo(json.dumps(result.as_json()))
        return
    click.echo(f"run {result.run_id}: {result.model_uri}")
    if result.quality:
        click.echo(f"quality: {result.quality.summary()}")
    elif result.quality_note:
        click.echo(f"quality: {result.quality_note}")
    if result.version:
        click.echo(f"registered {result.registered_name} version {result.version}" + (f" as @{alias}" if alias else ""))


def _quantization(
    precision: str,
    algorithm: str | None,
    block_size: int | None,
    mixed: str | None,
    accuracy_level: int | None,
    asymmetric: bool,
    extra: tuple[str, ...],
) -> Quantization | None:
    """The quantization options given on the command line, over the precision's default recipe
    (None when none was given: the default recipe as it is)."""
    from dataclasses import replace

    if not (algorithm or block_size or mixed or accuracy_level or asymmetric or extra):
        return None
    base = DEFAULT_RECIPES.get(precision, Quantization())
    return replace(
        base,
        algorithm=algorithm or base.algorithm,
        block_size=block_size or base.block_size,
        mixed=None if mixed == "none" else mixed or base.mixed,
        accuracy_level=accuracy_level or base.accuracy_level,
        symmetric=base.symmetric and not asymmetric,
        extra=base.extra + extra,
    )


@main.command()
@click.argument("name")
@click.argument("alias")
@click.argument("version")
def alias(name: str, alias: str, version: str) -> None:
    """Point ALIAS of registered model NAME at VERSION."""
    from slmflow.registry import set_alias

    set_alias(name, alias, version)
    click.echo(f"{name}@{alias} -> version {version}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(as_json: bool) -> None:
    """Offline end to end: build the tiny fixture, package it both ways, register, load by alias, answer."""
    from slmflow.demo import run_demo

    with progress_bar(not as_json) as progress:
        report = run_demo(progress, echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def _register_commands() -> None:
    from slmflow.cli.batch import batch
    from slmflow.cli.bench import bench
    from slmflow.cli.evaluate import compare, eval_command, promote
    from slmflow.cli.serve import chat, serve
    from slmflow.cli.team import server
    from slmflow.cli.traces import traces

    for command in (eval_command, promote, compare, serve, chat, bench, batch, traces, server):
        main.add_command(command)


_register_commands()
