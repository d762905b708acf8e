"""Regression tests for the faults the reliability tests found, each as the exact request that failed.

Before the fixes each of these was a 500 (the engine's batch failed after the request was accepted),
a 200 stream ending in an error event, or an error naming the wrong field.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from tests.server.conftest import SPAIN, LiveServer

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
INT32_MAX = 2**31 - 1
VOCAB = 1088  # the tiny fixture's vocabulary


def post_raw(server: LiveServer, path: str, raw: str) -> httpx.Response:
    """JSON as written, so "\\ud800" (a lone surrogate, valid JSON) reaches the server as such."""
    return httpx.post(
        f"{server.url}{path}", content=raw.encode(), headers={"content-type": "application/json"}, timeout=60
    )


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": SPAIN, "max_tokens": 4, **fields}


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture(autouse=True)
def no_engine_failures(caplog: pytest.LogCaptureFixture):
    """None of these may fail a batch on the engine's owner thread (logged as an error there)."""
    with caplog.at_level(logging.ERROR, logger="slmflow"):
        yield
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("slmflow")]
    assert failures == []


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
        (TEXT, '{"prompt": "\\udfff and more", "max_tokens": 2}', "prompt"),
    ],
)
def test_lone_surrogates_are_a_400(server: LiveServer, path: str, raw: str, param: str) -> None:
    error = error_of(post_raw(server, path, raw))
    assert error["param"] == param and "not valid Unicode" in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seed": 2**31, "temperature": 1}, "seed"),
        ({"seed": -(2**31) - 1, "temperature": 1}, "seed"),
        ({"seed": 10**30, "temperature": 1}, "seed"),
        ({"seed": INT32_MAX, "temperature": 1, "n": 2}, "seed"),  # choice 1 samples with seed + 1
        ({"top_k": 2**31, "temperature": 1}, "top_k"),
        ({"top_k": VOCAB + 1, "temperature": 1}, "top_k"),
    ],
)
def test_integers_the_runtime_cannot_take_are_a_400(server: LiveServer, fields: dict, param: str) -> None:
    assert error_of(httpx.post(f"{server.url}{CHAT}", json=chat(**fields), timeout=60))["param"] == param


@pytest.mark.parametrize(
    "fields",
    [{"seed": INT32_MAX, "temperature": 1}, {"seed": -(2**31), "temperature": 1}, {"top_k": VOCAB, "temperature": 1}],
)
def test_the_limits_themselves_are_served(server: LiveServer, fields: dict) -> None:
    assert httpx.post(f"{server.url}{CHAT}", json=chat(**fields), timeout=60).status_code == 200


BAD_SCHEMAS = {
    "unsatisfiable": {"type": "integer", "minimum": 5, "maximum": 1},
    "bad pattern": {"type": "string", "pattern": "(("},
    "unsupported keyword": {"not": {}},
    "unknown type": {"type": "bogus"},
    "empty enum": {"enum": []},
    "external ref": {"$ref": "file:///etc/passwd"},
    "bad x-guidance": {"type": "object", "x-guidance": {"bogus": 1}},
}


@pytest.mark.parametrize("schema", BAD_SCHEMAS.values(), ids=BAD_SCHEMAS.keys())
@pytest.mark.parametrize("stream", [False, True])
def test_json_schemas_the_guidance_engine_refuses_are_a_400(server: LiveServer, schema: dict, stream: bool) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    response = httpx.post(f"{server.url}{CHAT}", json=chat(response_format=response_format, stream=stream), timeout=60)
    error = error_of(response)  # a stream is refused before its 200, not ended by an error event
    assert error["param"] == "response_format" and "cannot be used" in error["message"]


def test_a_good_json_schema_still_guides(server: LiveServer) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"enum": ["Madrid", "Paris"]}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    body = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, max_tokens=40)
    answer = httpx.post(f"{server.url}{CHAT}", json=body, timeout=60).json()
    assert json.loads(answer["choices"][0]["message"]["content"])["capital"] in ("Madrid", "Paris"), answer


def test_n_as_a_whole_float_is_an_integer(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}{CHAT}", json=chat(n=2.0), timeout=60)
    assert response.status_code == 200 and len(response.json()["choices"]) == 2
    assert error_of(httpx.post(f"{server.url}{CHAT}", json=chat(n=1.5), timeout=60))["param"] == "n"


def test_a_text_prompt_over_the_context_names_the_prompt(server: LiveServer) -> None:
    error = error_of(httpx.post(f"{server.url}{TEXT}", json={"prompt": "x" * 5000}, timeout=60))
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")


@pytest.mark.parametrize(
    "raw",
    [
        '{"inputs": {"messages": [{"role": "user", "content": "hi"}]}, "params": {"seed": 2147483648, "temperature": 1.0}}',
        '{"inputs": {"messages": [{"role": "user", "content": "hi"}]}, "params": {"top_k": 5000, "temperature": 1.0}}',
        '{"inputs": {"messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 2147483647, "temperature": 1.0}}',
    ],
)
def test_invocations_refuse_them_too(server: LiveServer, raw: str) -> None:
    error = error_of(post_raw(server, "/invocations", raw))
    assert "seed" in error["message"] or "top_k" in error["message"]


def test_the_openapi_schema_documents_the_api_as_it_answers(server: LiveServer) -> None:
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method} {path}: FastAPI's 422 is never sent (bad input is a 400)"
            for status in ("4XX", "5XX"):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorEnvelope"), (method, path, status)
    envelope = schema["components"]["schemas"]["ErrorObject"]
    assert set(envelope["required"]) == {"message", "type", "param", "code"}
    assert envelope["additionalProperties"] is False
    chat_request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"max_tokens", "temperature", "top_p", "stop", "seed", "response_format"} <= set(chat_request)
    assert chat_request["messages"]["items"]["required"] == ["role", "content"]
    assert "requestBody" in schema["paths"]["/invocations"]["post"]
    stream = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(stream)


def test_a_null_max_completion_tokens_does_not_hide_max_tokens(server: LiveServer) -> None:
    answer = httpx.post(f"{server.url}{CHAT}", json=chat(max_tokens=3, max_completion_tokens=None), timeout=60).json()
    assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["finish_reason"] == "length"


def test_an_invalid_max_tokens_beside_max_completion_tokens_is_a_400(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}{CHAT}", json=chat(max_tokens="many", max_completion_tokens=4), timeout=60)
    assert error_of(response)["param"] == "max_tokens"
