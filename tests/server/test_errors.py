"""Bad input gets a 4xx in OpenAI's one error envelope, never a 500, and the next request is served."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import MADRID, SPAIN, LiveServer

CHAT = "/v1/chat/completions"
LONG_TEXT = " ".join(["capital"] * 3000)  # more tokens than the fixture's 2,048-token context


def post(server: LiveServer, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30, **kwargs)


def envelope(response: httpx.Response) -> dict[str, Any]:
    """The error object, after checking the envelope has exactly OpenAI's four fields."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": SPAIN, **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([SPAIN], None),
        ({"model": "tiny"}, "messages"),
        (chat(messages="What is the capital of Spain?"), "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 42}]), "messages[0].content"),
        (chat(messages=["hi"]), "messages[0]"),
        (chat(temperature=-0.5), "temperature"),
        (chat(temperature=2.5), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(top_p=1.5), "top_p"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=-3), "max_tokens"),
        (chat(max_tokens=2.5), "max_tokens"),
        (chat(max_completion_tokens="10"), "max_tokens"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stop=[1]), "stop"),
        (chat(n=0), "n"),
        (chat(n=17), "n"),
        (chat(n="2"), "n"),
        (chat(stream="yes"), "stream"),
        (chat(seed="seven"), "seed"),
        (chat(response_format={"type": "xml"}), "response_format"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}),
            "response_format",
        ),
        (chat(response_format={"type": "json_schema"}), "response_format"),
    ],
)
def test_bad_chat_request_is_a_400_naming_the_field(server: LiveServer, body: Any, param: str | None) -> None:
    response = post(server, CHAT, body)
    assert response.status_code == 400, response.text
    error = envelope(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_is_a_400(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.url}{CHAT}", content=b'{"messages": [', headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400
    assert envelope(response)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param"),
    [(chat(max_tokens=2040), "max_tokens"), (chat(messages=[{"role": "user", "content": LONG_TEXT}]), "messages")],
    ids=["prompt+max_tokens", "prompt alone"],
)
def test_over_the_context_is_a_400_context_length_exceeded(server: LiveServer, body: dict, param: str) -> None:
    response = post(server, CHAT, body)
    assert response.status_code == 400
    error = envelope(response)
    assert (error["code"], error["param"]) == ("context_length_exceeded", param)


def test_bad_text_completion_requests(server: LiveServer) -> None:
    for body, param in (
        ({"model": "tiny"}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
    ):
        response = post(server, "/v1/completions", body)
        assert response.status_code == 400 and envelope(response)["param"] == param, response.text


def test_oversized_body_is_a_413(server: LiveServer) -> None:
    limit = server.state.settings.max_body_bytes
    too_big = chat(messages=[{"role": "user", "content": "x" * limit}])
    response = post(server, CHAT, too_big)
    assert response.status_code == 413
    assert envelope(response)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"x" * limit
        yield b'"}]}'

    response = httpx.post(
        f"{server.url}{CHAT}", content=chunked(), headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert envelope(response)["code"] == "request_too_large"


def test_unknown_routes_and_methods_use_the_envelope(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/v1/nothing-here", timeout=10)
    assert response.status_code == 404 and envelope(response)["code"] == "not_found"
    response = httpx.get(f"{server.url}{CHAT}", timeout=10)
    assert response.status_code == 405 and envelope(response)["code"] == "method_not_allowed"


def test_the_sdk_raises_typed_errors_with_param_and_code(server: LiveServer) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=SPAIN, temperature=-1)
    assert error.value.param == "temperature" and error.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=SPAIN, max_tokens=5000)
    assert error.value.code == "context_length_exceeded"


def test_after_bad_requests_the_server_still_answers_and_never_sent_a_500(server: LiveServer) -> None:
    assert post(server, CHAT, chat(messages=[])).status_code == 400
    assert post(server, CHAT, chat(max_tokens=2040)).status_code == 400
    assert server.client().chat.completions.create(model="tiny", messages=SPAIN).choices[0].message.content == MADRID
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    statuses = {
        s.labels["status"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "slmflow_requests_total"
    }
    assert "400" in statuses and not any(status.startswith("5") for status in statuses)
