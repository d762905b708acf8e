"""Prometheus metrics of one app, in its own registry (two apps in one process never share counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slmflow.generation.engine import FINISH_REASONS, EngineStats
from slmflow.generation.openai import Usage
from slmflow.server.monitoring import MonitorStats

# CPU small models answer their first token in milliseconds to seconds; queueing adds the tail.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], monitor: MonitorStats | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "slmflow_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "slmflow_prompt_tokens", "Prompt tokens of answered requests", registry=self.registry
        )
        self.completion_tokens = Counter(
            "slmflow_completion_tokens", "Completion tokens returned to clients", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "slmflow_time_to_first_token_seconds",
            "From request arrival to its first generated text",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(stats))
        if monitor is not None:
            self.registry.register(_MonitorCollector(monitor))

    def answered(self, usage: Usage, first_token_seconds: float | None) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
        if first_token_seconds is not None:
            self.time_to_first_token.observe(first_token_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The engine's counters and gauges, in /metrics order: (family, name, help, EngineStats attribute).
_ENGINE_METRICS: list[tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, str]] = [
    (GaugeMetricFamily, "slmflow_queue_depth", "Requests waiting for a batch slot", "queue_depth"),
    (GaugeMetricFamily, "slmflow_batch_size", "Requests in the running batch", "running"),
    (CounterMetricFamily, "slmflow_batches", "Batches run (mean batch size: batched_requests / batches)", "batches"),
    (CounterMetricFamily, "slmflow_batched_requests", "Requests run in batches", "batched_requests"),
    (CounterMetricFamily, "slmflow_joined_requests", "Requests that joined a batch already running", "joined_requests"),
    (
        CounterMetricFamily,
        "slmflow_generated_tokens",
        "Tokens generated, cancelled requests included",
        "generated_tokens",
    ),
    (CounterMetricFamily, "slmflow_prompt_tokens", "Prompt tokens read (continuous scheduler)", "prompt_tokens"),
    (
        CounterMetricFamily,
        "slmflow_prompt_positions",
        "Positions computed to read them: prompts read together are padded to the longest",
        "prompt_positions",
    ),
    (
        CounterMetricFamily,
        "slmflow_prefill_graph_decode_steps",
        "Decode steps run on the prefill graph (--prefill-graph-decode-rows requests or more)",
        "prefill_graph_decode_steps",
    ),
    (
        CounterMetricFamily,
        "slmflow_prefix_cache_hits",
        "Requests that found their prompt's start already read (its KV kept)",
        "prefix_hits",
    ),
    (
        CounterMetricFamily,
        "slmflow_prefix_cache_misses",
        "Requests with a prompt long enough to share, that found no kept prefix",
        "prefix_misses",
    ),
    (
        CounterMetricFamily,
        "slmflow_prefix_cached_tokens",
        "Prompt tokens not read again thanks to prefix reuse",
        "prefix_cached_tokens",
    ),
    (GaugeMetricFamily, "slmflow_prefix_cache_bytes", "KV cache bytes kept for prefix reuse", "prefix_cache_bytes"),
    (
        GaugeMetricFamily,
        "slmflow_kv_slots_bytes",
        "KV buffer of the running requests (continuous scheduler): slots in use x the longest row",
        "kv_slots_bytes",
    ),
    (GaugeMetricFamily, "slmflow_kv_slots_peak_bytes", "The largest the KV buffer has been", "kv_slots_peak_bytes"),
    (
        GaugeMetricFamily,
        "slmflow_kv_budget_bytes",
        "What the KV buffer may take (continuous scheduler)",
        "kv_budget_bytes",
    ),
    (
        CounterMetricFamily,
        "slmflow_parked_requests",
        "Running requests parked to keep the KV buffer within its budget (they resume later)",
        "parked",
    ),
]


class _EngineCollector(Collector):
    """The scheduler's own counters, read at scrape time (the engine owns them, not the server)."""

    def __init__(self, stats: Callable[[], EngineStats], monitor: MonitorStats | None = None) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for family, name, documentation, attribute in _ENGINE_METRICS:
            yield family(name, documentation, value=getattr(stats, attribute))
        finished = CounterMetricFamily(
            "slmflow_finished_requests",
            "Generations by how they ended: stop, length, cancelled (client gone or timed out), error",
            labels=["reason"],
        )
        for reason in FINISH_REASONS:
            finished.add_metric([reason], stats.finished[reason])
        yield finished


class _MonitorCollector(Collector):
    """The monitor's counters: traces handed to MLflow, and traces dropped on the way."""

    def __init__(self, stats: MonitorStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "slmflow_traces_recorded", "Requests recorded as MLflow traces", value=self._stats.traces_recorded
        )
        yield CounterMetricFamily(
            "slmflow_traces_dropped",
            "Request traces dropped: the tracking server too slow or unreachable",
            value=self._stats.traces_dropped,
        )
