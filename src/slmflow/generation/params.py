"""Per-request sampling parameters, validated once with OpenAI's rules and error wording."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from slmflow.errors import InvalidRequest

MAX_STOP_SEQUENCES = 4
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # ONNX Runtime GenAI's random_seed and top_k are C++ ints


@dataclass(frozen=True)
class SamplingParams:
    """What a caller may set per request. None means "the model's default"."""

    max_tokens: int | None = None
    temperature: float | None = None  # 0 means greedy
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0  # benchmarks force a fixed output length with min_tokens == max_tokens
    guidance: tuple[str, str] | None = None  # (ONNX Runtime GenAI guidance type, grammar), e.g. json_schema

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SamplingParams:
        """Build from request fields (unknown keys ignored, as OpenAI does); raise InvalidRequest."""
        max_tokens = values.get("max_completion_tokens", values.get("max_tokens"))
        return cls(
            max_tokens=_int(max_tokens, "max_tokens", minimum=1),
            temperature=_float(values.get("temperature"), "temperature", low=0.0, high=2.0, low_open=False),
            top_p=_float(values.get("top_p"), "top_p", low=0.0, high=1.0, low_open=True),
            top_k=_int(values.get("top_k"), "top_k", minimum=0),
            stop=_stop(values.get("stop")),
            seed=_int(values.get("seed"), "seed", minimum=None),
            min_tokens=_int(values.get("min_tokens"), "min_tokens", minimum=0) or 0,
            guidance=guidance_for(values.get("response_format")),
        )

    def merged_over(self, defaults: SamplingParams) -> SamplingParams:
        """These params, with the unset ones taken from `defaults`."""
        changes = {f.name: getattr(defaults, f.name) for f in fields(self) if _unset(getattr(self, f.name))}
        return replace(self, **changes)

    def for_choice(self, index: int) -> SamplingParams:
        """Params of choice `index` of `n`: a seeded request's choices differ, yet each is reproducible."""
        return self if self.seed is None or index == 0 else replace(self, seed=self.seed + index)

    @property
    def greedy(self) -> bool:
        return not self.temperature or self.top_k == 1


def guidance_for(response_format: Any) -> tuple[str, str] | None:
    """OpenAI `response_format` -> ONNX Runtime GenAI guidance, or None for plain text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_schema", json.dumps(_compact({"type": "object"})))
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidRequest(
                "response_format.json_schema.schema must be a JSON Schema object", param="response_format"
            )
        try:
            return ("json_schema", json.dumps(_compact(dict(schema))))
        except (TypeError, ValueError) as e:
            raise InvalidRequest(
                f"response_format.json_schema.schema is not valid JSON: {e}", param="response_format"
            ) from e
    raise InvalidRequest("response_format.type must be one of text, json_object, json_schema", param="response_format")


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    # Small models otherwise pad JSON with whitespace until max_tokens; callers can still opt in.
    guidance = {"whitespace_flexible": False, **schema.get("x-guidance", {})}
    return {**schema, "x-guidance": guidance}


def _unset(value: Any) -> bool:
    return value is None or value == ()


def _int(value: Any, name: str, *, minimum: int | None) -> int | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise InvalidRequest(f"{name} must be an integer; got {value!r}", param=name)
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"{name} must be at least {minimum}; got {value!r}", param=name)
    return int(value)


def _float(value: Any, name: str, *, low: float, high: float, low_open: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number; got {value!r}", param=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidRequest(f"{name} must be in {interval}; got {value!r}", param=name)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if hasattr(value, "tolist"):  # numpy arrays from MLflow's schema enforcement
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop takes at most {MAX_STOP_SEQUENCES} sequences; got {len(value)}", param="stop")
    if any(not s for s in value):
        raise InvalidRequest("stop sequences must not be empty", param="stop")
    return tuple(value)
