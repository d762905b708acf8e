"""What the server serves: a small protocol over one loaded MLflow model, and its two implementations.

- `OnnxBackend`: an `onnx_genai` model. Its generation engine batches concurrent requests and
  streams tokens; the server only submits requests and relays their text.
- `PyfuncBackend`: any pyfunc of MLflow's `llm/v1/chat` task, i.e. the transformers route. MLflow's
  chat pyfunc neither batches nor streams, so requests run one at a time and each answer arrives as
  one piece.

Both are loaded by `mlflow.pyfunc.load_model`, so every model URI MLflow knows works here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from slmflow.errors import InvalidRequest, Overloaded, SlmflowError
from slmflow.generation.chat import validate_messages
from slmflow.generation.engine import EngineStats
from slmflow.generation.openai import Completion, FinishReason, Usage
from slmflow.generation.params import SamplingParams
from slmflow.generation.tools import Tools
from slmflow.server.settings import ServerSettings

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel
    from mlflow.pyfunc.scoring_server import InvocationsResponse

CHAT_TASK = "llm/v1/chat"


class Generation(Protocol):
    """One requested completion, polled: `listen` once, then `poll` whenever woken.

    `poll` returns the text generated since the previous poll without waiting, raises the
    generation's failure, and sets `completion` once it is done (it stays None when cancelled).
    """

    completion: Completion | None

    def listen(self, wake: Callable[[], None]) -> None: ...

    def poll(self) -> str: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    """A loaded model as the routes see it. Methods raise InvalidRequest or Overloaded at once."""

    def chat(self, messages: Any, params: SamplingParams, n: int, tools: Tools | None = None) -> list[Generation]: ...

    def complete(self, prompt: str, params: SamplingParams, n: int) -> list[Generation]: ...

    def invoke(self, body: bytes, content_type: str) -> InvocationsResponse:
        """MLflow's scoring protocol (`/invocations`), answered exactly as `mlflow models serve` would."""
        ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


class OnnxBackend:
    """An `onnx_genai` model: its engine batches, streams and cancels; this only submits."""

    def __init__(self, model: PyFuncModel) -> None:
        from slmflow.onnx_genai import FLAVOR_NAME

        self.model = model
        self.engine = model.get_raw_model()
        # The packaged generation defaults (`slmflow package --temperature ...`) apply here too.
        defaults = model.metadata.flavors[FLAVOR_NAME].get("generation_defaults") or {}
        self.defaults = SamplingParams.from_mapping(defaults)

    def chat(self, messages: Any, params: SamplingParams, n: int, tools: Tools | None = None) -> list[Generation]:
        if tools is not None and tools.constrained:
            if params.guidance is not None:
                raise InvalidRequest(
                    "response_format cannot be combined with a required tool call", param="tool_choice"
                )
            params = replace(params, guidance=tools.guidance())  # the answer must be a valid call
        return self._submit(self.engine.render_chat(messages, tools), "messages", params, n)

    def complete(self, prompt: str, params: SamplingParams, n: int) -> list[Generation]:
        return self._submit(prompt, "prompt", params, n)

    def invoke(self, body: bytes, content_type: str) -> InvocationsResponse:
        return _invoke(self.model, body, content_type)

    def stats(self) -> EngineStats:
        return self.engine.stats

    def close(self) -> None:
        self.engine.close()

    def _submit(self, prompt: str, prompt_param: str, params: SamplingParams, n: int) -> list[Generation]:
        """Submit the n choices together, so they can share a batch; all or none are queued."""
        from slmflow.onnx_genai.checks import check_request

        params = params.merged_over(self.defaults)
        check_request(self.engine, prompt, prompt_param, params, n)  # what the runtime cannot run is a 400
        prompt_ids = self.engine.encode(prompt)
        try:
            return list(self.engine.submit_all([(prompt_ids, params.for_choice(index)) for index in range(n)]))
        except SlmflowError as e:
            if isinstance(e, InvalidRequest) and e.param == "messages" and prompt_param != "messages":
                # The engine names the prompt "messages"; a text completion's prompt is "prompt".
                raise InvalidRequest(str(e), param=prompt_param, code=e.code) from e
            raise


class PyfuncBackend:
    """A pyfunc with MLflow's `llm/v1/chat` task (the transformers route), one request at a time.

    What MLflow's chat pyfunc cannot do is refused or approximated openly: `response_format` is
    refused; `stop` is applied to the finished text (so usage counts the tokens generated past it);
    `seed` is ignored; `temperature`, `top_p` and `top_k` sample only if the model's generation
    config samples (MLflow's chat input has no `do_sample`).
    """

    def __init__(self, model: PyFuncModel, *, max_queue: int) -> None:
        self.model = model
        self.max_queue = max_queue
        self._run_lock = threading.Lock()  # one generation at a time
        self._stats_lock = threading.Lock()
        self._stats = EngineStats()

    def chat(self, messages: Any, params: SamplingParams, n: int, tools: Tools | None = None) -> list[Generation]:
        if tools is not None and tools.active:
            raise InvalidRequest(
                "tools need an onnx_genai model; this one is served by MLflow's chat pyfunc", param="tools"
            )
        if params.guidance:
            raise InvalidRequest(
                "response_format needs an onnx_genai model; this one is served by MLflow's chat pyfunc",
                param="response_format",
            )
        request = {"messages": validate_messages(messages), **_pyfunc_params(params)}
        with self._stats_lock:
            if self._stats.queue_depth + n > self.max_queue:
                raise Overloaded(f"the generation queue is full ({self.max_queue} waiting requests)")
            self._stats.queue_depth += n
        return [_PyfuncGeneration(self, request, params.stop) for _ in range(n)]

    def complete(self, prompt: str, params: SamplingParams, n: int) -> list[Generation]:
        raise InvalidRequest(f"this model serves chat only ({CHAT_TASK}); use /v1/chat/completions", param="prompt")

    def invoke(self, body: bytes, content_type: str) -> InvocationsResponse:
        with self._run_lock:
            return _invoke(self.model, body, content_type)

    def stats(self) -> EngineStats:
        return self._stats

    def close(self) -> None:
        """Nothing to stop: the model runs on the callers' threads."""

    def run(self, request: dict[str, Any], stop: Sequence[str], cancelled: threading.Event) -> Completion | None:
        """Generate one answer (blocking); None if it was cancelled while waiting for its turn."""
        with self._run_lock:
            with self._stats_lock:
                self._stats.queue_depth -= 1
                if cancelled.is_set():
                    self._stats.finished["cancelled"] += 1
                    return None
                self._stats.batch_started(1)
            completion = None
            try:
                completion = _completion(self.model.predict(request), stop)
            finally:
                with self._stats_lock:
                    self._stats.batch_finished(completion.usage.completion_tokens if completion else 0)
                    self._stats.finished[completion.finish_reason if completion else "error"] += 1
        return completion


class _PyfuncGeneration:
    """One choice for a `PyfuncBackend`: it runs on its own thread once listened to, and its answer
    arrives whole."""

    def __init__(self, backend: PyfuncBackend, request: dict[str, Any], stop: Sequence[str]) -> None:
        self._backend = backend
        self._request = request
        self._stop = stop
        self._cancelled = threading.Event()
        self._outcome: Completion | BaseException | None = None
        self.completion: Completion | None = None

    def listen(self, wake: Callable[[], None]) -> None:
        threading.Thread(target=self._run, args=(wake,), name="slmflow-pyfunc", daemon=True).start()

    def poll(self) -> str:
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is None or self.completion is not None:
            return ""
        self.completion = outcome
        return outcome.text

    def cancel(self) -> None:
        self._cancelled.set()

    def _run(self, wake: Callable[[], None]) -> None:
        try:
            self._outcome = self._backend.run(self._request, self._stop, self._cancelled)
        except Exception as error:  # raised on the loop, in the request that owns it
            self._outcome = error
        if self._outcome is not None:  # None: cancelled, so nobody is waiting
            wake()


def load_backend(settings: ServerSettings) -> Backend:
    """Load `settings.model_uri` with MLflow and wrap it in the backend its flavor needs."""
    import mlflow
    from mlflow.models import Model

    from slmflow.onnx_genai import FLAVOR_NAME

    if not settings.model_uri:
        raise SlmflowError("no model to serve: pass MODEL_URI or set SLMFLOW_MODEL_URI")
    # Download once, read the flavors, then load: the flavor decides what config the loader gets.
    local = mlflow.artifacts.download_artifacts(artifact_uri=settings.model_uri)
    metadata = Model.load(local)
    if FLAVOR_NAME in metadata.flavors:
        return OnnxBackend(mlflow.pyfunc.load_model(local, model_config=engine_config(settings)))
    if (metadata.metadata or {}).get("task") == CHAT_TASK:
        return PyfuncBackend(mlflow.pyfunc.load_model(local), max_queue=settings.max_queue)
    raise SlmflowError(
        f"{settings.model_uri} is neither an {FLAVOR_NAME} model nor an MLflow {CHAT_TASK} model "
        f"(flavors: {', '.join(metadata.flavors)})"
    )


def engine_config(settings: ServerSettings) -> dict[str, int | str]:
    """The scheduler limits, as load-time model config for the `onnx_genai` flavor's loader."""
    options = {
        "max_batch_size": settings.max_batch_size,
        "max_queue": settings.max_queue,
        "intra_op_threads": settings.intra_op_threads,
        "prefix_cache_bytes": None if settings.prefix_cache_mb is None else settings.prefix_cache_mb * 2**20,
        "scheduler": settings.scheduler,
        "prefill_chunk": settings.prefill_chunk,
        "prefill_graph_decode_rows": settings.prefill_graph_decode_rows,
        "kv_cache_bytes": None if settings.kv_cache_mb is None else settings.kv_cache_mb * 2**20,
    }
    return {key: value for key, value in options.items() if value is not None}


def served_name(settings: ServerSettings) -> str:
    """`--model-name`, else the registered name in a models:/ URI, else the URI's last part."""
    if settings.model_name:
        return settings.model_name
    from slmflow.registry import registered_name

    uri = (settings.model_uri or "model").rstrip("/")
    return registered_name(uri) or uri.rsplit("/", 1)[-1]


def _invoke(model: PyFuncModel, body: bytes, content_type: str) -> InvocationsResponse:
    from mlflow.pyfunc import scoring_server

    return scoring_server.invocations(body, content_type, model, model.metadata.get_input_schema())


def _pyfunc_params(params: SamplingParams) -> dict[str, Any]:
    """OpenAI fields MLflow's chat pyfunc understands (temperature 0 is its default greedy search)."""
    fields = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature or None,
        "top_p": params.top_p,
        "top_k": params.top_k,
    }
    return {key: value for key, value in fields.items() if value is not None}


def _completion(output: Any, stop: Sequence[str]) -> Completion:
    """MLflow's chat output (one chat.completion dict per input row) -> our Completion."""
    response = output[0]
    choice = response["choices"][0]
    text = choice["message"].get("content") or ""
    reason: FinishReason = "length" if choice.get("finish_reason") == "length" else "stop"
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        text, reason = text[: min(hits)], "stop"
    usage = response.get("usage") or {}
    return Completion(text, reason, Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))))
