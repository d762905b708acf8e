"""The real `openai` SDK, sync and async, against a live server: OpenAI's semantics, exactly."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel

from slmflow.server import ServerSettings
from tests.conftest import engine_held
from tests.server.conftest import LONG, MADRID, SPAIN, LiveServer, serve, wait_until


def ask(country: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is the capital of {country}?"}]


def test_chat_completion_answers_with_exact_usage(server: LiveServer, client) -> None:
    response = client.chat.completions.create(model="anything", messages=SPAIN)
    engine = server.state.backend.engine
    prompt_tokens = len(engine.encode(engine.render_chat(SPAIN)))
    assert response.object == "chat.completion" and response.model == "tiny"
    assert response.choices[0].message.content == MADRID and response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == "stop"
    # The answer's 7 text tokens, then <|end|>, which ends the turn and is counted like OpenAI counts it.
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 8)
    assert response.usage.total_tokens == prompt_tokens + 8


def test_max_tokens_and_max_completion_tokens_cut_with_finish_reason_length(client) -> None:
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        response = client.chat.completions.create(model="tiny", messages=SPAIN, **limit)
        assert response.choices[0].finish_reason == "length"
        assert response.usage.completion_tokens == 3
        assert MADRID.startswith(response.choices[0].message.content)


def test_stream_equals_the_whole_answer_and_ends_with_usage(client) -> None:
    whole = client.chat.completions.create(model="tiny", messages=SPAIN)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=SPAIN, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == MADRID
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_text_reaches_the_client_while_its_answer_is_being_generated(server: LiveServer, client) -> None:
    # How many pieces an answer arrives in depends on the machine's speed (tokens generated while the
    # server is busy travel together). What does not: a client that reads the first text and leaves
    # cancels a generation that is still running. Had the text come only once the answer was done,
    # there would be nothing left to cancel and the request would have ended at its length.
    cancelled = server.metric("slmflow_finished_requests_total", reason="cancelled")
    ran_out = server.metric("slmflow_finished_requests_total", reason="length")
    stream = client.chat.completions.create(
        model="tiny", messages=SPAIN, stream=True, max_tokens=LONG, extra_body={"min_tokens": LONG}
    )
    assert next(c for c in stream if c.choices and c.choices[0].delta.content).choices[0].delta.content
    stream.close()
    assert wait_until(
        lambda: server.metric("slmflow_finished_requests_total", reason="cancelled") == cancelled + 1, timeout=60
    )
    assert server.metric("slmflow_finished_requests_total", reason="length") == ran_out


def test_raw_stream_is_server_sent_events_ending_in_done(server: LiveServer) -> None:
    body = {"model": "tiny", "messages": SPAIN, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in events[:-1])


def test_n_returns_n_indexed_choices_sharing_one_prompt(client) -> None:
    single = client.chat.completions.create(model="tiny", messages=SPAIN)
    response = client.chat.completions.create(model="tiny", messages=SPAIN, n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert {c.message.content for c in response.choices} == {MADRID}
    assert response.usage.prompt_tokens == single.usage.prompt_tokens
    assert response.usage.completion_tokens == 3 * single.usage.completion_tokens
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="tiny", messages=SPAIN, n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert streamed == {0: MADRID, 1: MADRID}


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("Madrid", "The capital of Spain is "), (["Spain", "capital"], "The "), ([" is M"], "The capital of Spain")],
)
def test_stop_text_is_never_returned(client, stop, expected: str) -> None:
    response = client.chat.completions.create(model="tiny", messages=SPAIN, stop=stop)
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="tiny", messages=SPAIN, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_same_seed_same_sample(client) -> None:
    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model="tiny", messages=SPAIN, temperature=1.5, seed=seed, max_tokens=24
        )
        return response.choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(seed) for seed in range(1, 6)}) > 1, "temperature 1.5 never sampled anything but the argmax"


def test_temperature_zero_is_greedy(client) -> None:
    answers = {
        client.chat.completions.create(model="tiny", messages=SPAIN, temperature=0).choices[0].message.content
        for _ in range(3)
    }
    assert answers == {MADRID}


class Capital(BaseModel):
    country: Literal["Spain", "France", "Italy"]
    city: Literal["Madrid", "Paris", "Rome"]


def test_json_schema_output_parses_into_the_pydantic_model(client) -> None:
    response = client.chat.completions.parse(model="tiny", messages=SPAIN, response_format=Capital, max_tokens=40)
    parsed = response.choices[0].message.parsed
    assert isinstance(parsed, Capital)
    assert Capital.model_validate_json(response.choices[0].message.content) == parsed


def test_json_object_constrains_the_output_to_a_json_object(client) -> None:
    response = client.chat.completions.create(
        model="tiny", messages=SPAIN, response_format={"type": "json_object"}, max_tokens=30
    )
    # Unconstrained, the answer is plain text; the tiny model never closes a free-form JSON string, so
    # the object is cut by max_tokens, but the grammar made it an object from its first token.
    content = response.choices[0].message.content
    assert content.startswith('{"') and not content.startswith(MADRID)
    assert response.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict)


def test_unknown_fields_are_ignored(client) -> None:
    response = client.chat.completions.create(
        model="tiny",
        messages=SPAIN,
        user="someone",
        extra_body={"logit_bias": {}, "frequency_penalty": 0, "not_a_field": 1},
    )
    assert response.choices[0].message.content == MADRID


def test_text_completions_with_and_without_stream(client) -> None:
    prompt = "<|user|>\ncapital of Peru?<|end|>\n<|assistant|>\n"
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=20)
    assert response.object == "text_completion"
    assert response.choices[0].text == "The capital of Peru is Lima." and response.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(model="tiny", prompt=prompt, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == response.choices[0].text
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_concurrent_greedy_answers_equal_sequential_ones_token_for_token(server: LiveServer, client) -> None:
    """Six prompts of different lengths, each forced to 30 tokens: batched, padded, yet identical."""
    questions = [ask(c) for c in ("Spain", "France", "Japan", "Kenya", "Peru", "Norway")]
    questions[1] = [{"role": "system", "content": "You are a helpful assistant."}, *questions[1]]
    options = {"max_tokens": 30, "extra_body": {"min_tokens": 30}}
    sequential = [client.chat.completions.create(model="tiny", messages=q, **options) for q in questions]
    batches_before = server.metric("slmflow_batches_total")
    requests_before = server.metric("slmflow_batched_requests_total")
    engine = server.state.backend.engine

    async def concurrently(release: Callable[[], None]) -> list:
        async with server.async_client() as aclient:
            sent = [
                asyncio.ensure_future(aclient.chat.completions.create(model="tiny", messages=q, **options))
                for q in questions
            ]
            while engine.stats.queue_depth < len(questions):  # all six wait behind the busy engine
                await asyncio.sleep(0.01)
            release()
            return await asyncio.gather(*sent)

    with engine_held(engine) as release:
        concurrent = asyncio.run(concurrently(release))
    assert [r.choices[0].message.content for r in concurrent] == [r.choices[0].message.content for r in sequential]
    assert [r.usage for r in concurrent] == [r.usage for r in sequential]
    assert sequential[0].choices[0].message.content.startswith(MADRID)
    batches = server.metric("slmflow_batches_total") - batches_before
    batched = server.metric("slmflow_batched_requests_total") - requests_before
    assert batched == len(questions) and batches == 1, "six waiting requests did not share one batch"


@pytest.fixture(scope="module")
def short_answers_server(onnx_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A model packaged with a default of 3 new tokens."""
    from slmflow import onnx_genai

    path = tmp_path_factory.mktemp("server-defaults") / "tiny-short"
    onnx_genai.save_model(onnx_int4, path, task="chat", generation_defaults={"max_tokens": 3})
    yield from serve(ServerSettings(model_uri=str(path)))


def test_packaged_generation_defaults_apply_unless_the_request_sets_them(short_answers_server: LiveServer) -> None:
    client = short_answers_server.client()
    short = client.chat.completions.create(model="tiny", messages=SPAIN)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")
    assert (
        client.chat.completions.create(model="tiny", messages=SPAIN, max_tokens=20).choices[0].message.content == MADRID
    )


def test_models_health_and_ping(server: LiveServer, client) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    for path in ("/health", "/ping"):
        response = httpx.get(f"{server.url}{path}", timeout=10)
        assert response.status_code == 200 and response.json()["status"] == "ok"


def test_metrics_count_requests_tokens_and_first_tokens(server: LiveServer, client) -> None:
    route = {"route": "/v1/chat/completions", "status": "200"}
    before = (
        server.metric("slmflow_requests_total", **route),
        server.metric("slmflow_completion_tokens_total"),
        server.metric("slmflow_time_to_first_token_seconds_count"),
    )
    response = client.chat.completions.create(model="tiny", messages=SPAIN)
    after = (
        server.metric("slmflow_requests_total", **route),
        server.metric("slmflow_completion_tokens_total"),
        server.metric("slmflow_time_to_first_token_seconds_count"),
    )
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == response.usage.completion_tokens
    assert after[2] - before[2] == 1
    assert server.metric("slmflow_queue_depth") == 0


def test_a_continuing_conversation_reports_its_cached_prompt_tokens(server: LiveServer, client) -> None:
    # A system prompt long enough to be kept (256 tokens by default), then two turns sent whole.
    messages = [{"role": "system", "content": "You answer questions about capitals. " * 40}, *SPAIN]
    hits, cached = server.metric("slmflow_prefix_cache_hits_total"), server.metric("slmflow_prefix_cached_tokens_total")
    first = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0 and first.usage.prompt_tokens >= 256
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, *SPAIN]
    stream = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    usage = next(chunk.usage for chunk in stream if chunk.usage)
    assert first.usage.prompt_tokens <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert server.metric("slmflow_prefix_cache_hits_total") == hits + 1
    assert server.metric("slmflow_prefix_cached_tokens_total") == cached + usage.prompt_tokens_details.cached_tokens
    assert server.metric("slmflow_prefix_cache_bytes") > 0


def test_one_log_line_per_request(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="slmflow.server"):
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": SPAIN}, timeout=30)
        request_id = response.headers["x-request-id"]
        assert wait_for_log(caplog, request_id)
    lines = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert len(lines) == 1
    usage = response.json()["usage"]
    assert (
        f"POST /v1/chat/completions 200 tokens={usage['prompt_tokens']}+{usage['completion_tokens']} ttft=" in lines[0]
    )


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    from tests.server.conftest import wait_until

    # The line is written once the response is sent, on the server's thread.
    return wait_until(lambda: any(text in r.getMessage() for r in caplog.records), timeout=10)


@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": ["messages"], "data": [[SPAIN]]}},
        {"dataframe_records": [{"messages": SPAIN}]},
        {"inputs": {"messages": SPAIN}},
        {"instances": {"messages": SPAIN}},
    ],
    ids=["dataframe_split", "dataframe_records", "inputs", "instances"],
)
def test_invocations_speaks_mlflows_scoring_protocol(server: LiveServer, payload: dict) -> None:
    response = httpx.post(f"{server.url}/invocations", json=payload, timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert predictions[0]["choices"][0]["message"]["content"] == MADRID


def test_invocations_answers_a_plain_chat_request_unwrapped_like_mlflow(server: LiveServer) -> None:
    # `mlflow models serve` answers the unified LLM format ({"messages": ...}) without "predictions".
    response = httpx.post(f"{server.url}/invocations", json={"messages": SPAIN, "max_tokens": 20}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()[0]["choices"][0]["message"]["content"] == MADRID


def test_invocations_errors_use_the_envelope(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}/invocations", json={"neither": "format"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(f"{server.url}/invocations", content=b"a,b", headers={"content-type": "text/xml"}, timeout=30)
    assert response.status_code == 415 and "error" in response.json()
