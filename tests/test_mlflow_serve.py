"""MLflow's own scoring server (`mlflow models serve`) serves both routes' registered models: the tiny
fixture's and the real model's (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slmflow.onnx_genai.schema import CHAT_EXAMPLE, PROMPT_EXAMPLE
from tests.conftest import free_port
from tests.test_real_model import FACTS, ask

MADRID = "The capital of Spain is Madrid."
JOKE = "Why can't you trust an atom? Because they make up everything!"


def start_mlflow_server(model_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` from PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [
        f"{bin_dir}/mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve not ready after {timeout}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def servers(packaged: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("mlflow-serve")
    started = {
        key: (*start_mlflow_server(f"models:/tiny-{key}@champion", logs / f"{key}.log"), logs / f"{key}.log")
        for key in ("onnx-chat", "onnx-prompt", "transformers-chat")
    }
    try:
        for process, url, log in started.values():
            wait_ready(process, url, log)
        yield {key: url for key, (_, url, _) in started.items()}
    finally:
        for process, _, _ in started.values():
            os.killpg(process.pid, 15)
            process.wait(timeout=30)


def invoke(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/invocations", json=body, timeout=60)


@pytest.mark.parametrize("key", ["onnx-chat", "transformers-chat"])
def test_chat_models_answer_the_tutorial_chat_input(servers: dict[str, str], key: str) -> None:
    response = invoke(servers[key], CHAT_EXAMPLE)
    assert response.status_code == 200, response.text
    body = response.json()
    answer = body[0] if isinstance(body, list) else body["predictions"][0]
    assert answer["choices"][0]["message"]["content"] == MADRID


def test_onnx_chat_accepts_mlflow_inputs_envelope_and_per_row_fields(servers: dict[str, str]) -> None:
    response = invoke(servers["onnx-chat"], {"inputs": {**CHAT_EXAMPLE, "max_tokens": 3}})
    assert response.status_code == 200, response.text
    choice = response.json()["predictions"][0]["choices"][0]
    assert choice["finish_reason"] == "length" and MADRID.startswith(choice["message"]["content"])


def test_prompt_model_answers_the_tutorial_prompt_verbatim(servers: dict[str, str]) -> None:
    raw = invoke(servers["onnx-prompt"], PROMPT_EXAMPLE)
    assert raw.status_code == 200, raw.text
    assert raw.json() in ([JOKE], {"predictions": [JOKE]})
    records = invoke(servers["onnx-prompt"], {"dataframe_records": [PROMPT_EXAMPLE, PROMPT_EXAMPLE]})
    assert records.json() == {"predictions": [JOKE, JOKE]}


def test_bad_input_is_a_400_with_a_message(servers: dict[str, str]) -> None:
    response = invoke(servers["onnx-chat"], {"messages": []})
    assert response.status_code == 400
    assert "non-empty list" in response.json()["message"]
    # and the server keeps serving
    assert invoke(servers["onnx-chat"], CHAT_EXAMPLE).status_code == 200


@pytest.fixture(scope="module")
def smol_servers(
    smol_default: dict, smol_transformers: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """SmolLM2 by either route: the default ONNX build (smol) and MLflow's transformers flavor (smol-hf)."""
    logs = tmp_path_factory.mktemp("mlflow-serve-smol")
    started = {
        name: (*start_mlflow_server(f"models:/{name}@champion", logs / f"{name}.log"), logs / f"{name}.log")
        for name in ("smol", "smol-hf")
    }
    try:
        for process, url, log in started.values():
            wait_ready(process, url, log)
        yield {name: url for name, (_, url, _) in started.items()}
    finally:
        for process, _, _ in started.values():
            os.killpg(process.pid, 15)
            process.wait(timeout=30)


@pytest.mark.parametrize("name", ["smol", "smol-hf"])
def test_the_real_model_answers_under_mlflow_models_serve_as_in_process(
    smol_servers: dict[str, str], name: str
) -> None:
    import mlflow

    # Greedy: the ONNX flavor takes temperature 0; the transformers flavor refuses it and decodes greedily.
    fields = {"max_tokens": 48} | ({"temperature": 0.0} if name == "smol" else {})
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    for question, fact in FACTS.items():
        response = invoke(smol_servers[name], {"messages": ask(question), **fields})
        assert response.status_code == 200, response.text
        body = response.json()
        served = (body[0] if isinstance(body, list) else body["predictions"][0])["choices"][0]["message"]["content"]
        [in_process] = model.predict({"messages": ask(question), **fields})
        assert served == in_process["choices"][0]["message"]["content"], question
        assert fact in served, (question, served)
