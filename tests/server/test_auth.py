"""With an API key, every route but /health and /ping needs `Authorization: Bearer <key>`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from slmflow.server import ServerSettings
from tests.server.conftest import MADRID, SPAIN, LiveServer, serve

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def locked_server(onnx_model_path: Path) -> Iterator[LiveServer]:
    yield from serve(ServerSettings(model_uri=str(onnx_model_path), api_key=KEY))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
    ],
    ids=["none", "wrong key", "no scheme", "basic", "longer key"],
)
def test_requests_without_the_key_are_a_401(locked_server: LiveServer, headers: dict[str, str]) -> None:
    for method, path in (
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/invocations"),
    ):
        response = httpx.request(
            method, f"{locked_server.url}{path}", json={"messages": SPAIN}, headers=headers, timeout=30
        )
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_the_key_opens_the_api_to_the_sdk(locked_server: LiveServer) -> None:
    answer = locked_server.client(api_key=KEY).chat.completions.create(model="tiny", messages=SPAIN)
    assert answer.choices[0].message.content == MADRID
    with pytest.raises(openai.AuthenticationError):
        locked_server.client(api_key="sk-wrong").chat.completions.create(model="tiny", messages=SPAIN)


def test_health_stays_open(locked_server: LiveServer) -> None:
    assert httpx.get(f"{locked_server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{locked_server.url}/ping", timeout=10).status_code == 200
