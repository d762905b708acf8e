"""Live slmflow servers on loopback, each a real uvicorn in a thread of the test process.

The tiny fixture model answers "What is the capital of Spain?" with "The capital of Spain is Madrid."
and decodes about 2,000 tokens a second here, so a request forced to 1,900 tokens (`min_tokens`)
stays busy for about a second: long enough to queue behind, cancel, or time out, deterministically.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import openai
import pytest

from slmflow.server import ServerSettings, create_app

SPAIN = [{"role": "user", "content": "What is the capital of Spain?"}]
MADRID = "The capital of Spain is Madrid."
LONG = 1900  # tokens: prompt + LONG fits the fixture's 2,048-token context


@dataclass
class LiveServer:
    url: str
    app: Any  # FastAPI

    @property
    def state(self) -> Any:  # routes.ServerState, once started
        return self.app.state.slmflow

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=60, **kwargs
        )

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample from /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", headers=self._auth(), timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def _auth(self) -> dict[str, str]:
        key = self.state.settings.api_key
        return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}


def serve(settings: ServerSettings, backend: Any = None) -> Iterator[LiveServer]:
    """Run create_app(settings) under uvicorn on a free loopback port until the generator closes."""
    import uvicorn

    app = create_app(settings, backend)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=120)
        assert server.started, "the server did not start"
        yield LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def healthy(url: str) -> bool:
    """Does a server answer 200 on `url`/health now?"""
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `condition` until true or `timeout` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def traces_by_request(experiment: str, request_ids: Iterable[str]) -> dict[str, Any]:
    """The experiment's traces by the id of the request they record, once those of `request_ids` are
    in whole. MLflow writes a trace in steps (its spans, with the trace's metadata, then its info with
    the tags): one was once found with its request id but not yet its tags."""
    wanted = set(request_ids)
    found: dict[str, Any] = {}

    def enough() -> bool:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            return False
        for trace in mlflow.search_traces(locations=[exp.experiment_id], return_type="list", max_results=1000):
            request_id = trace.info.trace_metadata.get("slmflow.request_id")
            if request_id and "slmflow.status" in trace.info.tags:  # else not all written yet
                found[request_id] = trace
        return wanted <= set(found)

    assert wait_until(enough, timeout=60, interval=0.2), f"missing traces: {wanted - set(found)}"
    return found


@pytest.fixture(scope="session")
def onnx_model_path(onnx_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as an `onnx_genai` MLflow model folder: a local path is a model URI."""
    from slmflow import onnx_genai

    path = tmp_path_factory.mktemp("server-models") / "tiny-chat"
    onnx_genai.save_model(onnx_int4, path, task="chat")
    return path


@pytest.fixture(scope="session")
def registered_model_uri(onnx_int4: Path) -> str:
    """The tiny model logged, registered and aliased: `models:/server-tiny@champion`."""
    import mlflow

    from slmflow import onnx_genai

    with mlflow.start_run():
        info = onnx_genai.log_model(onnx_int4, name="model", registered_model_name="server-tiny")
    mlflow.MlflowClient().set_registered_model_alias("server-tiny", "champion", str(info.registered_model_version))
    return "models:/server-tiny@champion"


@pytest.fixture(scope="session")
def server(onnx_model_path: Path) -> Iterator[LiveServer]:
    """Default limits (batches of 16); the model loaded by the app itself at startup."""
    yield from serve(ServerSettings(model_uri=str(onnx_model_path), model_name="tiny"))


@pytest.fixture(scope="session")
def narrow_server(onnx_model_path: Path) -> Iterator[LiveServer]:
    """One request at a time and one waiting: capacity is easy to fill and to see freed."""
    yield from serve(ServerSettings(model_uri=str(onnx_model_path), max_batch_size=1, max_queue=1))


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()
