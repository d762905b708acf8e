"""Under load: disconnects cancel generations, a full queue answers 429, slow requests time out.

These run on servers with one batch slot and one queue place, so capacity is easy to fill and it is
visible when it is freed. A "long" request is forced to LONG tokens; the engine's counters of how
requests ended (`slmflow_finished_requests_total`) show whether one was cancelled or ran to its end.
Where a test must act while a long request runs (a client timeout, a server timeout), the time it
allows is a fraction of how long a long request took on this machine, measured here first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from slmflow.server import ServerSettings
from tests.conftest import engine_held
from tests.server.conftest import LONG, MADRID, SPAIN, LiveServer, serve, wait_until

CHAT = "/v1/chat/completions"


def long_request(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": SPAIN, "max_tokens": LONG, "min_tokens": LONG, **fields}


@contextmanager
def streaming(server: LiveServer, body: dict[str, Any]) -> Iterator[tuple[httpx.Response, Iterator[str]]]:
    """An open SSE response; leaving the block closes the connection (a client that goes away)."""
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{server.url}{CHAT}", json={**body, "stream": True}) as response,
    ):
        yield response, (line for line in response.iter_lines() if line)


def first_content(events: Iterator[str]) -> str:
    """Read events until one carries generated text: the request is then running, not queued."""
    return next(line for line in events if '"content":"' in line and '"content":""' not in line)


def ended(server: LiveServer, reason: str) -> float:
    return server.metric("slmflow_finished_requests_total", reason=reason)


@pytest.fixture(scope="module")
def long_seconds(narrow_server: LiveServer) -> float:
    """How long one long request takes on this machine, now (the tiny model: about 0.6 s here)."""
    started = time.monotonic()
    response = httpx.post(f"{narrow_server.url}{CHAT}", json=long_request(), timeout=120)
    assert response.json()["usage"]["completion_tokens"] == LONG
    return time.monotonic() - started


@pytest.fixture(scope="module")
def impatient_server(onnx_model_path: Path, long_seconds: float) -> Iterator[LiveServer]:
    # Requests time out a quarter of the way through a long generation, whatever this machine's speed.
    timeout = long_seconds / 4
    yield from serve(ServerSettings(model_uri=str(onnx_model_path), max_batch_size=1, request_timeout=timeout))


def test_engine_limits_reach_the_model(narrow_server: LiveServer) -> None:
    options = narrow_server.state.backend.engine.options
    assert (options.max_batch_size, options.max_queue) == (1, 1)


def test_client_leaving_a_stream_cancels_its_generation_and_frees_the_slot(narrow_server: LiveServer) -> None:
    threads = threading.active_count()
    cancelled, ran_out = ended(narrow_server, "cancelled"), ended(narrow_server, "length")
    with streaming(narrow_server, long_request()) as (response, events):
        assert response.status_code == 200
        first_content(events)
    # One slot: this request could not start before the cancelled one left the batch.
    answer = narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    assert answer.choices[0].message.content == MADRID
    assert ended(narrow_server, "cancelled") - cancelled == 1
    assert ended(narrow_server, "length") == ran_out, "the abandoned request ran to its end"
    assert narrow_server.metric("slmflow_queue_depth") == 0
    assert wait_until(lambda: threading.active_count() <= threads, timeout=30), "a thread outlived its request"


def test_client_leaving_a_non_streaming_request_cancels_it(narrow_server: LiveServer, long_seconds: float) -> None:
    cancelled, ran_out = ended(narrow_server, "cancelled"), ended(narrow_server, "length")
    # The client leaves a quarter of the way through the generation.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{narrow_server.url}{CHAT}", json=long_request(), timeout=httpx.Timeout(30, read=long_seconds / 4))
    assert wait_until(lambda: narrow_server.metric("slmflow_requests_total", route=CHAT, status="499") >= 1, timeout=30)
    narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    assert ended(narrow_server, "cancelled") - cancelled == 1
    assert ended(narrow_server, "length") == ran_out, "the abandoned request ran to its end"


def test_full_queue_is_a_429_with_retry_after_and_the_server_recovers(narrow_server: LiveServer) -> None:
    cancelled = ended(narrow_server, "cancelled")
    with ExitStack() as stack:
        # The engine is kept busy, so what is queued stays queued however fast the machine is.
        stack.enter_context(engine_held(narrow_server.state.backend.engine))
        waiting, _ = stack.enter_context(streaming(narrow_server, long_request()))
        assert waiting.status_code == 200  # its headers mean it was queued: the one queue place is taken
        assert narrow_server.metric("slmflow_queue_depth") == 1
        refused = httpx.post(f"{narrow_server.url}{CHAT}", json={"model": "tiny", "messages": SPAIN}, timeout=30)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    # The stream is closed (its request cancelled in the queue) and the engine free: the place is free again.
    answer = narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    assert answer.choices[0].message.content == MADRID
    assert ended(narrow_server, "cancelled") - cancelled == 1


def test_n_choices_are_queued_all_or_none(narrow_server: LiveServer) -> None:
    ends, generated = ended(narrow_server, "cancelled"), narrow_server.metric("slmflow_generated_tokens_total")
    # Three choices do not fit the one queue place: none is queued, and the request is refused.
    response = httpx.post(f"{narrow_server.url}{CHAT}", json=long_request(n=3), timeout=30)
    assert response.status_code == 429
    assert narrow_server.metric("slmflow_queue_depth") == 0
    answer = narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    assert ended(narrow_server, "cancelled") == ends  # nothing was queued, so nothing had to be withdrawn
    # Nothing of the refused request was generated: only the answer after it.
    assert narrow_server.metric("slmflow_generated_tokens_total") - generated == answer.usage.completion_tokens


def test_a_request_over_its_time_is_a_504_and_stops_generating(impatient_server: LiveServer) -> None:
    cancelled, ran_out = ended(impatient_server, "cancelled"), ended(impatient_server, "length")
    response = httpx.post(f"{impatient_server.url}{CHAT}", json=long_request(), timeout=30)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    with streaming(impatient_server, long_request()) as (response, events):
        lines = list(events)
    assert '"code":"request_timeout"' in lines[-1] and "data: [DONE]" not in lines
    assert impatient_server.client().chat.completions.create(model="tiny", messages=SPAIN).choices[0].message.content
    assert ended(impatient_server, "cancelled") - cancelled == 2
    assert ended(impatient_server, "length") == ran_out, "a timed-out request ran to its end"


@pytest.fixture(scope="module")
def frugal_server(onnx_model_path: Path) -> Iterator[LiveServer]:
    """A KV budget of 1 MB: raised to one request at the fixture's full context (2,048 positions)."""
    yield from serve(ServerSettings(model_uri=str(onnx_model_path), kv_cache_mb=1))


def test_requests_outgrowing_the_kv_budget_are_parked_and_all_finish(frugal_server: LiveServer) -> None:
    engine = frugal_server.state.backend.engine
    assert engine.options.kv_cache_bytes == 2**20
    layout = engine._batcher.decoder.layout
    assert frugal_server.metric("slmflow_kv_budget_bytes") == engine.context_length * layout.bytes_per_token
    # Two long requests together outgrow 2,048 positions halfway: the newer one is parked, and resumes
    # when the older one ends.
    with engine_held(engine) as release, ThreadPoolExecutor(2) as pool:
        sent = [pool.submit(httpx.post, f"{frugal_server.url}{CHAT}", json=long_request(), timeout=120) for _ in "ab"]
        assert wait_until(lambda: engine.stats.queue_depth == 2, 30)
        release()
        responses = [future.result() for future in sent]
    assert [r.status_code for r in responses] == [200, 200]
    assert [r.json()["usage"]["completion_tokens"] for r in responses] == [LONG, LONG]
    assert frugal_server.metric("slmflow_parked_requests_total") >= 1
    assert frugal_server.metric("slmflow_kv_slots_peak_bytes") <= frugal_server.metric("slmflow_kv_budget_bytes")
