"""The server's one settings class: `SLMFLOW_*` environment variables and `slmflow serve` flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """How to serve one model. Every field reads `SLMFLOW_<FIELD>`; CLI flags override them."""

    # An empty variable (`SLMFLOW_API_KEY=`) means unset, not an empty key anyone could send.
    model_config = SettingsConfigDict(env_prefix="SLMFLOW_", extra="ignore", env_ignore_empty=True)

    model_uri: str | None = Field(None, description="models:/name@alias, models:/name/3, runs:/..., or a local path.")
    model_name: str | None = Field(None, description="Name in /v1/models and responses; default: from the URI.")
    host: str = Field("127.0.0.1", description="Interface to bind; loopback unless you mean to expose the server.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    api_key: SecretStr | None = Field(
        None, min_length=1, description="Require `Authorization: Bearer <key>` (all but /health)."
    )
    max_batch_size: int = Field(
        16, ge=1, description="Requests generated together (the continuous scheduler's KV slots)."
    )
    scheduler: Literal["auto", "continuous", "genai"] = Field(
        "auto",
        description="continuous: the decoder graph run directly, requests join between steps (CPU); "
        "genai: ONNX Runtime GenAI Generators (GPU builds); auto: continuous where the model allows.",
    )
    prefill_chunk: int = Field(
        512, ge=16, description="Prompt tokens read per step while other requests are decoding (continuous)."
    )
    prefill_graph_decode_rows: int = Field(
        6,
        ge=0,
        description="Decode steps of at least this many requests run on the model's prefill graph, faster there "
        "(continuous); answers under such load may then differ slightly from alone; 0: never.",
    )
    max_queue: int = Field(256, ge=1, description="Waiting requests; more are refused with 429.")
    intra_op_threads: int | None = Field(None, ge=1, description="ONNX Runtime threads; default: every usable core.")
    prefix_cache_mb: int | None = Field(
        None,
        ge=0,
        description="KV cache kept for prefix reuse (conversations that continue), in MB; 0: off; default: 1024.",
    )
    kv_cache_mb: int | None = Field(
        None,
        ge=1,
        description="KV cache of the running requests, in MB (continuous scheduler): requests wait, or the "
        "newest are parked and resume later, while it would not fit; default: a quarter of the memory.",
    )
    request_timeout: float = Field(600.0, gt=0, description="Seconds a completion may take, queueing included.")
    keep_alive: int = Field(
        75,
        ge=1,
        description="Seconds an idle HTTP connection stays open: longer than clients' own idle limit (httpx "
        "5 s) and load balancers' (often 60 s), so the server never closes one a client is reusing.",
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="Larger request bodies are refused with 413.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the server and its per-request lines."
    )
    playground: bool = Field(True, description="Serve the chat playground page at /.")
    traces: bool = Field(True, description="Record each request as an MLflow trace in the tracking store.")
    trace_sample_rate: float = Field(1.0, ge=0, le=1, description="Share of requests traced (0-1).")
    trace_content: bool = Field(
        True, description="Keep prompts and answers in traces; false keeps metadata only (privacy)."
    )
    trace_experiment: str | None = Field(
        None, description="MLflow experiment of the traces and the serving run; default: slmflow-serve-<model>."
    )
    metrics_interval: float = Field(
        10.0, ge=0, description="Seconds between serving metrics logged to the server's MLflow run (0: none)."
    )
