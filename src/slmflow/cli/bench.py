"""`slmflow bench`: run a benchmark script from the source checkout's `benchmarks/` folder."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import click

from slmflow.errors import SlmflowError

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name")
@click.pass_context
def bench(ctx: click.Context, name: str) -> None:
    """Run benchmarks/NAME_bench.py (serving, batch) with the remaining arguments."""
    script = BENCHMARKS / f"{name}_bench.py"
    if not script.is_file():
        found = sorted(p.stem.removesuffix("_bench") for p in BENCHMARKS.glob("*_bench.py"))
        raise SlmflowError(f"no benchmark {name!r} in {BENCHMARKS} (have: {', '.join(found) or 'none'})")
    sys.argv = [str(script), *ctx.args]
    runpy.run_path(str(script), run_name="__main__")
