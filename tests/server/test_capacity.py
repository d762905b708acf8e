"""Under load: disconnects cancel generations, a full queue answers 429, slow requests time out.

These run on servers with one batch slot and one queue place, so capacity is easy to fill and it is
visible when it is freed. A "long" request is forced to LONG tokens (about a second of decoding);
the engine's `slmflow_generated_tokens_total` shows whether it ran to the end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from slmflow.server import ServerSettings
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


@pytest.fixture(scope="module")
def impatient_server(onnx_model_path: Path) -> Iterator[LiveServer]:
    # Short enough that two timed-out generations stay under LONG tokens even on a fast, idle
    # machine (the tiny model decodes a few thousand tokens per second).
    yield from serve(ServerSettings(model_uri=str(onnx_model_path), max_batch_size=1, request_timeout=0.1))


def test_engine_limits_reach_the_model(narrow_server: LiveServer) -> None:
    options = narrow_server.state.backend.engine.options
    assert (options.max_batch_size, options.max_queue) == (1, 1)


def test_client_leaving_a_stream_cancels_its_generation_and_frees_the_slot(narrow_server: LiveServer) -> None:
    threads = threading.active_count()
    before = narrow_server.metric("slmflow_generated_tokens_total")
    with streaming(narrow_server, long_request()) as (response, events):
        assert response.status_code == 200
        first_content(events)
    # One slot: this request could not start before the cancelled one left the batch.
    answer = narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    assert answer.choices[0].message.content == MADRID
    generated = narrow_server.metric("slmflow_generated_tokens_total") - before
    assert generated < LONG / 2, f"the abandoned request kept generating ({generated} tokens)"
    assert narrow_server.metric("slmflow_queue_depth") == 0
    assert wait_until(lambda: threading.active_count() <= threads, timeout=10), "a thread outlived its request"


def test_client_leaving_a_non_streaming_request_cancels_it(narrow_server: LiveServer) -> None:
    before = narrow_server.metric("slmflow_generated_tokens_total")
    # The client leaves after 0.1 s: on a fast idle machine the tiny model decodes ~650 tokens in
    # 0.2 s, too near the bound below for it to tell cancellation from speed.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{narrow_server.url}{CHAT}", json=long_request(), timeout=httpx.Timeout(30, read=0.1))
    assert wait_until(lambda: narrow_server.metric("slmflow_requests_total", route=CHAT, status="499") >= 1, timeout=10)
    narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    assert narrow_server.metric("slmflow_generated_tokens_total") - before < LONG / 2 + 8


def test_full_queue_is_a_429_with_retry_after_and_the_server_recovers(narrow_server: LiveServer) -> None:
    with ExitStack() as stack:
        _, running = stack.enter_context(streaming(narrow_server, long_request()))
        first_content(running)  # holds the only batch slot
        waiting, _ = stack.enter_context(streaming(narrow_server, long_request()))
        assert waiting.status_code == 200  # its headers mean it was queued: the one queue place is taken
        refused = httpx.post(f"{narrow_server.url}{CHAT}", json={"model": "tiny", "messages": SPAIN}, timeout=30)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    # Both streams are closed: their places are free again.
    assert (
        narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN).choices[0].message.content
        == MADRID
    )


def test_n_choices_are_queued_all_or_none(narrow_server: LiveServer) -> None:
    before = narrow_server.metric("slmflow_generated_tokens_total")
    # The first choice takes the slot, the second the queue place; the third is refused, and so is the request.
    response = httpx.post(f"{narrow_server.url}{CHAT}", json=long_request(n=3), timeout=30)
    assert response.status_code == 429
    narrow_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    assert narrow_server.metric("slmflow_generated_tokens_total") - before < LONG / 2 + 8


def test_a_request_over_its_time_is_a_504_and_stops_generating(impatient_server: LiveServer) -> None:
    before = impatient_server.metric("slmflow_generated_tokens_total")
    response = httpx.post(f"{impatient_server.url}{CHAT}", json=long_request(), timeout=30)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    with streaming(impatient_server, long_request()) as (response, events):
        lines = list(events)
    assert '"code":"request_timeout"' in lines[-1] and "data: [DONE]" not in lines
    impatient_server.client().chat.completions.create(model="tiny", messages=SPAIN)
    assert impatient_server.metric("slmflow_generated_tokens_total") - before < LONG + 8
