"""The pyfunc face of an `onnx_genai` model: MLflow inputs in, generation requests out, OpenAI-shaped
results back. Thin on purpose; scheduling and batching live in `slmflow.generation`."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from slmflow.errors import InvalidRequest, SlmflowError
from slmflow.generation.engine import GenerationEngine, TokenStream
from slmflow.generation.openai import Completion, chat_chunk, chat_completion, new_id
from slmflow.generation.params import SamplingParams
from slmflow.generation.tools import Tools, answered_with_calls
from slmflow.onnx_genai.checks import check_request

_MAX_N = 16


@dataclass(frozen=True)
class _RowRequest:
    """One input row, ready for the engine."""

    prompt: str
    sampling: SamplingParams
    n: int
    tools: Tools | None = None


class OnnxGenAIPyfunc:
    """Answers every row of a batch; rows are submitted together so the engine batches them."""

    def __init__(self, engine: GenerationEngine, task: str = "chat", defaults: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.task = task
        defaults = dict(defaults or {})
        self.model_name = str(defaults.pop("model_name", "onnx-genai"))
        self.defaults = defaults

    def get_raw_model(self) -> GenerationEngine:
        """The engine; it is closed when this model is garbage-collected, so keep the model too."""
        return self.engine

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        with _as_mlflow_errors(), _span("predict", model_input, params) as span:
            requests = [self._request(row, params) for row in _rows(model_input)]
            results: list[list[Completion]] = []
            # A call may hold more rows than the engine's queue takes (spark_udf hands over up to
            # 10,000): submit them in waves that fit, or the rest would be refused as Overloaded.
            for wave in _waves(requests, self.engine.options.max_queue):
                results += self._run(wave)
            results = [
                [answered_with_calls(c, request.tools) for c in group]
                for request, group in zip(requests, results, strict=True)
            ]
            if self.task == "chat":
                answers: list[Any] = [chat_completion(group, model=self.model_name) for group in results]
            else:
                answers = [group[0].text for group in results]
            span.set_outputs(answers)
        return answers

    def _run(self, requests: list[_RowRequest]) -> list[list[Completion]]:
        """Submit every request at once, so the engine batches them together."""
        streams = iter(
            self.engine.submit_all([(r.prompt, r.sampling.for_choice(i)) for r in requests for i in range(r.n)])
        )
        return [[next(streams).result() for _ in range(r.n)] for r in requests]

    def predict_stream(self, model_input: Any, params: dict[str, Any] | None = None) -> Iterator[Any]:
        """Chat: `chat.completion.chunk` dicts; prompt: text pieces. One input row."""
        with _as_mlflow_errors():
            rows = _rows(model_input)
            if len(rows) != 1:
                raise InvalidRequest(f"predict_stream takes one input row; got {len(rows)}")
            request = self._request(rows[0], params)
            if request.n != 1:
                raise InvalidRequest("predict_stream supports n=1 only", param="n")
            if request.tools is not None and request.tools.active:
                raise InvalidRequest("tools are answered by predict, not predict_stream", param="tools")
            stream = self.engine.submit(request.prompt, request.sampling)
        with _span("predict_stream", model_input, params) as span:
            try:
                yield from (self._chat_chunks(stream) if self.task == "chat" else stream)
            finally:
                stream.cancel()  # a consumer that stops early frees its batch slot
                if stream.completion is not None:
                    span.set_outputs({"text": stream.completion.text, "finish_reason": stream.completion.finish_reason})

    def _chat_chunks(self, stream: TokenStream) -> Iterator[dict[str, Any]]:
        chunk = functools.partial(chat_chunk, id=new_id(), model=self.model_name, created=int(time.time()))
        yield chunk(role="assistant", content="")
        for piece in stream:
            yield chunk(content=piece)
        completion = stream.completion
        assert completion is not None
        yield chunk(finish_reason=completion.finish_reason, usage=completion.usage)

    def _request(self, row: dict[str, Any], params: dict[str, Any] | None) -> _RowRequest:
        """One row as the engine takes it; row fields override call params and defaults."""
        # MLflow fills absent params with the signature's defaults (None, []): those must not mask ours.
        call = {k: v for k, v in _plain(params or {}).items() if v not in (None, [])}
        fields = {**self.defaults, **call, **{k: v for k, v in row.items() if k not in ("messages", "prompt")}}
        sampling = SamplingParams.from_mapping(fields)
        n = fields.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= _MAX_N:
            raise InvalidRequest(f"n must be an integer from 1 to {_MAX_N}; got {n!r}", param="n")
        tools = None
        if self.task == "chat":
            if "messages" not in row:
                raise InvalidRequest("each input row needs 'messages'", param="messages")
            tools = Tools.parse(
                fields.get("tools"), _tool_choice(fields.get("tool_choice")), fields.get("parallel_tool_calls")
            )
            if tools is not None and tools.constrained:
                if sampling.guidance is not None:
                    raise InvalidRequest(
                        "response_format cannot be combined with a required tool call", param="tool_choice"
                    )
                sampling = replace(sampling, guidance=tools.guidance())
            prompt, prompt_param = self.engine.render_chat(row["messages"], tools), "messages"
        else:
            text, prompt_param = row.get("prompt"), "prompt"
            if not isinstance(text, str) or not text:
                raise InvalidRequest("each input row needs a non-empty string 'prompt'", param="prompt")
            prompt = text
        check_request(self.engine, prompt, prompt_param, sampling, n)  # what the runtime cannot run is a 400
        return _RowRequest(prompt, sampling, n, tools)


def _waves(requests: list[_RowRequest], size: int) -> Iterator[list[_RowRequest]]:
    """Consecutive runs of requests whose completions (n each) number at most `size`."""
    wave: list[_RowRequest] = []
    for request in requests:
        if wave and sum(r.n for r in wave) + request.n > size:
            yield wave
            wave = []
        wave.append(request)
    if wave:
        yield wave


def _tool_choice(value: Any) -> Any:
    """A params `tool_choice` is a string (MLflow params are scalars): auto, required, none, or the
    name of the one function to call."""
    if isinstance(value, str) and value not in ("auto", "required", "none"):
        return {"type": "function", "function": {"name": value}}
    return value


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """MLflow hands over a DataFrame, a dict, a list of dicts or strings: make them plain row dicts."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        records = _dict_rows(model_input)
    elif isinstance(model_input, str):
        records = [{"prompt": model_input}]
    elif isinstance(model_input, list):
        records = [{"prompt": r} if isinstance(r, str) else r for r in model_input]
    else:
        raise InvalidRequest(f"unsupported input type {type(model_input).__name__}")
    if not records or not all(isinstance(r, dict) for r in records):
        raise InvalidRequest("the input must hold at least one row of fields")
    return [{k: _plain(v) for k, v in r.items() if not _missing(v)} for r in records]


def _dict_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """{"prompt": "x"} is one row; {"prompt": ["x", "y"]} (column form) is two."""
    if isinstance(data.get("prompt"), list):
        prompts = data["prompt"]
        return [{**data, "prompt": p} for p in prompts]
    return [data]


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars from schema enforcement
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not _missing(v)}
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@contextmanager
def _span(name: str, model_input: Any, params: dict[str, Any] | None) -> Iterator[Any]:
    """A span for this call when the caller is tracing (inside an active MLflow span), as MLflow's
    own flavors record theirs; otherwise a stand-in that records nothing and costs nothing.

    A child span started without entering the tracing context: `predict_stream` yields from inside
    it, and a generator resumed from another context must not detach that context."""
    import mlflow

    parent = mlflow.get_current_active_span()
    if parent is None:
        yield _NoSpan()
        return
    from mlflow.entities import SpanStatusCode, SpanType

    span = mlflow.start_span_no_context(
        f"onnx_genai.{name}",
        span_type=SpanType.CHAT_MODEL,
        parent_span=parent,
        inputs={"model_input": _plain_input(model_input), "params": params},
    )
    try:
        yield span
    except BaseException:
        span.end(status=SpanStatusCode.ERROR)
        raise
    span.end()


class _NoSpan:
    def set_outputs(self, outputs: Any) -> None:
        """Nothing is traced."""


def _plain_input(model_input: Any) -> Any:
    """The input as JSON-friendly rows (a DataFrame becomes its records)."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        return _plain(model_input.to_dict(orient="records"))
    return _plain(model_input)


@contextmanager
def _as_mlflow_errors() -> Iterator[None]:
    """Our user errors surface as MLflow's invalid-parameter errors (HTTP 400 in its server)."""
    try:
        yield
    except SlmflowError as error:
        from mlflow.exceptions import MlflowException

        raise MlflowException.invalid_parameter_value(str(error)) from error
