"""What was served, back into MLflow: a trace per request, and a run of serving metrics per server.

Nothing here runs on a request's path. A request ends by handing a `Served` record to the monitor
(`offer`: a put into a bounded queue, never waiting); the monitor's own thread turns records into
MLflow traces (`mlflow.start_span_no_context`, with the request's own start and end times, linked
to the served LoggedModel) and, every `metrics_interval` seconds, logs the interval's serving
metrics to the server's run. A slow or unreachable tracking server only fills that queue: records
that do not fit are dropped and counted (`slmflow_traces_dropped_total`), and the first failure is
logged once. MLflow exports the traces from its own queue in turn; its export failures, which it
only logs, are counted as dropped too.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from slmflow.server.settings import ServerSettings

log = logging.getLogger("slmflow.server")
QUEUE_SIZE = 4096  # records waiting for the monitor's thread; more are dropped (and counted)
# What the trace's root span is called, by route.
SPAN_NAMES = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/invocations": "invocations",
}
TRACED_ROUTES = frozenset(SPAN_NAMES)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model is served: what traces and the serving run are linked to."""

    uri: str
    name: str
    model_id: str | None = None  # the MLflow LoggedModel
    registered: tuple[str, str] | None = None  # (registered name, version)


@dataclass
class Served:
    """One finished request, as the server saw it."""

    route: str
    status: int
    started_ns: int  # wall clock, for the trace
    seconds: float
    request_id: str
    outcome: str | None = None  # "client disconnected", an error code, ...
    inputs: dict[str, Any] | None = None  # messages or prompt, and the sampling params
    choices: list[dict[str, Any]] = field(default_factory=list)  # text and finish_reason of each choice
    usage: dict[str, int] | None = None
    first_token_seconds: float | None = None

    @property
    def state(self) -> str:
        """ok, cancelled, timed_out, or error_<status>."""
        if self.status == 499 or self.outcome == "client disconnected":
            return "cancelled"
        if self.status == 504 or self.outcome == "request_timeout":  # a stream's status was sent as 200
            return "timed_out"
        return "ok" if self.status < 400 else f"error_{self.status}"


@dataclass
class MonitorStats:
    """Counters for /metrics."""

    traces_recorded: int = 0
    traces_dropped: int = 0


class Monitor:
    """The server's exporter of traces and serving metrics, on a thread of its own."""

    def __init__(self, settings: ServerSettings, model: ModelIdentity, engine_stats: Any) -> None:
        self.settings = settings
        self.model = model
        self.engine_stats = engine_stats  # a callable returning EngineStats
        self.stats = MonitorStats()
        self.experiment = settings.trace_experiment or f"slmflow-serve-{model.name}"
        self.run_id: str | None = None
        self._queue: queue.Queue[Served | None] = queue.Queue(maxsize=QUEUE_SIZE)  # None: close
        self._random = random.Random()
        self._warned = False
        self._interval: list[Served] = []
        self._experiment_id: str | None = None
        self._thread = threading.Thread(target=self._work, name="slmflow-monitor", daemon=True)
        self._export_failures = _ExportFailures(self)
        self._thread.start()
        self.thread_id = self._thread.ident

    # --- request side (the event loop): never waits -------------------------------------------

    def offer(self, served: Served) -> None:
        try:
            self._queue.put_nowait(served)
        except queue.Full:
            self.dropped("the monitor's queue is full (the tracking server is too slow or unreachable)")

    def close(self, timeout: float = 10.0) -> None:
        """Export what is queued (for at most `timeout` seconds), end the serving run, stop."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._export_failures.detach()

    def dropped(self, why: str, count: int = 1) -> None:
        self.stats.traces_dropped += count
        if not self._warned:  # once: a tracking server that is down would otherwise flood the log
            self._warned = True
            log.warning("request traces are being dropped: %s (counted in slmflow_traces_dropped_total)", why)

    # --- the monitor's thread -------------------------------------------------------------------

    def _work(self) -> None:
        next_flush = time.monotonic() + self._interval_seconds()
        while True:
            try:
                served = self._queue.get(timeout=max(0.0, next_flush - time.monotonic()))
            except queue.Empty:
                pass  # the interval is over: time to log its metrics
            else:
                if served is None:  # closing
                    self._flush_metrics(final=True)
                    self._flush_traces()
                    return
                if served.route in TRACED_ROUTES:
                    self._interval.append(served)
                if self._sampled(served):
                    self._trace(served)
            if time.monotonic() >= next_flush:
                self._flush_metrics(final=False)
                next_flush = time.monotonic() + self._interval_seconds()

    def _flush_traces(self) -> None:
        """Wait for MLflow's own export queue: what it still holds would be lost at exit."""
        import mlflow

        try:
            mlflow.flush_trace_async_logging()
        except Exception as e:
            self.dropped(f"the last traces could not be exported: {_first_line(e)}", count=0)

    def _interval_seconds(self) -> float:
        return self.settings.metrics_interval if self.settings.metrics_interval > 0 else 3600.0

    def _sampled(self, served: Served) -> bool:
        rate = self.settings.trace_sample_rate
        return self.settings.traces and served.route in TRACED_ROUTES and (rate >= 1 or self._random.random() < rate)

    def _ensure_experiment(self) -> str | None:
        """The experiment's id, created if missing (without making it the process's active one)."""
        if self._experiment_id is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            try:
                found = client.get_experiment_by_name(self.experiment)
                self._experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
            except Exception as e:  # an unreachable or refusing tracking server: dropped, counted
                self.dropped(f"cannot reach experiment {self.experiment!r}: {_first_line(e)}")
        return self._experiment_id

    def _trace(self, served: Served) -> None:
        import mlflow
        from mlflow.entities import SpanStatusCode, SpanType

        experiment_id = self._ensure_experiment()
        if experiment_id is None:
            return
        content = self.settings.trace_content
        metadata = {"slmflow.request_id": served.request_id}
        if self.model.model_id:
            metadata["mlflow.modelId"] = self.model.model_id
        tags = {"slmflow.model_uri": self.model.uri, "slmflow.route": served.route, "slmflow.status": served.state}
        if self.model.registered:
            tags |= {
                "slmflow.registered_model": self.model.registered[0],
                "slmflow.model_version": self.model.registered[1],
            }
        inputs = served.inputs if content else _without_content(served.inputs)
        outputs = {
            "choices": served.choices
            if content
            else [{"finish_reason": c.get("finish_reason")} for c in served.choices],
            "usage": served.usage,
        }
        attributes: dict[str, Any] = {
            "http.status_code": served.status,
            "slmflow.status": served.state,
            "slmflow.duration_s": served.seconds,
            "slmflow.time_to_first_token_s": served.first_token_seconds,
            "slmflow.content_recorded": content,
        }
        if served.outcome:
            attributes["slmflow.outcome"] = served.outcome
        try:
            span = mlflow.start_span_no_context(
                SPAN_NAMES[served.route],
                span_type=SpanType.CHAT_MODEL if served.route.endswith("chat/completions") else SpanType.LLM,
                inputs=inputs,
                # MLflow's hint says str values; it stores any JSON value, and numbers stay numbers.
                attributes={k: v for k, v in attributes.items() if v is not None},
                tags=tags,
                metadata=metadata,
                experiment_id=experiment_id,
                start_time_ns=served.started_ns,
            )
            status = SpanStatusCode.OK if served.state == "ok" else SpanStatusCode.ERROR
            span.end(outputs=outputs, status=status, end_time_ns=served.started_ns + int(served.seconds * 1e9))
            self.stats.traces_recorded += 1
        except Exception as e:
            self.dropped(f"tracing failed: {_first_line(e)}")

    def _flush_metrics(self, *, final: bool) -> None:
        """Log the interval's serving metrics to the server's run (started on the first flush)."""
        if self.settings.metrics_interval <= 0:
            return
        served, self._interval = self._interval, []
        try:
            self._log_metrics(served, final=final)
        except Exception as e:
            self.dropped(f"serving metrics could not be logged: {_first_line(e)}", count=0)

    def _log_metrics(self, served: list[Served], *, final: bool) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        experiment_id = self._ensure_experiment()
        if experiment_id is None:
            return
        client = MlflowClient()
        if self.run_id is None:
            tags = {"slmflow.model_uri": self.model.uri, "mlflow.runName": f"serve-{self.model.name}"}
            if self.model.registered:
                tags |= {
                    "slmflow.registered_model": self.model.registered[0],
                    "slmflow.model_version": self.model.registered[1],
                }
            run = client.create_run(experiment_id, tags=tags)
            self.run_id = run.info.run_id
            client.log_param(self.run_id, "model_uri", self.model.uri)
            if self.model.model_id:
                client.log_param(self.run_id, "model_id", self.model.model_id)
        now = int(time.time() * 1000)
        values = interval_metrics(served, self.engine_stats(), self._interval_seconds()) | {
            "traces_recorded": self.stats.traces_recorded,
            "traces_dropped": self.stats.traces_dropped,
        }
        client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
        if final:
            client.set_terminated(self.run_id, "FINISHED")


def interval_metrics(served: list[Served], engine: Any, seconds: float) -> dict[str, float]:
    """One interval's serving metrics: load, errors by status, throughput, queue, batch, latency."""
    statuses = Counter(s.status for s in served if s.status >= 400)
    ttfts = sorted(s.first_token_seconds for s in served if s.first_token_seconds is not None)
    generated = sum((s.usage or {}).get("completion_tokens", 0) for s in served)
    metrics: dict[str, float] = {
        "requests": len(served),
        "errors": sum(statuses.values()),
        "generated_tokens_per_s": generated / seconds,
        "queue_depth": engine.queue_depth,
        "batch_size": engine.running,
        **{f"errors_{status}": count for status, count in statuses.items()},
    }
    if ttfts:
        metrics["ttft_p50_s"] = ttfts[(len(ttfts) - 1) // 2]
        metrics["ttft_p95_s"] = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return metrics


def _without_content(inputs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metadata only: the sampling params, how many messages, not what they say."""
    if inputs is None:
        return None
    kept = {k: v for k, v in inputs.items() if k not in ("messages", "prompt")}
    if "messages" in inputs:
        kept["message_count"] = len(inputs["messages"])
    return kept


class _ExportFailures(logging.Handler):
    """MLflow's trace exporter logs its failures rather than raising them: count them as drops.

    `slmflow serve` has MLflow export synchronously, on the monitor's thread (the monitor is the
    asynchronous part already, and one writer is what a SQLite store wants), so a failure is this
    monitor's. Where MLflow exports on its own threads (an app made by `create_app` in a process
    that kept MLflow's asynchronous export), their failures are counted too: several servers in one
    such process cannot tell whose trace was lost.
    """

    LOGGER = "mlflow.tracing.export.mlflow_v3"

    def __init__(self, monitor: Monitor) -> None:
        super().__init__(logging.WARNING)
        self.monitor = monitor
        logging.getLogger(self.LOGGER).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.thread == self.monitor.thread_id or (record.threadName or "").startswith(
            ("MLflowTraceLogging", "MlflowTraceLogging")
        )
        if ours and "Failed to send trace" in record.getMessage():
            self.monitor.dropped("MLflow could not export a trace")
            self.monitor.stats.traces_recorded -= 1  # it was counted when MLflow took it

    def detach(self) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


def model_identity(settings: ServerSettings, name: str) -> ModelIdentity:
    """The served model's LoggedModel id and registered version, when MLflow knows them."""
    from mlflow.models import Model

    from slmflow.registry import registered_version

    uri = settings.model_uri or ""
    try:
        model_id = Model.load(uri).model_id if uri else None
    except Exception:  # a model folder saved outside any run has no LoggedModel
        model_id = None
    try:
        registered = registered_version(uri) if uri else None
    except Exception:
        registered = None
    return ModelIdentity(uri=uri, name=name, model_id=model_id, registered=registered)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
