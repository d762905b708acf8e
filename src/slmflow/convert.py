"""Hugging Face checkpoint -> ONNX Runtime GenAI folder, with the GenAI model builder.

The builder runs in a child process: it is the only way to get its progress lines, and a crash or
kill in it cannot take the caller down; on Linux it also dies with the caller, so a killed `slmflow
package` leaves no orphan converting on. Output is written to a staging folder and renamed into
place, so a failed or killed conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmflow.errors import ConversionError, SlmflowError
from slmflow.progress import Progress

PRECISIONS = ("int8", "int4", "fp32", "fp16", "bf16")
DEFAULT_PRECISION = "int8"
QUANTIZED = ("int4", "int8")
EXECUTION_PROVIDERS = ("cpu", "cuda")
ALGORITHMS = ("default", "rtn", "k_quant")
BLOCK_SIZES = (16, 32, 64, 128, 256)

_LAYER = re.compile(r"Reading layer (\d+)")


@dataclass(frozen=True)
class Quantization:
    """How int4/int8 weights are made: the ONNX Runtime GenAI builder's weight-only quantization
    options. None leaves the builder's own default (block 32, accuracy level 4 on CPU, symmetric)."""

    algorithm: str | None = None  # algo_config: default (RTN), rtn, k_quant
    block_size: int | None = None
    mixed: str | None = None  # matmul_mixed_precision, e.g. "last_matmul:int8,mixed_layers:int8"
    accuracy_level: int | None = None  # 4: int8 activations (fastest on CPU), 1: float32
    symmetric: bool = True
    extra: tuple[str, ...] = ()  # further KEY=VALUE builder options, as given

    def options(self) -> list[str]:
        options = [
            f"{key}={value}"
            for key, value in (
                ("algo_config", self.algorithm),
                ("block_size", self.block_size),
                ("matmul_mixed_precision", self.mixed),
                ("accuracy_level", self.accuracy_level),
            )
            if value is not None
        ]
        if not self.symmetric:
            options.append("is_symmetric=false")
        return options + list(self.extra)

    def describe(self) -> str:
        return " ".join(self.options()) or "builder defaults"


# Measured on SmolLM2-135M-Instruct (benchmarks/results/quantization.md). int4: k_quant, block 32,
# the LM head and the most quantization-sensitive layers in int8 (llama.cpp's mixed strategy): +12%
# perplexity, where the former default (block 128, plain RTN) cost +80% and answered in gibberish.
# int8 (the builder's defaults) cost +0.25% and decodes as fast, hence the default precision; on CPU
# its decoder graph is then smoothed and requantized at block 64 (decode_graph.py: better and faster).
DEFAULT_RECIPES = {
    "int4": Quantization(algorithm="k_quant", block_size=32, mixed="last_matmul:int8,mixed_layers:int8"),
    "int8": Quantization(),
}


def recipe_for(precision: str, quantization: Quantization | None) -> Quantization | None:
    """The quantization options a build uses: the given ones, else the precision's default."""
    if precision not in QUANTIZED:
        return None
    return quantization if quantization is not None else DEFAULT_RECIPES[precision]


def builder_command(
    source: Path,
    output: Path,
    precision: str,
    provider: str,
    cache_dir: Path,
    quantization: Quantization | None = None,
) -> list[str]:
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(source), "-o", str(output), "-p", precision, "-e", provider, "-c", str(cache_dir),
    ]  # fmt: skip
    recipe = recipe_for(precision, quantization)
    if recipe and recipe.options():
        command += ["--extra_options", *recipe.options()]
    return command


def check_target(precision: str, provider: str, quantization: Quantization | None = None) -> None:
    if precision not in PRECISIONS:
        raise SlmflowError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if provider not in EXECUTION_PROVIDERS:
        raise SlmflowError(f"unknown execution provider {provider!r}; choose one of {', '.join(EXECUTION_PROVIDERS)}")
    if precision in ("fp16", "bf16") and provider == "cpu":
        raise SlmflowError(
            f"ONNX Runtime GenAI has no {precision} CPU model; "
            f"use --precision {precision} with --execution-provider cuda"
        )
    if quantization is not None:
        _check_quantization(precision, quantization)


def _check_quantization(precision: str, quantization: Quantization) -> None:
    if precision not in QUANTIZED:
        raise SlmflowError(f"quantization options apply to int4 and int8, not {precision}")
    q = quantization
    if q.algorithm is not None and q.algorithm not in ALGORITHMS:
        raise SlmflowError(f"unknown quantization algorithm {q.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if q.block_size is not None and q.block_size not in BLOCK_SIZES:
        raise SlmflowError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}; got {q.block_size}")
    if q.accuracy_level is not None and q.accuracy_level not in (1, 2, 3, 4):
        raise SlmflowError(f"accuracy level must be 1, 2, 3 or 4; got {q.accuracy_level}")
    for option in q.extra:
        if "=" not in option or option.startswith("="):
            raise SlmflowError(f"builder options are KEY=VALUE; got {option!r}")


def uses_prefill_graph(precision: str, provider: str, requested: bool | None) -> bool:
    """Whether a build gets a prefill graph (prefill_graph.py): asked for, else int8 CPU builds.
    int4 only when asked: the graph holds an int8 copy of the weights, which undoes int4's size."""
    if requested is None:
        return precision == "int8" and provider == "cpu"
    if requested and (precision not in QUANTIZED or provider != "cpu"):
        raise SlmflowError(f"the prefill graph is for int4/int8 CPU builds, not {precision} on {provider}")
    return requested


def smooths_decode_graph(precision: str, provider: str, quantization: Quantization | None) -> bool:
    """Whether a build's decoder graph gets smoothed weights at block 64 (decode_graph.py): int8 CPU
    builds of the default recipe (options given are the builder's to follow as given)."""
    return precision == "int8" and provider == "cpu" and recipe_for(precision, quantization) == DEFAULT_RECIPES["int8"]


def convert(
    source: Path,
    output: Path,
    *,
    precision: str = DEFAULT_PRECISION,
    provider: str = "cpu",
    quantization: Quantization | None = None,
    prefill_graph: bool | None = None,
    num_layers: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert the checkpoint at `source` into an ONNX Runtime GenAI folder at `output` (with a
    prefill graph where `uses_prefill_graph` says so; int8 CPU builds of the default recipe get their
    decoder graph smoothed, decode_graph.py)."""
    from slmflow.decode_graph import smooth_decode_graph
    from slmflow.prefill_graph import smoothing_factors

    check_target(precision, provider, quantization)
    with_prefill_graph = uses_prefill_graph(precision, provider, prefill_graph)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=output.parent))
    cache = Path(tempfile.mkdtemp(prefix=".builder-cache-", dir=output.parent))
    try:
        command = builder_command(source, staging, precision, provider, cache, quantization)
        _run_builder(command, num_layers, progress)
        if not (staging / "genai_config.json").is_file():
            raise ConversionError("the model builder finished without writing genai_config.json")
        smooths = smooths_decode_graph(precision, provider, quantization)
        # One calibration for both graphs of a default int8 build: the same activations and weights.
        factors = smoothing_factors(staging, progress=progress) if smooths else None
        if with_prefill_graph:
            # Prefill graphs are CPU-only: the builds it smooths are the ones whose own weights are
            # int8 block 32, the finest the prefill graph takes.
            _add_prefill_graph(source, staging, smooths, factors, cache, num_layers, progress)
        if smooths:
            smooth_decode_graph(staging, factors, progress=progress)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return output


def _add_prefill_graph(
    source: Path,
    build: Path,
    finest: bool,
    factors: dict[str, Any] | None,
    cache: Path,
    num_layers: int | None,
    progress: Progress | None,
) -> None:
    """Give `build` its prefill graph, with weights from an int8 block-32 build: this one's where it
    is one (`finest`), else a second build made for it (coarser or 4-bit weights, requantized per
    channel, cost the prefill graph more: int8 block 128's +0.97% perplexity against +0.07%).
    `factors`: this build's smoothing factors, where computed already."""
    from slmflow.prefill_graph import add_prefill_graph

    if finest:
        add_prefill_graph(build, factors=factors, progress=progress)
        return
    finer = Path(tempfile.mkdtemp(prefix=".prefill-weights-", dir=build.parent))
    try:
        _run_builder(builder_command(source, finer, "int8", "cpu", cache), num_layers, progress)
        add_prefill_graph(build, weights_from=finer, progress=progress)
    finally:
        shutil.rmtree(finer, ignore_errors=True)


def _run_builder(command: list[str], num_layers: int | None, progress: Progress | None) -> None:
    # The source is already on disk: the builder must never wait on the hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=20)
    total = num_layers or 0
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        errors="replace",
        preexec_fn=_die_with_parent(),
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                if line.strip():
                    tail.append(line.strip())
                if progress and (match := _LAYER.search(line)):
                    progress("converting layers", int(match.group(1)) + 1, total)
        code = process.wait()
    if code != 0:
        raise ConversionError(f"the ONNX Runtime GenAI model builder failed (exit {code}): {_cause(tail)}")
    if progress:
        progress("converted", total, total)


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a function for the child, between fork and exec, that has the kernel SIGKILL it when
    this process dies, even by SIGKILL. Without it a killed caller leaves the builder running on,
    for minutes of CPU and gigabytes of disk on a real model. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def in_child() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the caller died before the request took effect
            os._exit(1)

    return in_child


def _cause(tail: deque[str]) -> str:
    """The most telling line of the builder's output: its last error line, else its last line."""
    for line in reversed(tail):
        if re.search(r"(Error|Exception)\b", line):
            return line
    return tail[-1] if tail else "no output"
