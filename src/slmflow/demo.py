"""`slmflow demo`: the reference tutorial, end to end and offline, on the tiny fixture; then a real
model, SmolLM2-135M-Instruct, packaged at the default precision with its quality cost measured."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from slmflow.convert import DEFAULT_PRECISION
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
SMOL_NAME = "smollm2-135m-instruct"
# Everyday questions the default (int8) build answers as its float source does. (Not "What is the
# capital of France?": in the source its first token wins by 0.08 logits, and int8 flips it.)
SMOL_QUESTIONS = ("Who wrote Romeo and Juliet?", "What is 2+2?", "What is the chemical symbol for gold?")
SMOL_MAX_TOKENS = 64


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
    report["real_model"] = _real_model(progress, say)
    report["seconds"] = round(time.perf_counter() - started, 1)
    for entry in report["models"]:
        say("")
        say(f"{entry['model_uri']}  (load {entry['load_seconds']:.1f}s, answer {entry['predict_seconds']:.2f}s)")
        say(f"  in:  {entry['input']}")
        say(f"  out: {entry['answer']!r}")
        if entry.get("usage"):
            say(f"  usage: {entry['usage']}")
    real = report["real_model"]
    say("")
    say(f"{real['model_uri']}  (SmolLM2-135M-Instruct from its GGUF, {real['precision']})")
    say(f"  quality vs its float source: {real['quality']}")
    for question, answer in real["answers"]:
        say(f"  Q: {question}")
        say(f"  A: {answer}")
    say("")
    say(f"done in {report['seconds']:.0f}s. Browse these runs and models with:")
    if report["tracking_uri"].startswith(("http://", "https://")):
        say(f"  a browser, at {report['tracking_uri']} (the team's tracking server)")
    else:
        say(f"  .venv/bin/mlflow ui --backend-store-uri {report['tracking_uri']}")
    return report


def _real_model(progress: Progress, say: Callable[[str], None]) -> dict[str, Any]:
    """Package SmolLM2-135M-Instruct at the default precision, register it, and ask it questions."""
    import mlflow

    from slmflow.checkpoints.smol import build_smol

    checkpoint = build_smol(progress=progress)
    say(f"real model checkpoint: {checkpoint}")
    result = package(PackageSpec(source=str(checkpoint), name=SMOL_NAME, alias=ALIAS), progress)
    say(f"packaged {SMOL_NAME} in run {result.run_id}: version {result.version} @{ALIAS}")
    model_uri = f"models:/{SMOL_NAME}@{ALIAS}"
    progress(f"loading {model_uri}", 0, 0)
    model = mlflow.pyfunc.load_model(model_uri)
    rows = [{"messages": [{"role": "user", "content": q}]} for q in SMOL_QUESTIONS]
    responses = model.predict(rows, params={"temperature": 0.0, "max_tokens": SMOL_MAX_TOKENS})
    answers = [r["choices"][0]["message"]["content"] for r in responses]
    return {
        "model_uri": model_uri,
        "precision": DEFAULT_PRECISION,
        "quality": result.quality.summary() if result.quality else result.quality_note,
        "quality_metrics": result.quality.metrics() if result.quality else {},
        "answers": list(zip(SMOL_QUESTIONS, answers, strict=True)),
    }


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
