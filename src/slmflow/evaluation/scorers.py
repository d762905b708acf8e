"""Offline scorers: pure functions of one row's output and expectation. Nothing here calls a model
or a judge; `mlflow_scorers()` wraps them for `mlflow.genai.evaluate`."""

from __future__ import annotations

import re
from typing import Any


def exact_match(output: str, expected: str | None) -> bool | None:
    return None if expected is None else output.strip() == expected.strip()


def contains(output: str, expected: str | None) -> bool | None:
    return None if expected is None else expected.strip().lower() in output.lower()


def regex_match(output: str, pattern: str | None) -> bool | None:
    return None if pattern is None else re.search(pattern, output) is not None


def token_agreement(a: list[str], b: list[str]) -> float:
    """Share of positions, up to the longer sequence, where both sequences hold the same token."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b, strict=False)) / longest


def mlflow_scorers() -> list[Any]:
    """The scorers above, plus latency and speed, as MLflow GenAI scorers over our outputs dict."""
    from mlflow.genai.scorers import scorer

    @scorer(name="exact_match")
    def _exact(outputs: dict[str, Any], expectations: dict[str, Any]) -> bool | None:
        return exact_match(outputs["text"], expectations.get("expected_response"))

    @scorer(name="contains")
    def _contains(outputs: dict[str, Any], expectations: dict[str, Any]) -> bool | None:
        return contains(outputs["text"], expectations.get("expected_response"))

    @scorer(name="regex")
    def _regex(outputs: dict[str, Any], expectations: dict[str, Any]) -> bool | None:
        return regex_match(outputs["text"], expectations.get("pattern"))

    @scorer(name="response_chars")
    def _length(outputs: dict[str, Any]) -> int:
        return len(outputs["text"])

    @scorer(name="latency_s")
    def _latency(outputs: dict[str, Any]) -> float:
        return outputs["latency_s"]

    @scorer(name="tokens_per_s")
    def _speed(outputs: dict[str, Any]) -> float | None:
        tokens = outputs.get("completion_tokens")
        return tokens / outputs["latency_s"] if tokens and outputs["latency_s"] > 0 else None

    return [_exact, _contains, _regex, _length, _latency, _speed]
