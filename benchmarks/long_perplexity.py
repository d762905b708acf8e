"""Perplexity of SmolLM2-135M-Instruct's builds on a longer text than the built-in reference.

    .venv/bin/python benchmarks/long_perplexity.py [--tokens 8192] [--text FILE ...]

The built-in reference text (what `slmflow package` measures) is 515 tokens: differences under about
half a point between two builds of similar quality are within its noise. This reads a longer text
(by default this repository's docs/*.md, in name order, the first --tokens tokens) in windows of
2,048 tokens, teacher-forced, through: the float32 build (the source's figure), the default int8
build with and without its prefill graph, and OpenVINO GenAI's int8 export (its environment made as
by openvino_bench.py). Writes benchmarks/results/long-perplexity-smol.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

WINDOW = 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--text", nargs="*", type=Path, default=sorted((HERE.parent / "docs").glob("*.md")))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from multiturn_bench import model_folder
    from openvino_bench import openvino_env, openvino_folder, peer_perplexity
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    text = "\n".join(path.read_text() for path in args.text)
    builds = {
        "float32": (model_folder("smol", "fp32"), False),
        "int8, prefill graph (default)": (model_folder("smol", "int8"), True),
        "int8, decoder graph only": (model_folder("smol", "int8"), False),
    }
    results: dict[str, float] = {}
    ids: list[int] = []
    for name, (folder, prefill_graph) in builds.items():
        engine = GenerationEngine(folder, EngineOptions(prefill_graph=prefill_graph))
        try:
            ids = ids or engine.encode(text)[: args.tokens]
            logprobs = [lp for window in windows(ids) for lp in engine.score(window).logprobs]
        finally:
            engine.close()
        results[name] = math.exp(-sum(logprobs) / len(logprobs))
        print(f"{name}: {results[name]:.4f}", flush=True)
    python = openvino_env()
    theirs = openvino_folder(python)
    total = count = 0.0
    for window in windows(ids):
        perplexity = peer_perplexity(python, theirs, window)
        total += math.log(perplexity) * (len(window) - 1)
        count += len(window) - 1
    results["OpenVINO GenAI int8"] = math.exp(total / count)
    write(results, len(ids), [shown(path) for path in args.text], args.out)


def shown(path: Path) -> str:
    """A text's path as the results name it: within the repository, relative to it."""
    path = path.resolve()
    return str(path.relative_to(HERE.parent)) if path.is_relative_to(HERE.parent) else str(path)


def windows(ids: list[int]) -> list[list[int]]:
    """Windows of WINDOW predictions each (every token after the first is predicted once)."""
    return [ids[start : start + WINDOW + 1] for start in range(0, len(ids) - 1, WINDOW)]


def write(results: dict[str, float], tokens: int, text: list[str], out: Path) -> None:
    source = results["float32"]
    lines = [
        f"Perplexity of {tokens} tokens of {', '.join(text)} (windows of {WINDOW}), SmolLM2-135M-Instruct.",
        "",
        "| build | perplexity | vs float32 |",
        "|---|---|---|",
        *(f"| {name} | {value:.4f} | {100 * (value / source - 1):+.2f}% |" for name, value in results.items()),
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "long-perplexity-smol.md").write_text("\n".join(lines) + "\n")
    (out / "long-perplexity-smol.json").write_text(json.dumps({"tokens": tokens, "text": text, **results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
