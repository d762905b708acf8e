"""Multi-turn chat and continuous batching: TTFT per turn with and without prefix reuse, and what the
continuous scheduler costs or gains against the ONNX Runtime GenAI one it replaced on CPU.

    .venv/bin/python benchmarks/multiturn_bench.py [--size smol|bench] [--rounds 3] [--concurrency 1,4]

A chat client sends the whole conversation every turn. Each conversation here has 6 turns: first a
document of about 1,200 tokens (the built-in reference text) to summarise, then short follow-up
questions; greedy answers of at most 64 tokens join the history, so the last turn's prompt passes
1,500 tokens. For each concurrency level, that many conversations run at once, turn by turn, and the
time to the first token (TTFT) of every turn is measured in process on the generation engine, against
a fresh 100-token prompt sent by as many clients at once. Three engines on the same model take turns
round by round: the continuous scheduler keeping prefixes (the default), the same keeping none
(prefix_cache_bytes=0), and the ONNX Runtime GenAI scheduler ("genai", the CPU default before). The
ratio last turn / fresh prompt is what the prefix-reuse issue bounds (<= 1.5x).

In the same run, continuous against genai: aggregate tokens/s of 8 clients on fresh prompts (64
forced tokens each); head-of-line waiting (TTFT of a short request sent while 4 long ones run); and
memory: 32 conversations at once with a small prefix budget, the kept bytes sampled every turn.

Writes benchmarks/results/multiturn-SIZE.{md,json}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    engines = {
        "reuse": GenerationEngine(folder),
        "no reuse": GenerationEngine(folder, EngineOptions(prefix_cache_bytes=0)),
        "genai (before)": GenerationEngine(folder, EngineOptions(scheduler="genai")),
    }
    results: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    try:
        first = engines["reuse"]
        document, followups = conversation_parts(first)
        fresh_prompt = fresh_100(first)
        for engine in engines.values():
            converse(engine, document, followups, 0)  # warm-up
        conversation = itertools.count(1)  # every conversation opens with its own words: no shared prefix
        for level in levels:
            raw: dict[str, list[Round]] = {mode: [] for mode in engines}
            for _ in range(args.rounds):  # the two engines take turns, so machine drift hits both alike
                ids = [next(conversation) for _ in range(level)]  # the same conversations on both
                for mode, engine in engines.items():
                    raw[mode].append(one_round(engine, level, document, followups, fresh_prompt, ids))
            for mode, rounds in raw.items():
                results.append(summarize(mode, level, len(fresh_prompt), rounds))
        pair = {"continuous": engines["reuse"], "genai": engines["genai (before)"]}
        extra["throughput_8"] = throughput(pair, fresh_prompt, args.rounds)
        extra["head_of_line"] = head_of_line(pair, fresh_prompt, args.rounds)
    finally:
        for engine in engines.values():
            engine.close()
    write(
        {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "model": f"{args.size} ({args.precision})",
            "size": args.size,
            "rounds": args.rounds,
            "results": results,
            **extra,
            "memory_32": [memory_32(folder, document, followups, budget_mb) for budget_mb in (1024, 128)],
        },
        Path(args.out),
    )


def throughput(engines: dict[str, GenerationEngine], prompt: list[int], rounds: int) -> dict[str, float]:
    """Aggregate tokens/s of 8 clients sending a fresh prompt at once, 64 forced tokens each;
    median of `rounds` alternated rounds per scheduler."""
    from slmflow.generation.params import SamplingParams

    forced = SamplingParams(temperature=0.0, max_tokens=64, min_tokens=64)
    timings: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds + 1):  # the first round warms up
        for name, engine in engines.items():
            started = time.perf_counter()
            at_once(lambda i, engine=engine: engine.generate([1000 + i, *prompt], forced), 8)
            timings[name].append(8 * 64 / (time.perf_counter() - started))
    result = {name: statistics.median(values[1:]) for name, values in timings.items()}
    print(json.dumps({"throughput_8_tok_s": result}), flush=True)
    return result


def head_of_line(engines: dict[str, GenerationEngine], prompt: list[int], rounds: int) -> dict[str, float]:
    """TTFT of a short request sent once 4 long ones (256 forced tokens) have started answering,
    against the same request alone; medians of `rounds` rounds."""
    from slmflow.generation.params import SamplingParams

    long = SamplingParams(temperature=0.0, max_tokens=256, min_tokens=256)
    result: dict[str, float] = {}
    for name, engine in engines.items():
        alone, behind = [], []
        for r in range(rounds):
            alone.append(ttft(engine, [2000 + r, *prompt])[0])
            streams = engine.submit_all([([3000 + 10 * r + i, *prompt], long) for i in range(4)])
            for stream in streams:
                next(iter(stream))
            behind.append(ttft(engine, [4000 + r, *prompt])[0])
            for stream in streams:
                stream.result()
        result[f"{name}_alone_s"] = statistics.median(alone)
        result[f"{name}_behind_4_running_s"] = statistics.median(behind)
    print(json.dumps({"head_of_line": result}), flush=True)
    return result


def memory_32(folder: Path, document: str, followups: list[str], budget_mb: int) -> dict[str, Any]:
    """32 conversations at once, 3 turns each, within a prefix budget: the most KV kept at any
    turn's end, against the budget, and the process's peak RSS."""
    import resource

    from slmflow.generation.engine import EngineOptions, GenerationEngine

    budget = budget_mb << 20
    engine = GenerationEngine(folder, EngineOptions(prefix_cache_bytes=budget))
    kept: list[int] = []
    short_document = " ".join(document.split()[:150])
    try:

        def conversation(i: int) -> list[tuple[int, float, int]]:
            messages = [{"role": "system", "content": f"Conversation {i}. Answer briefly."}]
            measured = []
            for turn in range(3):
                text = f"Summarize this text:\n{short_document}" if turn == 0 else followups[turn - 1]
                messages.append({"role": "user", "content": text})
                seconds, answer, cached = ttft(engine, engine.encode(engine.render_chat(messages)))
                kept.append(engine.stats.prefix_cache_bytes)
                measured.append((0, seconds, cached))
                messages.append({"role": "assistant", "content": answer})
            return measured

        turns = at_once(conversation, 32)
        result = {
            "budget_bytes": budget,
            "max_kept_bytes": max(kept),
            "hits": engine.stats.prefix_hits,
            "turns": 32 * 3,
            "cached_turns": sum(1 for c in turns for _, _, cached in c if cached),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        }
    finally:
        engine.close()
    print(json.dumps({"memory_32": result}), flush=True)
    return result


def model_folder(size: str, precision: str, block_size: int | None = None) -> Path:
    """The fixture converted at `precision` (and int4/int8 `block_size`, else the default recipe) as
    `slmflow package` converts it, cached under SLMFLOW_HOME by what made it (converter_digest)."""
    from slmflow import convert
    from slmflow.checkpoints.fixture import build_fixture
    from slmflow.checkpoints.smol import build_smol
    from slmflow.paths import slmflow_home

    checkpoint = build_smol() if size == "smol" else build_fixture("bench")
    quantization = convert.Quantization(block_size=block_size) if block_size else None
    suffix = f"-b{block_size}" if block_size else ""
    folder = slmflow_home() / "bench-models" / f"{checkpoint.name}-{precision}{suffix}-{converter_digest()}"
    if not (folder / "genai_config.json").is_file():
        convert.convert(checkpoint, folder, precision=precision, quantization=quantization)
    return folder


def converter_digest() -> str:
    """What a build depends on besides its checkpoint and options: our conversion code and the
    model builder's version. A cached build made by other code is never measured (one converted
    before the decode graph was smoothed had kept the builder's)."""
    import hashlib
    from importlib.metadata import version

    from slmflow import convert, decode_graph, prefill_graph

    digest = hashlib.sha256(version("onnxruntime-genai").encode())
    for module in (convert, prefill_graph, decode_graph):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()[:10]


@dataclass
class Round:
    fresh: list[float]  # TTFT of each fresh prompt
    conversations: list[list[tuple[int, float, int]]]  # per conversation, per turn: (prompt, TTFT, cached)


def one_round(
    engine: GenerationEngine,
    level: int,
    document: str,
    followups: list[str],
    fresh_prompt: list[int],
    ids: list[int],
) -> Round:
    fresh = [seconds for seconds, _, _ in at_once(lambda _: ttft(engine, fresh_prompt), level)]
    return Round(fresh, at_once(lambda i: converse(engine, document, followups, ids[i]), level))


def summarize(mode: str, level: int, fresh_tokens: int, rounds: list[Round]) -> dict[str, Any]:
    conversations = [c for r in rounds for c in r.conversations]
    result = {
        "mode": mode,
        "concurrency": level,
        "fresh_prompt_tokens": fresh_tokens,
        "fresh_ttft_s": statistics.median(s for r in rounds for s in r.fresh),
        "turn_ttft_s": [statistics.median(c[turn][1] for c in conversations) for turn in range(TURNS)],
        "last_turn_prompt_tokens": int(statistics.median(c[-1][0] for c in conversations)),
        "last_turn_cached_tokens": int(statistics.median(c[-1][2] for c in conversations)),
    }
    result["last_over_fresh"] = result["turn_ttft_s"][-1] / result["fresh_ttft_s"]
    print(json.dumps(result), flush=True)
    return result


def conversation_parts(engine: GenerationEngine) -> tuple[str, list[str]]:
    """A document of about 1,200 tokens, and the follow-up questions asked about it."""
    from importlib.resources import files

    words = files("slmflow.data").joinpath("reference.txt").read_text().split()
    document: list[str] = []
    for word in words * 4:
        document.append(word)
        if len(document) % 50 == 0 and len(engine.encode(" ".join(document))) >= 1200:
            break
    followups = [
        "What is the main idea of the first paragraph?",
        "Give one example from the text.",
        "Who would find this text useful?",
        "Say it again in simpler words.",
        "What is one question the text leaves open?",
    ]
    return " ".join(document), followups


def fresh_100(engine: GenerationEngine) -> list[int]:
    """A chat prompt of about 100 tokens."""
    from importlib.resources import files

    words = files("slmflow.data").joinpath("reference.txt").read_text().split()
    count = 40
    while True:
        messages = [{"role": "user", "content": "Summarize: " + " ".join(words[:count])}]
        prompt = engine.encode(engine.render_chat(messages))
        if len(prompt) >= 100:
            return prompt
        count += 2


def converse(
    engine: GenerationEngine, document: str, followups: list[str], offset: int
) -> list[tuple[int, float, int]]:
    """One 6-turn conversation: (prompt tokens, TTFT, cached prompt tokens) of each turn. Each of the
    conversations running at once opens with its own words, so they share no prefix."""
    messages = [{"role": "system", "content": f"Conversation {offset}. You are a helpful assistant. Answer briefly."}]
    measured = []
    for turn in range(TURNS):
        text = f"Summarize this text:\n{document}" if turn == 0 else followups[(turn - 1) % len(followups)]
        messages.append({"role": "user", "content": text})
        prompt = engine.encode(engine.render_chat(messages))
        seconds, answer, cached = ttft(engine, prompt)
        measured.append((len(prompt), seconds, cached))
        messages.append({"role": "assistant", "content": answer})
    return measured


def ttft(engine: GenerationEngine, prompt: list[int]) -> tuple[float, str, int]:
    """(seconds to the first token, the answer, cached prompt tokens) of one greedy request of at
    most ANSWER_TOKENS. The first token is timed as a request for one token (its completion), not as
    the first streamed text: a token may carry no text of its own (a byte of a character, which the
    random-weight bench fixture emits often), and the answer's text then starts a step later. The
    answer itself comes from a second request, which finds the whole prompt kept where reuse is on."""
    from slmflow.generation.params import SamplingParams

    started = time.perf_counter()
    first = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1))
    seconds = time.perf_counter() - started
    completion = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS))
    return seconds, completion.text, first.usage.cached_tokens


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
        f"Machine: {report['machine']}; model: {report['model']}; {TURNS}-turn conversations (a ~1,200-token "
        f"document, then short questions), greedy answers of at most {ANSWER_TOKENS} tokens; TTFT in ms, medians "
        f"over {report['rounds']} rounds and the conversations running at once; in process (the generation engine).",
        "",
        "| prefix reuse | conversations at once | fresh ~100-token prompt | "
        + " | ".join(f"turn {t + 1}" for t in range(TURNS))
        + " | last-turn prompt (cached) | last turn / fresh |",
        "|---|---|---|" + "---|" * TURNS + "---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {1000 * r['fresh_ttft_s']:.0f} | "
            + " | ".join(f"{1000 * t:.0f}" for t in r["turn_ttft_s"])
            + f" | {r['last_turn_prompt_tokens']} ({r['last_turn_cached_tokens']}) | {r['last_over_fresh']:.2f}x |"
        )
    throughput, line = report["throughput_8"], report["head_of_line"]
    lines += [
        "",
        "Continuous scheduler against the ONNX Runtime GenAI one (the CPU default before), same run:",
        "",
        "| measure | continuous | genai (before) |",
        "|---|---|---|",
        f"| 8 clients, fresh prompts, 64 tokens each: aggregate tok/s | {throughput['continuous']:.0f} | "
        f"{throughput['genai']:.0f} |",
        f"| TTFT of a fresh prompt alone, ms | {1000 * line['continuous_alone_s']:.0f} | "
        f"{1000 * line['genai_alone_s']:.0f} |",
        f"| TTFT of the same prompt sent while 4 long requests run, ms | "
        f"{1000 * line['continuous_behind_4_running_s']:.0f} | {1000 * line['genai_behind_4_running_s']:.0f} |",
        "",
    ]
    for memory in report["memory_32"]:
        lines.append(
            f"32 conversations at once, 3 turns each, prefix budget {memory['budget_bytes'] >> 20} MB: at most "
            f"{memory['max_kept_bytes'] / 2**20:.1f} MB kept at any turn's end; {memory['cached_turns']} of "
            f"{memory['turns']} turns reused a prefix; peak RSS of the benchmark process so far "
            f"{memory['peak_rss_mb']} MB."
        )
    (out / f"multiturn-{report['size']}.md").write_text("\n".join(lines) + "\n")
    (out / f"multiturn-{report['size']}.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
