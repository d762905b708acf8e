"""slmflow's generation engine against OpenVINO GenAI on the same CPU, the same model, the same tokens.

    .venv/bin/python benchmarks/openvino_bench.py [--rounds 5] [--precision int8]

SmolLM2-135M-Instruct, converted from the same checkpoint by `slmflow package`'s converter (the
default int8 recipe: prefill graph and smoothed decode graph; and the builder's int8 with block 128)
and by Optimum Intel (`optimum-cli export openvino`, weights int8, per channel). Ours run as
configured by default, with decode steps on the decoder graph only (answers independent of load),
and without the prefill graph.
OpenVINO GenAI runs in its own environment (benchmarks/.venv-openvino, made on first use with pinned
versions) so it never enters slmflow's dependencies; `openvino_peer.py` is its side. Both run in
process, greedy, forced output lengths, prefix caching off, on the same token ids. The systems take
turns measure by measure (OpenVINO in one long-lived process, `openvino_peer.py`), in a new (seeded)
order every round: a VM whose speed changes within a minute then slows the systems it compares
alike. Figures are medians of the rounds, ratios medians of the per-round ratios:

- decode: one stream, 128 new tokens after a 42-token prompt (tokens after the first / their time);
- prefill: a 512-token prompt, its length / the time to its first token;
- aggregate: 8 and 16 prompts of ~100 tokens sent at once, 64 new tokens each;
- TTFT of the 42-token prompt alone;
- quality: perplexity of the built-in reference text (what `slmflow package` measures), each on its
  own weights.

Writes benchmarks/results/openvino-smol.{md,json}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPENVINO_ENV = HERE / ".venv-openvino"
# What the peer environment installs: torch from the machine's CPU build, the rest pinned.
OPENVINO_PACKAGES = [
    "torch==2.13.0",
    "openvino==2026.4.1",
    "openvino-genai==2026.4.1.0",
    "openvino-tokenizers==2026.4.1.0",
    "optimum-intel[openvino]==2.2.0",
]
DECODE_TOKENS = 128
BATCH_TOKENS = 64
PEER = "OpenVINO GenAI int8"
MEASURES = ("stream", "prefill", "8", "16")  # one stream (decode, TTFT); a 512-token read; 8 and 16 at once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    from multiturn_bench import model_folder
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    # (folder, reads prompts with the prefill graph where the folder has one, decode steps of this many
    # rows or more on it too: 0 never)
    default_rows = EngineOptions.prefill_graph_decode_rows
    ours = {
        f"slmflow {args.precision}": (model_folder("smol", args.precision), True, default_rows),
        f"slmflow {args.precision}, decode on the decoder graph only": (model_folder("smol", args.precision), True, 0),
        f"slmflow {args.precision}, no prefill graph": (model_folder("smol", args.precision), False, 0),
        f"slmflow {args.precision} block 128": (
            model_folder("smol", args.precision, block_size=128),
            True,
            default_rows,
        ),
    }
    python = openvino_env()
    theirs_folder = openvino_folder(python)

    threads = len(os.sched_getaffinity(0))

    # Prefix reuse off: every round sends the same prompts, and the figures are of fresh prompts.
    def options(prefill_graph: bool, decode_rows: int) -> EngineOptions:
        return EngineOptions(
            max_batch_size=args.max_batch_size,
            prefix_cache_bytes=0,
            prefill_graph=prefill_graph,
            prefill_graph_decode_rows=decode_rows,
        )

    engines = {name: GenerationEngine(folder, options(*how)) for name, (folder, *how) in ours.items()}
    systems: dict[str, dict[str, Any]] = {}
    try:
        request = token_ids(next(iter(engines.values())))
        measure: dict[str, Callable[[str], dict[str, float]]] = {
            name: partial(measure_ours, engine, request) for name, engine in engines.items()
        }
        for engine_measure in measure.values():
            for name in MEASURES:  # warm-up
                engine_measure(name)
        with Peer(python, theirs_folder, {**request, "threads": threads}) as peer:
            measure[PEER] = peer.measure
            precision = peer.precision
            rounds: dict[str, list[dict[str, Any]]] = {name: [{} for _ in range(args.rounds)] for name in measure}
            for index in range(args.rounds):
                # A new order every round, seeded: a rotation keeps each system after the same one
                # every round (ours first after OpenVINO), so whatever one leaves behind would
                # always land on the same other.
                order = list(measure)
                random.Random(index).shuffle(order)
                for name in MEASURES:
                    for system in order:
                        rounds[system][index] |= measure[system](name)
        for name, engine in engines.items():
            perplexity = math.exp(-statistics.fmean(engine.score(request["reference"]).logprobs))
            systems[name] = summarize(rounds[name], rounds[PEER]) | {"perplexity": perplexity}
        perplexity = peer_perplexity(python, theirs_folder, request["reference"])
        systems[PEER] = summarize(rounds[PEER], rounds[PEER]) | {"perplexity": perplexity}
    finally:
        for engine in engines.values():
            engine.close()
    report = {
        "machine": f"{cpu()}, {threads} cores",
        "openvino_precision": precision,
        "model": "SmolLM2-135M-Instruct (float32 source perplexity: see benchmarks/results/quantization.md)",
        "rounds": args.rounds,
        "max_batch_size": args.max_batch_size,
        "systems": systems,
    }
    write(report, Path(args.out))


def openvino_env() -> Path:
    """The peer environment's python, made on first use."""
    python = OPENVINO_ENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OPENVINO_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *OPENVINO_PACKAGES], check=True)
        # Pulled in by Optimum; PyPI's torchvision fails to import beside the machine's torch build,
        # and nothing here needs it.
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True)
    return python


def openvino_folder(python: Path) -> Path:
    """SmolLM2 exported by Optimum Intel (int8 weights), made on first use."""
    from slmflow.checkpoints.smol import build_smol
    from slmflow.paths import slmflow_home

    checkpoint = build_smol()
    folder = slmflow_home() / "bench-models" / f"openvino-{checkpoint.name}-int8"
    if not (folder / "openvino_model.xml").is_file():
        export = [str(python.parent / "optimum-cli"), "export", "openvino", "--model", str(checkpoint)]
        export += ["--task", "text-generation-with-past", "--weight-format", "int8", str(folder)]
        subprocess.run(export, check=True)
    return folder


# CPU features that decide both engines' speed: int8 dot products (ours and OpenVINO's int8 weights),
# bfloat16 and float16 arithmetic (OpenVINO's activations), matrix units (AMX).
CPU_FEATURES = ("avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")


def cpu() -> str:
    """The CPU's model and which of CPU_FEATURES it has (Linux), else the architecture."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    pairs = (line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in pairs}
    flags = set(fields.get("flags", "").split())
    have = [feature for feature in CPU_FEATURES if feature in flags]
    return f"{fields.get('model name', platform.machine())} ({', '.join(have) or 'none of ' + ', '.join(CPU_FEATURES)})"


def token_ids(engine: Any) -> dict[str, Any]:
    """The prompts both engines get, as token ids of our tokenizer (the same vocabulary)."""
    from importlib.resources import files

    text = files("slmflow.data").joinpath("reference.txt").read_text()
    words = text.split()
    short = engine.encode(engine.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    while len(short) < 42:
        short = engine.encode(engine.render_chat([{"role": "user", "content": " ".join(words[: len(short)])}]))
    long = (engine.encode(text) * 2)[:512]
    batch = []
    for i in range(16):
        prompt = engine.encode(engine.render_chat([{"role": "user", "content": " ".join(words[i * 60 : i * 60 + 70])}]))
        batch.append(prompt[:100])
    reference = engine.encode(text)
    return {
        "short": short[:42],
        "long": long,
        "batch": batch,
        "reference": reference,
        "decode_tokens": DECODE_TOKENS,
        "batch_tokens": BATCH_TOKENS,
    }


def measure_ours(engine: Any, request: dict[str, Any], name: str) -> dict[str, float]:
    """One of MEASURES on our engine: its figures, keyed as the peer's."""
    from slmflow.generation.params import SamplingParams

    def forced(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)

    def timed(ids: list[int], n: int) -> tuple[float, float, int]:
        first: list[float] = []
        started = time.perf_counter()
        stream = engine.submit(ids, forced(n))
        stream.listen(lambda: first.append(time.perf_counter()) if not first else None)
        completion = stream.result()
        return first[0] - started, time.perf_counter() - started, completion.usage.completion_tokens

    if name == "stream":
        ttft, total, tokens = timed(request["short"], request["decode_tokens"])
        return {"decode_tok_s": (tokens - 1) / (total - ttft), "ttft_short_s": ttft}
    if name == "prefill":
        return {"prefill_tok_s": len(request["long"]) / timed(request["long"], 1)[0]}
    started = time.perf_counter()
    streams = engine.submit_all([(ids, forced(request["batch_tokens"])) for ids in request["batch"][: int(name)]])
    generated = sum(s.result().usage.completion_tokens for s in streams)
    return {f"aggregate_{name}_tok_s": generated / (time.perf_counter() - started)}


class Peer:
    """OpenVINO GenAI in its own environment and process (openvino_peer.py), loaded once, answering
    one measure at a time."""

    def __init__(self, python: Path, folder: Path, request: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [str(python), str(HERE / "openvino_peer.py"), str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._send(request)
        ready = self._receive()
        if not ready.get("ready"):
            raise RuntimeError("the OpenVINO peer did not start")
        self.precision: str = ready["precision"]

    def measure(self, name: str) -> dict[str, float]:
        self._send({"measure": name})
        result = self._receive()
        print(json.dumps({"openvino": result}), flush=True)
        return result

    def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def _receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the OpenVINO peer exited ({self.process.wait()})")
        return json.loads(line)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def peer_perplexity(python: Path, folder: Path, reference: list[int]) -> float:
    """The peer's perplexity of the reference text (a process of its own: Optimum's model)."""
    run = subprocess.run(
        [str(python), str(HERE / "openvino_peer.py"), str(folder)],
        input=json.dumps({"only_perplexity": True, "reference": reference}),
        capture_output=True,
        text=True,
        check=True,
    )
    perplexity = float(json.loads(run.stdout.strip().splitlines()[-1])["perplexity"])
    print(json.dumps({"openvino": {"perplexity": perplexity}}), flush=True)
    return perplexity


def summarize(rounds: list[dict[str, float]], peer: list[dict[str, float]]) -> dict[str, Any]:
    """Medians of the rounds' figures, and of their per-round ratios to the peer's."""
    keys = list(rounds[0])
    return {
        **{key: statistics.median(r[key] for r in rounds) for key in keys},
        "ratios": {key: statistics.median(r[key] / p[key] for r, p in zip(rounds, peer, strict=True)) for key in keys},
        "rounds": rounds,
    }


def write(report: dict[str, Any], out: Path) -> None:
    systems = report["systems"]
    peer = systems[PEER]
    rows = [
        ("decode, 1 stream (tok/s)", "decode_tok_s", "{:.0f}", 1),
        ("prefill, 512-token prompt (tok/s)", "prefill_tok_s", "{:.0f}", 1),
        ("8 prompts at once, aggregate (tok/s)", "aggregate_8_tok_s", "{:.0f}", 1),
        ("16 prompts at once, aggregate (tok/s)", "aggregate_16_tok_s", "{:.0f}", 1),
        ("TTFT, 42-token prompt (ms)", "ttft_short_s", "{:.0f}", 1000),
        ("perplexity of the reference text", "perplexity", "{:.3f}", 1),
    ]
    names = list(systems)
    lines = [
        f"Machine: {report['machine']}; OpenVINO's CPU precision: {report['openvino_precision']}; "
        f"model: {report['model']}; in process, greedy, forced lengths, "
        f"prefix caching off, slmflow at max_batch_size {report['max_batch_size']}; medians of "
        f"{report['rounds']} rounds, the systems alternating measure by measure. Ratios: slmflow / OpenVINO, "
        "medians of the per-round ratios (TTFT and perplexity: lower is better).",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, key, fmt, scale in rows:
        cells = []
        for name in names:
            value = systems[name][key] * scale
            # Perplexity is measured once; the speeds' ratios are medians of per-round ratios.
            ratio = systems[name]["ratios"].get(key, systems[name][key] / peer[key])
            ratio_text = "" if name == PEER else f" ({ratio:.2f}x)"
            cells.append(fmt.format(value) + ratio_text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "openvino-smol.md").write_text("\n".join(lines) + "\n")
    (out / "openvino-smol.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
