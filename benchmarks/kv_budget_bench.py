"""What the KV memory budget (`--kv-cache-mb`) holds and what it costs, on SmolLM2-135M-Instruct int8.

    .venv/bin/python benchmarks/kv_budget_bench.py [--requests 16] [--prompt-tokens 1500] [--tokens 128]

Sends --requests prompts of about --prompt-tokens tokens at once (distinct windows of the built-in
texts; prefix reuse off, so nothing is shared), each forced to --tokens greedy tokens, to the engine in
process at max_batch_size 16, under three budgets: the default (a quarter of the machine's memory:
nothing waits), twice the smallest, and the smallest (one request at the full context, 8,192
positions). Reports the KV buffer's peak, requests parked, prompt tokens read (re-reads included),
time to first token and the aggregate speed. Writes benchmarks/results/kv-budget-smol.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from multiturn_bench import model_folder
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    folder = model_folder("smol", "int8")
    probe = GenerationEngine(folder, EngineOptions(kv_cache_bytes=1))  # raised to the smallest budget
    smallest = probe.stats.kv_budget_bytes
    probe.close()
    rows = []
    for name, times in (("default", None), ("2 x smallest", 2), ("smallest", 1)):
        budget = None if times is None else times * smallest
        engine = GenerationEngine(folder, EngineOptions(max_batch_size=16, prefix_cache_bytes=0, kv_cache_bytes=budget))
        try:
            prompts = prompt_ids(engine, args.requests, args.prompt_tokens)
            rows.append({"budget": name, **measure(engine, prompts, args.tokens)})
        finally:
            engine.close()
        print(rows[-1], flush=True)
    write(rows, args, args.out)


def prompt_ids(engine: Any, count: int, length: int) -> list[list[int]]:
    """`count` different prompts of `length` tokens: windows of the built-in texts, repeated."""
    from importlib.resources import files

    data = files("slmflow.data")
    text = "\n".join(data.joinpath(name).read_text() for name in ("calibration.txt", "reference.txt"))
    ids = engine.encode(text)
    ids = ids * (1 + (length + count * 97) // len(ids))
    return [ids[i * 97 : i * 97 + length] for i in range(count)]


def measure(engine: Any, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    from slmflow.generation.params import SamplingParams

    forced = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens)
    read_before = engine.stats.prompt_tokens
    firsts: dict[int, float] = {}
    started = time.perf_counter()
    streams = engine.submit_all([(ids, forced) for ids in prompts])
    for i, stream in enumerate(streams):
        stream.listen(lambda i=i: firsts.setdefault(i, time.perf_counter()))
    generated = sum(stream.result().usage.completion_tokens for stream in streams)
    seconds = time.perf_counter() - started
    ttfts = sorted(firsts[i] - started for i in range(len(prompts)))
    stats = engine.stats
    return {
        "budget_mb": stats.kv_budget_bytes / 2**20,
        "peak_kv_mb": stats.kv_slots_peak_bytes / 2**20,
        "parked": stats.parked,
        "prompt_tokens_read": stats.prompt_tokens - read_before,
        "prompt_tokens_sent": sum(map(len, prompts)),
        "ttft_median_s": statistics.median(ttfts),
        "ttft_last_s": ttfts[-1],
        "seconds": seconds,
        "aggregate_tok_s": generated / seconds,
    }


def write(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; SmolLM2-135M-Instruct int8 in process, "
        f"max_batch_size 16, prefix reuse off; {args.requests} prompts of {args.prompt_tokens} tokens sent "
        f"at once, {args.tokens} forced greedy tokens each; one round per budget.",
        "",
        "| budget | budget MB | peak KV MB | parked | prompt tokens read / sent | TTFT median / last (s) "
        "| aggregate tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['budget_mb']:.0f} | {r['peak_kv_mb']:.0f} | {r['parked']} | "
            f"{r['prompt_tokens_read']} / {r['prompt_tokens_sent']} | {r['ttft_median_s']:.1f} / "
            f"{r['ttft_last_s']:.1f} | {r['aggregate_tok_s']:.0f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv-budget-smol.md").write_text("\n".join(lines) + "\n")
    (out / "kv-budget-smol.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(out)}, "rows": rows}, indent=2)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
