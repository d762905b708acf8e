"""Batch inference throughput: Spark local[1] and local[2] against one process, over the same rows.

    .venv/bin/python benchmarks/batch_bench.py [--rows 200] [--sizes tiny,bench] [--max-tokens 32] [--repeat 3]

Four ways to answer the same chat prompts with the same `onnx_genai` model, greedy:
- loop: one process, `predict` one row at a time (the engine never batches);
- one call: one process, one `predict` call on all rows (the engine batches them, 8 at a time);
- local[1], local[2]: `slmflow batch`'s scoring (`run_batch`) on Spark; each Python worker loads the
  model once and gets as many intra-op threads as its task has cores. Each Spark setup scores the
  rows repeatedly in one session: cold (workers start, load the model), then warm (workers reuse it).
The one-process setups use every core for intra-op threads and exclude the model load.
Writes a markdown table to benchmarks/results/batch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "batch.md"


@dataclass(frozen=True)
class Measurement:
    setup: str
    workers: str
    seconds: float
    rows: int
    tokens: int
    note: str = ""

    def row(self) -> str:
        rates = f"{self.rows / self.seconds:.1f} | {self.tokens / self.seconds:.1f}"
        return f"| {self.setup} | {self.workers} | {self.seconds:.2f} | {rates} | {self.note} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument(
        "--sizes", default="tiny,bench", help="fixtures to package: tiny (trained), bench (realistic shapes)"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs per setup; the fastest counts")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # spark_udf's env_manager advice, table creation
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    sections = [measure(size, args.rows, args.max_tokens, args.repeat) for size in args.sizes.split(",")]
    report = markdown(sections, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)


def measure(size: str, rows: int, max_tokens: int, repeat: int) -> tuple[str, list[Measurement]]:
    """Every setup over the same `rows` prompts, with the `size` fixture packaged as a chat model."""
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        folder = Path(tmp)
        # The benchmark's runs stay out of the caller's tracking store.
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        model_uri = package(size, folder)
        texts = prompts(rows)
        params = {"max_tokens": max_tokens, "temperature": 0.0}
        source = folder / "prompts.jsonl"
        source.write_text("".join(json.dumps({"id": i, "messages": user(t)}) + "\n" for i, t in enumerate(texts)))
        results = one_process(model_uri, texts, params, repeat)
        for master in ("local[1]", "local[2]"):
            results.append(on_spark(model_uri, source, folder, master, params, repeat))
    return size, results


def package(size: str, folder: Path) -> str:
    """The fixture of `size`, converted to int4 and saved as an `onnx_genai` model: its path."""
    from slmflow import convert, onnx_genai
    from slmflow.checkpoints.fixture import build_fixture

    onnx_dir = convert.convert(build_fixture(size), folder / "onnx")
    onnx_genai.save_model(onnx_dir, folder / "model", task="chat")
    return str(folder / "model")


def prompts(count: int) -> list[str]:
    from slmflow.checkpoints.task import CAPITALS, EVAL_TEMPLATES, TRAIN_TEMPLATES

    every = [t.format(country=c) for t in TRAIN_TEMPLATES + EVAL_TEMPLATES for c in CAPITALS]
    return [every[i % len(every)] for i in range(count)]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def one_process(model_uri: str, texts: list[str], params: dict, repeat: int) -> list[Measurement]:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    stats = model.get_raw_model().stats
    model.predict({"messages": user(texts[0])}, params=params)  # warm-up: first-call allocations
    measurements = []
    for setup, run in (
        ("loop, one row per predict", lambda: [model.predict({"messages": user(t)}, params=params)[0] for t in texts]),
        (
            "one predict on all rows",
            lambda: model.predict(pd.DataFrame({"messages": [user(t) for t in texts]}), params=params),
        ),
    ):
        batches = stats.batches
        seconds = []
        for _ in range(repeat):
            start = time.perf_counter()
            answers = run()
            seconds.append(time.perf_counter() - start)
        tokens = sum(a["usage"]["completion_tokens"] for a in answers)
        note = f"{(stats.batches - batches) // repeat} engine batches; {spread(seconds)}"
        threads = f"1 x {len(os.sched_getaffinity(0))} threads"
        measurements.append(Measurement(setup, threads, min(seconds), len(texts), tokens, note))
    model.get_raw_model().close()  # its threads must not compete with the Spark setups
    return measurements


def on_spark(model_uri: str, source: Path, folder: Path, master: str, params: dict, repeat: int) -> Measurement:
    from slmflow.batch import run_batch, spark_session

    spark, _ = spark_session(master, progress=False)
    try:
        slots = spark.sparkContext.defaultParallelism
        name = master.replace("[", "").replace("]", "")
        runs = [
            run_batch(model_uri, str(source), str(folder / f"{name}-{i}.parquet"), params=params, progress=False)
            for i in range(repeat + 1)
        ]
    finally:
        spark.stop()
    cold, warm = runs[0], min(runs[1:], key=lambda r: r.seconds)
    note = f"warm: {spread([r.seconds for r in runs[1:]])}; cold (workers start, load the model): {cold.seconds:.2f} s"
    return Measurement(f"Spark {master}", f"{slots} x 1 thread", warm.seconds, warm.rows, warm.completion_tokens, note)


def spread(seconds: list[float]) -> str:
    return f"fastest of {len(seconds)} runs ({', '.join(f'{s:.2f}' for s in seconds)} s)"


def markdown(sections: list[tuple[str, list[Measurement]]], args: argparse.Namespace) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# Batch inference throughput",
        "",
        f"`benchmarks/batch_bench.py --rows {args.rows} --sizes {args.sizes} --max-tokens {args.max_tokens} "
        f"--repeat {args.repeat}`: "
        f"{args.rows} chat prompts, greedy, int4; {len(os.sched_getaffinity(0))} cores, Python "
        f"{platform.python_version()}, load average at the end {load} (a shared machine: numbers are noisy).",
        "tokens = generated (completion) tokens. Spark seconds are the scoring job (read, score, write) "
        "in a running session; Spark's own start-up is not counted.",
    ]
    for size, results in sections:
        lines += [
            "",
            f"## `{size}` fixture",
            "",
            "| setup | processes x intra-op threads | seconds | rows/s | tokens/s | notes |",
            "| --- | --- | --- | --- | --- | --- |",
            *(m.row() for m in results),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
