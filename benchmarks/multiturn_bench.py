"""Multi-turn chat: how the time to the first token grows with the conversation (the prefix-reuse baseline).

    .venv/bin/python benchmarks/multiturn_bench.py [--size smol|bench] [--rounds 3] [--concurrency 1,4]

A chat client sends the whole conversation every turn. Each conversation here has 6 turns: a user
message of about 230 tokens of plain English (the built-in reference text) asking for a summary, and
a greedy answer forced to 64 tokens that joins the history, so the last turn's prompt passes 1,500
tokens. For each concurrency level, that many conversations run at once, turn by turn, and the time
to the first token (TTFT) of every turn is measured in process on the generation engine, against a
fresh 100-token prompt sent by as many clients at once. The ratio last turn / fresh prompt is what
the prefix-reuse issue bounds (<= 1.5x); without reuse the engine prefills the whole history again.

Writes benchmarks/results/multiturn-SIZE.{md,json}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    from slmflow.generation.engine import GenerationEngine

TURNS = 6
ANSWER_TOKENS = 64
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="smol", choices=["smol", "bench"])
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    folder = model_folder(args.size, args.precision)
    levels = [int(c) for c in args.concurrency.split(",")]
    from slmflow.generation.engine import GenerationEngine

    engine = GenerationEngine(folder)
    try:
        chunks = user_chunks(engine)
        fresh_prompt = fresh_100(engine)
        converse(engine, chunks, 0)  # warm-up
        results = []
        for level in levels:
            fresh: list[float] = []
            turns: list[list[float]] = [[] for _ in range(TURNS)]
            prompt_tokens: list[int] = []
            for _ in range(args.rounds):
                fresh += at_once(lambda _: ttft(engine, fresh_prompt)[0], level)
                for tokens_and_ttfts in at_once(lambda i: converse(engine, chunks, i), level):
                    for turn, (_, seconds) in enumerate(tokens_and_ttfts):
                        turns[turn].append(seconds)
                    prompt_tokens.append(tokens_and_ttfts[-1][0])
            result = {
                "concurrency": level,
                "fresh_prompt_tokens": len(fresh_prompt),
                "fresh_ttft_s": statistics.median(fresh),
                "turn_ttft_s": [statistics.median(t) for t in turns],
                "last_turn_prompt_tokens": int(statistics.median(prompt_tokens)),
            }
            result["last_over_fresh"] = result["turn_ttft_s"][-1] / result["fresh_ttft_s"]
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        engine.close()
    write(
        {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "model": f"{args.size} ({args.precision})",
            "size": args.size,
            "rounds": args.rounds,
            "results": results,
        },
        Path(args.out),
    )


def model_folder(size: str, precision: str) -> Path:
    """The fixture converted at `precision`, cached under SLMFLOW_HOME."""
    from slmflow import convert
    from slmflow.checkpoints.fixture import build_fixture
    from slmflow.checkpoints.smol import build_smol
    from slmflow.paths import slmflow_home

    checkpoint = build_smol() if size == "smol" else build_fixture("bench")
    folder = slmflow_home() / "bench-models" / f"{checkpoint.name}-{precision}"
    if not (folder / "genai_config.json").is_file():
        convert.convert(checkpoint, folder, precision=precision)
    return folder


def user_chunks(engine: GenerationEngine) -> list[str]:
    """Pieces of the reference text of about 230 tokens each, to be summarised."""
    from importlib.resources import files

    words = files("slmflow.data").joinpath("reference.txt").read_text().split()
    chunks, current = [], []
    for word in words * 4:
        current.append(word)
        if len(engine.encode(" ".join(current))) >= 230:
            chunks.append(" ".join(current))
            current = []
    return chunks


def fresh_100(engine: GenerationEngine) -> list[int]:
    """A chat prompt of about 100 tokens."""
    from importlib.resources import files

    words = files("slmflow.data").joinpath("reference.txt").read_text().split()
    count = 40
    while True:
        messages = [SYSTEM, {"role": "user", "content": "Summarize: " + " ".join(words[:count])}]
        prompt = engine.encode(engine.render_chat(messages))
        if len(prompt) >= 100:
            return prompt
        count += 2


def converse(engine: GenerationEngine, chunks: list[str], offset: int) -> list[tuple[int, float]]:
    """One 6-turn conversation: (prompt tokens, TTFT) of each turn."""
    messages = [SYSTEM]
    measured = []
    for turn in range(TURNS):
        chunk = chunks[(offset * TURNS + turn) % len(chunks)]
        messages.append({"role": "user", "content": f"Summarize this in one sentence:\n{chunk}"})
        prompt = engine.encode(engine.render_chat(messages))
        seconds, answer = ttft(engine, prompt)
        measured.append((len(prompt), seconds))
        messages.append({"role": "assistant", "content": answer})
    return measured


def ttft(engine: GenerationEngine, prompt: list[int]) -> tuple[float, str]:
    """(seconds to the first token, the answer) of one greedy request forced to ANSWER_TOKENS."""
    from slmflow.generation.params import SamplingParams

    forced = SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS, min_tokens=ANSWER_TOKENS)
    first: list[float] = []
    started = time.perf_counter()
    stream = engine.submit(prompt, forced)
    stream.listen(lambda: first.append(time.perf_counter()) if not first else None)
    completion = stream.result()
    return first[0] - started, completion.text


def at_once(fn: Callable[[int], Any], count: int) -> list:
    """fn(0..count-1) on as many threads at once; their results in order."""
    results: list = [None] * count
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(i))) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Machine: {report['machine']}; model: {report['model']}; {TURNS}-turn conversations, answers forced to "
        f"{ANSWER_TOKENS} tokens; TTFT in ms, medians over {report['rounds']} rounds and the conversations "
        "running at once; in process (the generation engine), no prefix reuse.",
        "",
        "| conversations at once | fresh ~100-token prompt | "
        + " | ".join(f"turn {t + 1}" for t in range(TURNS))
        + " | last-turn prompt (tokens) | last turn / fresh |",
        "|---|---|" + "---|" * TURNS + "---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['concurrency']} | {1000 * r['fresh_ttft_s']:.0f} | "
            + " | ".join(f"{1000 * t:.0f}" for t in r["turn_ttft_s"])
            + f" | {r['last_turn_prompt_tokens']} | {r['last_over_fresh']:.1f}x |"
        )
    (out / f"multiturn-{report['size']}.md").write_text("\n".join(lines) + "\n")
    (out / f"multiturn-{report['size']}.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
