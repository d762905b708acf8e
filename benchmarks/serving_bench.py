"""Serving benchmark: slmflow against MLflow's scoring server and the raw engine, in one run.

Systems, all on the same ONNX int4 weights (the transformers route on the same weights in fp32):
  ceiling            raw ONNX Runtime GenAI in-process: Generator loop (1 stream), batched Generator (N)
  engine             slmflow's generation engine in-process (what `slmflow serve` runs, without HTTP)
  slmflow-serve      `slmflow serve`, OpenAI API over HTTP, streaming
  tutorial-mlflow    the tutorial's wrapper (benchmarks/tutorial_model.py) under `mlflow models serve`
  flavor-mlflow      our onnx_genai flavor under `mlflow models serve`
  transformers-mlflow  MLflow's transformers flavor under `mlflow models serve`

Every request sends the same chat prompt (the ceiling gets the same tokens) and asks for exactly
`--tokens` new tokens (min = max). All systems run side by side: at each concurrency level, one
untimed warm-up round, then `--repetitions` rounds that take the systems in turn; medians are
reported. Clients are asyncio + aiohttp with their connections opened before the clock starts.

    python benchmarks/serving_bench.py                    # the full run on the bench fixture
    python benchmarks/serving_bench.py --size tiny --quick   # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import aiohttp

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SETTLE_S = 0.5  # between systems: the previous one's thread pools stop spinning before the next starts
PROMPT = "Tell me about the history of the capital cities of Europe and how they grew over the centuries."


@dataclass
class Timing:
    """One request: when it started, when each token (or the whole answer) arrived."""

    start: float
    token_times: list[float]
    tokens: int

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        """Gaps between streamed chunks (a chunk carries the tokens generated since the last one)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None when the answer arrived in one piece."""
        if len(self.token_times) < 2 or self.tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.tokens - 1)


Request = Callable[["aiohttp.ClientSession"], Awaitable[Timing]]


@dataclass
class Point:
    system: str
    concurrency: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    itl_p50: float | None
    itl_p95: float | None
    tpot_p50: float | None
    peak_rss_mb: float
    rounds: list[float] = field(default_factory=list)  # tokens/s of each repetition, in round order
    ratios: dict[str, float] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(system: str, concurrency: int, runs: list[tuple[float, list[Timing]]], rss: float) -> Point:
    """Medians over repetitions of aggregate tokens/s; percentiles over all requests' latencies."""
    rounds = [sum(t.tokens for t in timings) / wall for wall, timings in runs]
    timings = [t for _, ts in runs for t in ts]
    itls = [i for t in timings for i in t.itls]
    tpots = [t.tpot for t in timings if t.tpot is not None]
    return Point(
        system,
        concurrency,
        statistics.median(rounds),
        percentile([t.ttft for t in timings], 0.5),
        percentile([t.ttft for t in timings], 0.95),
        percentile(itls, 0.5) if itls else None,
        percentile(itls, 0.95) if itls else None,
        percentile(tpots, 0.5) if tpots else None,
        rss,
        rounds,
    )


# --- systems ---------------------------------------------------------------------------------


class System(Protocol):
    name: str

    def run(self, concurrency: int) -> tuple[float, list[Timing]]: ...

    def rss_mb(self) -> float: ...

    def close(self) -> None: ...


class Ceiling:
    """Raw ONNX Runtime GenAI: one Generator for 1 stream, one batched Generator for N."""

    name = "ceiling"

    def __init__(self, onnx_dir: Path, tokens: int) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(onnx_dir))
        threads = len(os.sched_getaffinity(0))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og, self.tokens = og, tokens
        self.model = og.Model(config)
        # The very tokens the servers see: the chat template applied to the prompt.
        self.prompt = og.Tokenizer(self.model).encode(chat_prompt(onnx_dir))

    def run(self, concurrency: int) -> tuple[float, list[Timing]]:
        import numpy as np

        params = self.og.GeneratorParams(self.model)
        length = len(self.prompt) + self.tokens
        params.set_search_options(batch_size=concurrency, max_length=length, min_length=length)
        start = time.perf_counter()
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.tile(self.prompt, (concurrency, 1)) if concurrency > 1 else self.prompt)
        steps = []
        while not generator.is_done():
            generator.generate_next_token()
            steps.append(time.perf_counter())
        timings = [Timing(start, steps, len(steps)) for _ in range(concurrency)]
        return steps[-1] - start, timings

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def close(self) -> None:
        del self.model


class Engine:
    """slmflow's generation engine in process, the requests submitted together."""

    name = "engine"

    def __init__(self, onnx_dir: Path, tokens: int) -> None:
        from slmflow.generation.engine import EngineOptions, GenerationEngine
        from slmflow.generation.params import SamplingParams

        # As `slmflow serve` runs it here: 16 slots; prefix reuse off, since every request is the
        # same prompt and the figures are of fresh prompts.
        self.engine = GenerationEngine(onnx_dir, EngineOptions(max_batch_size=16, prefix_cache_bytes=0))
        self.prompt = self.engine.encode(chat_prompt(onnx_dir))
        self.params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens)

    def run(self, concurrency: int) -> tuple[float, list[Timing]]:
        start = time.perf_counter()
        streams = self.engine.submit_all([(self.prompt, self.params)] * concurrency)
        times: list[list[float]] = [[] for _ in streams]
        for stream, arrivals in zip(streams, times, strict=True):
            stream.listen(lambda arrivals=arrivals: arrivals.append(time.perf_counter()))
        completions = [stream.result() for stream in streams]
        end = time.perf_counter()
        timings = [
            Timing(start, arrivals, c.usage.completion_tokens) for arrivals, c in zip(times, completions, strict=True)
        ]
        return end - start, timings

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def close(self) -> None:
        self.engine.close()


class HttpSystem:
    """A server in a child process, driven by `concurrency` concurrent clients, one request each."""

    def __init__(
        self, name: str, command: list[str], request: Request, ready_path: str, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.request = name, request
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", **(env or {})}
        # The server's stdout for its whole life; closed when the harness exits.
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115
        command = [part.replace("{port}", str(self.port)) for part in command]
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.peak_rss = 0.0
        self.ready_path = ready_path
        wait_ready(self.process, self.url + ready_path, Path(self.log.name))
        import psutil

        # Found once: listing a process's children scans every process on the machine, which,
        # repeated by several idle servers' samplers, took CPU from the one being measured.
        root = psutil.Process(self.process.pid)
        self._tree = [root, *root.children(recursive=True)]

    def run(self, concurrency: int) -> tuple[float, list[Timing]]:
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample_rss, args=(stop,), daemon=True)
        sampler.start()
        try:
            return asyncio.run(self._run(concurrency))
        finally:
            stop.set()
            sampler.join()

    async def _run(self, concurrency: int) -> tuple[float, list[Timing]]:
        """All clients on one event loop with aiohttp (as vLLM's serving benchmark does): the client's
        own CPU use, which competes with the server on a small machine, stays small."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=600)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(self.url, timeout=timeout, connector=connector) as session:
            # Like long-lived clients, keep a connection open per client: connecting is not timed.
            await asyncio.gather(*(self._ping(session) for _ in range(concurrency)))
            start = time.perf_counter()
            timings = await asyncio.gather(*(self.request(session) for _ in range(concurrency)))
        return max(t.token_times[-1] for t in timings) - start, timings

    async def _ping(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.ready_path) as response:
            response.raise_for_status()
            await response.read()

    def rss_mb(self) -> float:
        return self.peak_rss

    def _sample_rss(self, stop: threading.Event) -> None:
        """The peak RSS of the server's processes while it serves (each read is one small /proc file)."""
        import psutil

        while True:
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in self._tree) / 2**20)
            if stop.wait(0.1):
                return

    def close(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)


def stream_chat(tokens: int) -> Request:
    """An OpenAI streaming chat request; each content chunk is timed."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def request(session: aiohttp.ClientSession) -> Timing:
        start, times, count = time.perf_counter(), [], 0
        async with session.post("/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    count = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
        if not times:
            raise RuntimeError(f"a stream from {response.url} carried no text")
        return Timing(start, times, count)

    return request


def chat_prompt(model_dir: Path) -> str:
    from slmflow.generation.chat import ChatTemplate

    template = ChatTemplate.from_model_dir(model_dir)
    assert template is not None, f"{model_dir} has no chat template"
    return template.render([{"role": "user", "content": PROMPT}])


def invocations(body: dict, tokens: int, count_from_usage: bool) -> Request:
    """MLflow's /invocations: no streaming, so the whole answer arrives at once."""

    async def request(session: aiohttp.ClientSession) -> Timing:
        start = time.perf_counter()
        async with session.post("/invocations", json=body) as response:
            response.raise_for_status()
            payload = await response.json()
        done = time.perf_counter()
        count = tokens
        if count_from_usage:
            answer = payload[0] if isinstance(payload, list) else payload["predictions"][0]
            count = answer["usage"]["completion_tokens"]
        return Timing(start, [done], count)

    return request


def mlflow_serve(model_path: str) -> list[str]:
    return [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        model_path,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        "{port}",
    ]


# --- setup -----------------------------------------------------------------------------------


def prepare_models(size: str, tokens: int, work: Path) -> dict[str, Path]:
    """The fixture, its int4 ONNX folder, and each system's MLflow model folder."""
    import mlflow

    sys.path.insert(0, str(HERE))
    import tutorial_model
    from slmflow import convert, onnx_genai
    from slmflow.checkpoints.fixture import build_fixture
    from slmflow.checkpoints.smol import SMOL, build_smol
    from slmflow.packaging import transformers_model_config, transformers_requirements

    checkpoint = build_smol() if size == SMOL else build_fixture(size)
    onnx_dir = convert.convert(checkpoint, work / "int4", precision="int4")
    onnx_genai.save_model(onnx_dir, work / "flavor", task="chat", generation_defaults={"model_name": "bench"})
    tutorial_model.save(str(onnx_dir), str(work / "tutorial"), tokens)
    import transformers

    pipe = transformers.pipeline("text-generation", model=str(checkpoint), device="cpu")
    config = transformers_model_config({"max_tokens": tokens, "temperature": 0}) | {"min_new_tokens": tokens}
    mlflow.transformers.save_model(
        pipe,
        str(work / "transformers"),
        task="llm/v1/chat",
        model_config=config,
        pip_requirements=transformers_requirements(),
    )
    return {"checkpoint": checkpoint, "onnx": onnx_dir, **{k: work / k for k in ("flavor", "tutorial", "transformers")}}


def systems(models: dict[str, Path], tokens: int, only: set[str]) -> Iterator[Callable[[], System]]:
    chat = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0.0,
    }
    serve = [str(BIN / "slmflow"), "serve", str(models["flavor"]), "--port", "{port}", "--log-level", "warning"]
    serve += ["--max-batch-size", "16"]
    factories: dict[str, Callable[[], System]] = {
        "ceiling": lambda: Ceiling(models["onnx"], tokens),
        "engine": lambda: Engine(models["onnx"], tokens),
        "slmflow-serve": lambda: HttpSystem(
            "slmflow-serve", [*serve, "--traces", "false", "--metrics-interval", "0"], stream_chat(tokens), "/health"
        ),
        # The same server recording every request as an MLflow trace, and its serving metrics.
        "slmflow-serve-traced": lambda: HttpSystem(
            "slmflow-serve-traced",
            [*serve, "--trace-sample-rate", "1.0"],
            stream_chat(tokens),
            "/health",
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{models['flavor'].parent / 'traces.db'}"},
        ),
        "tutorial-mlflow": lambda: HttpSystem(
            "tutorial-mlflow",
            mlflow_serve(str(models["tutorial"])),
            invocations({"prompt": chat_prompt(models["onnx"])}, tokens, False),
            "/ping",
        ),
        "flavor-mlflow": lambda: HttpSystem(
            "flavor-mlflow", mlflow_serve(str(models["flavor"])), invocations(chat, tokens, True), "/ping"
        ),
        "transformers-mlflow": lambda: HttpSystem(
            "transformers-mlflow",
            mlflow_serve(str(models["transformers"])),
            invocations({"messages": chat["messages"]}, tokens, True),
            "/ping",
        ),
    }
    for name, factory in factories.items():
        if name in only:
            yield factory


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout}s: {log.read_text()[-2000:]}")


# --- machine ----------------------------------------------------------------------------------


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Best of a few large array copies: bytes read + bytes written per second."""
    import numpy as np

    source = np.ones(size_mb * 2**20 // 8)
    target = np.empty_like(source)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes_per_token(onnx_dir: Path) -> int:
    """Weights read to decode one token: all of them but the embedding table, of which one row is read."""
    config = json.loads((onnx_dir / "genai_config.json").read_text())["model"]
    data = sum(p.stat().st_size for p in onnx_dir.glob("*.onnx*"))
    embedding = config["vocab_size"] * config["decoder"]["hidden_size"] * 4  # kept in fp32 by the builder
    return data - embedding


# --- report -----------------------------------------------------------------------------------


def add_ratios(points: list[Point]) -> None:
    """Paired: the median over rounds of this system's tokens/s over the reference's in the same
    round, seconds apart, so a slow spell of the machine cancels out."""
    by = {(p.system, p.concurrency): p for p in points}
    for point in points:
        for reference in ("ceiling", "engine", "tutorial-mlflow", "slmflow-serve"):
            base = by.get((reference, point.concurrency))
            if base and all(base.rounds):
                pairs = [mine / theirs for mine, theirs in zip(point.rounds, base.rounds, strict=True)]
                point.ratios[f"vs {reference}"] = statistics.median(pairs)


def markdown(points: list[Point], machine: dict, bandwidth: dict) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores; model: {machine['model']}; "
        f"{machine['tokens']} new tokens per request; medians of {machine['repetitions']} repetitions, the systems "
        "taking turns in each; ratios are medians of the per-repetition ratios.",
        "",
        "| system | clients | tokens/s | TTFT p50 (s) | TTFT p95 (s) | ITL p50 (ms) | ITL p95 (ms) | TPOT p50 (ms) | peak RSS (MB) | vs ceiling | vs engine | vs tutorial |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        itl50 = f"{p.itl_p50 * 1000:.1f}" if p.itl_p50 is not None else "n/a"
        itl95 = f"{p.itl_p95 * 1000:.1f}" if p.itl_p95 is not None else "n/a"
        tpot = f"{p.tpot_p50 * 1000:.1f}" if p.tpot_p50 is not None else "n/a"

        def ratio(key: str, p: Point = p) -> str:
            return f"{p.ratios[key]:.2f}x" if key in p.ratios else "-"

        lines.append(
            f"| {p.system} | {p.concurrency} | {p.tokens_per_s:.1f} | {p.ttft_p50:.3f} | {p.ttft_p95:.3f} | "
            f"{itl50} | {itl95} | {tpot} | {p.peak_rss_mb:.0f} | {ratio('vs ceiling')} | {ratio('vs engine')} | "
            f"{ratio('vs tutorial-mlflow')} |"
        )
    lines += [
        "",
        "ITL: the gaps between streamed chunks; a chunk carries every token generated since the previous "
        "one. TPOT: time per output token after the first. n/a: the answer arrives in one piece.",
        "",
        f"Memory bandwidth (array copy): {bandwidth['gbs']:.1f} GB/s; weights read per decoded token: "
        f"{bandwidth['bytes_per_token'] / 1e6:.1f} MB; bound: {bandwidth['bound_tokens_per_s']:.0f} tokens/s; "
        f"single-stream ceiling decode reaches {bandwidth['single_stream_pct']:.0f}% of it.",
    ]
    traced = [p for p in points if p.system == "slmflow-serve-traced" and "vs slmflow-serve" in p.ratios]
    if traced:
        ratios = ", ".join(f"{p.concurrency} clients {p.ratios['vs slmflow-serve']:.2f}x" for p in traced)
        lines += ["", f"Every request traced into MLflow, vs tracing off (paired, same run): {ratios}."]
    return "\n".join(lines) + "\n"


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for system in dict.fromkeys(p.system for p in points):
        mine = [p for p in points if p.system == system]
        left.plot([p.concurrency for p in mine], [p.tokens_per_s for p in mine], marker="o", label=system)
        right.plot([p.concurrency for p in mine], [p.ttft_p50 for p in mine], marker="o", label=system)
    left.set(xlabel="concurrent clients", ylabel="aggregate output tokens/s", title="Throughput")
    right.set(xlabel="concurrent clients", ylabel="time to first token p50 (s)", title="Latency", yscale="log")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", default="bench", choices=["bench", "tiny", "smol"], help="smol: SmolLM2-135M-Instruct"
    )
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--systems", default="ceiling,slmflow-serve,tutorial-mlflow,flavor-mlflow,transformers-mlflow")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--quick", action="store_true", help="concurrency 1,2, one repetition, 64 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.repetitions, args.tokens = "1,2", 1, 64
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slmflow-bench-") as work:
        models = prepare_models(args.size, args.tokens, Path(work))
        points = measure(list(systems(models, args.tokens, set(args.systems.split(",")))), levels, args.repetitions)
        bytes_per_token = weight_bytes_per_token(models["onnx"])
    add_ratios(points)
    gbs = memory_bandwidth_gbs()
    single = next((p.tokens_per_s for p in points if p.system == "ceiling" and p.concurrency == 1), 0.0)
    bound = gbs * 1e9 / bytes_per_token
    bandwidth = {
        "gbs": gbs,
        "bytes_per_token": bytes_per_token,
        "bound_tokens_per_s": bound,
        "single_stream_pct": 100 * single / bound,
    }
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "model": f"{args.size} fixture, ONNX int4",
        "tokens": args.tokens,
        "repetitions": args.repetitions,
    }
    report = {"machine": machine, "bandwidth": bandwidth, "points": [asdict(p) for p in points]}
    (out / "serving.md").write_text(markdown(points, machine, bandwidth))
    (out / "serving.json").write_text(json.dumps(report, indent=2))
    plot(points, out / "serving.png")
    log_to_mlflow(out, machine, args)
    return report


def measure(factories: list[Callable[[], System]], levels: list[int], repetitions: int) -> list[Point]:
    """Every system is up at once and each repetition runs them one after another, so the drift in
    this machine's speed (on a shared VM, +-15% within seconds) touches every system alike."""
    running: list[System] = []
    try:
        running = [factory() for factory in factories]
        points = []
        for level in levels:
            runs: dict[str, list[tuple[float, list[Timing]]]] = {system.name: [] for system in running}
            for system in running:
                system.run(level)  # warm-up at this level, not timed
            for _ in range(repetitions):
                for system in running:
                    time.sleep(SETTLE_S)
                    runs[system.name].append(system.run(level))
            for system in running:
                points.append(summarize(system.name, level, runs[system.name], system.rss_mb()))
                print(f"{system.name} x{level}: {points[-1].tokens_per_s:.1f} tokens/s", file=sys.stderr)
    finally:
        for system in running:
            system.close()
    order = [system.name for system in running]
    return sorted(points, key=lambda p: (order.index(p.system), p.concurrency))


def log_to_mlflow(out: Path, machine: dict, args: argparse.Namespace) -> None:
    import mlflow
    import onnxruntime_genai

    import slmflow

    with mlflow.start_run(run_name="bench-serving"):
        mlflow.log_params({**machine, "concurrency": args.concurrency, "systems": args.systems})
        mlflow.log_params(
            {
                "mlflow": mlflow.__version__,
                "onnxruntime_genai": onnxruntime_genai.__version__,
                "slmflow": slmflow.__version__,
            }
        )
        for name in ("serving.md", "serving.json", "serving.png"):
            mlflow.log_artifact(str(out / name))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
