"""The transformers route (MLflow's `llm/v1/chat` pyfunc) behind the same API, one request at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slmflow.server import ServerSettings
from slmflow.server.backend import PyfuncBackend
from tests.server.conftest import MADRID, SPAIN, LiveServer, serve


@pytest.fixture(scope="module")
def transformers_model_path(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow
    import transformers

    path = tmp_path_factory.mktemp("server-transformers") / "tiny-chat"
    pipeline = transformers.pipeline("text-generation", model=str(tiny_checkpoint), device="cpu")
    mlflow.transformers.save_model(
        transformers_model=pipeline,
        path=str(path),
        task="llm/v1/chat",
        pip_requirements=["transformers", "torch==2.13.0"],
    )
    return path


@pytest.fixture(scope="module")
def transformers_server(transformers_model_path: Path) -> Iterator[LiveServer]:
    yield from serve(ServerSettings(model_uri=str(transformers_model_path)))


def test_served_by_the_pyfunc_backend(transformers_server: LiveServer) -> None:
    assert isinstance(transformers_server.state.backend, PyfuncBackend)


def test_chat_completion_and_stream(transformers_server: LiveServer) -> None:
    client = transformers_server.client()
    response = client.chat.completions.create(model="tiny", messages=SPAIN)
    assert response.choices[0].message.content == MADRID and response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=SPAIN, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == MADRID
    assert chunks[-1].usage == response.usage


def test_max_tokens_stop_and_n(transformers_server: LiveServer) -> None:
    client = transformers_server.client()
    cut = client.chat.completions.create(model="tiny", messages=SPAIN, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    stopped = client.chat.completions.create(model="tiny", messages=SPAIN, stop=["Madrid"])
    assert stopped.choices[0].message.content == "The capital of Spain is "
    several = client.chat.completions.create(model="tiny", messages=SPAIN, n=2)
    assert [c.message.content for c in several.choices] == [MADRID, MADRID]


def test_what_it_cannot_do_is_a_clear_400(transformers_server: LiveServer) -> None:
    url = transformers_server.url
    bad = [
        ("/v1/chat/completions", {"messages": SPAIN, "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ("/v1/completions", {"prompt": "capital of Spain?"}, "prompt"),
    ]
    for path, body, param in bad:
        response = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_invocations_like_mlflow_models_serve(transformers_server: LiveServer) -> None:
    response = httpx.post(
        f"{transformers_server.url}/invocations", json={"dataframe_records": [{"messages": SPAIN}]}, timeout=60
    )
    assert response.status_code == 200
    assert response.json()["predictions"][0]["choices"][0]["message"]["content"] == MADRID
