"""`slmflow demo`: the reference tutorial, end to end and offline, on the tiny fixture."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from slmflow.onnx_genai.schema import CHAT_EXAMPLE, PROMPT_EXAMPLE
from slmflow.packaging import PackageSpec, package
from slmflow.progress import Progress

ALIAS = "champion"
# (registered name, route, task, the tutorial input it answers)
MODELS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("phi3-tiny-transformers-chat", "transformers", "chat", CHAT_EXAMPLE),
    ("phi3-tiny-onnx-int4-chat", "onnx", "chat", CHAT_EXAMPLE),
    ("phi3-tiny-onnx-int4-prompt", "onnx", "prompt", PROMPT_EXAMPLE),
)


def run_demo(progress: Progress, echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build, package (both routes), register, alias, load by alias, answer; return what happened."""
    import mlflow

    from slmflow.checkpoints.fixture import build_fixture

    say = echo or (lambda _: None)
    started = time.perf_counter()
    checkpoint = build_fixture("tiny", progress=progress)
    say(f"fixture checkpoint: {checkpoint}")
    mlflow.set_experiment("slmflow-demo")
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "tracking_uri": mlflow.get_tracking_uri(), "models": []}
    for name, route, task, example in MODELS:
        spec = PackageSpec(source=str(checkpoint), route=route, task=task, precision="int4", name=name, alias=ALIAS)
        result = package(spec, progress)
        say(f"packaged {route}/{task} in run {result.run_id}: {name} version {result.version} @{ALIAS}")
        report["models"].append(_ask(f"models:/{name}@{ALIAS}", example, result.metrics, progress))
    report["seconds"] = round(time.perf_counter() - started, 1)
    for entry in report["models"]:
        say("")
        say(f"{entry['model_uri']}  (load {entry['load_seconds']:.1f}s, answer {entry['predict_seconds']:.2f}s)")
        say(f"  in:  {entry['input']}")
        say(f"  out: {entry['answer']!r}")
        if entry.get("usage"):
            say(f"  usage: {entry['usage']}")
    say("")
    say(f"done in {report['seconds']:.0f}s. Browse these runs and models with:")
    say(f"  .venv/bin/mlflow ui --backend-store-uri {report['tracking_uri']}")
    return report


def _ask(model_uri: str, example: dict[str, Any], metrics: dict[str, float], progress: Progress) -> dict[str, Any]:
    import mlflow

    progress(f"loading {model_uri}", 0, 0)
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    loaded = time.perf_counter()
    response = model.predict(example)
    answered = time.perf_counter()
    first = response[0]
    if isinstance(first, dict):  # chat: OpenAI chat completion
        answer, usage = first["choices"][0]["message"]["content"], first.get("usage")
    else:
        answer, usage = first, None
    return {
        "model_uri": model_uri,
        "input": example,
        "answer": answer,
        "usage": usage,
        "load_seconds": loaded - started,
        "predict_seconds": answered - loaded,
        "package_metrics": metrics,
    }
