"""Security: loopback by default, the API key on every route but /health and /ping, no pickle from
model artifacts, limits on body size and prompt length, and nothing from a request reaches the disk.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmflow.server import ServerSettings, create_app
from tests.reliability.conftest import AuditWatch, ServeProcess, record
from tests.server.conftest import MADRID, SPAIN, LiveServer, serve

KEY = "sk-reliability-0123456789"
# /: the playground page, static like the docs pages would be; all it shows comes through the API,
# which needs the key (the page asks for it).
OPEN_ROUTES = {"/health", "/ping", "/"}
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def envelope(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_FIELDS, body
    return body["error"]


def test_the_audit_hook_sees_what_these_tests_look_for(tmp_path: Path, audit: AuditWatch) -> None:
    """The assertions below rely on it: an open of a canary path and an unpickling are both seen."""
    canary = tmp_path / f"canary-{uuid.uuid4().hex}"
    with audit.watch():
        canary.write_text("x")
        pickle.loads(pickle.dumps(Path("x")))
    assert audit.matching(canary.name) and any(event == "pickle.find_class" for event, _ in audit.events)


# --- bind -------------------------------------------------------------------------------------


def test_default_bind_is_loopback(serve_subprocess: ServeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLMFLOW_HOST", raising=False)
    assert ServerSettings().host == "127.0.0.1"
    # `slmflow serve` started without --host: its one listening socket is on loopback.
    assert serve_subprocess.host == "127.0.0.1"
    record("security", default_bind=f"{serve_subprocess.host} (slmflow serve without --host)")


# --- API key ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_server(onnx_model_path: Path) -> Iterator[LiveServer]:
    yield from serve(ServerSettings(model_uri=str(onnx_model_path), api_key=KEY, log_level="warning"))


def registered_routes(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route, included routers walked (none of ours has a prefix)."""

    def walk(routes: list[Any]) -> Iterator[Any]:
        for route in routes:
            if hasattr(route, "original_router"):  # FastAPI's included router
                yield from walk(route.original_router.routes)
            else:
                yield route

    return sorted(
        (method, route.path) for route in walk(app.routes) for method in getattr(route, "methods", None) or ()
    )


def test_with_a_key_every_route_but_health_needs_it(locked_server: LiveServer) -> None:
    """Every route the app registers, found by walking it (a new route is covered without a test edit)."""
    routes = registered_routes(locked_server.app)
    assert ("GET", "/openapi.json") in routes and ("POST", "/invocations") in routes
    checked = []
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            response = httpx.request(method, f"{locked_server.url}{path}", headers=headers, json={}, timeout=30)
            if path in OPEN_ROUTES:
                assert response.status_code == 200, (method, path)
            else:
                assert response.status_code == 401, (method, path, response.status_code)
                assert envelope(response)["code"] == "invalid_api_key"
        checked.append(f"{method} {path}")
    # The documentation pages cannot send a key, so with one they are off.
    for path in ("/docs", "/redoc"):
        assert httpx.get(f"{locked_server.url}{path}", timeout=10).status_code == 404
    keyed = httpx.get(f"{locked_server.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert keyed.status_code == 200 and "/v1/chat/completions" in keyed.json()["paths"]
    record("security", routes_needing_the_key=[r for r in checked if r.split()[1] not in OPEN_ROUTES])


def test_without_a_key_the_docs_stay_open() -> None:
    app = create_app(ServerSettings(model_uri="unused"), backend=object())  # type: ignore[arg-type]
    paths = {path for _, path in registered_routes(app)}
    assert {"/openapi.json", "/docs", "/redoc"} <= paths


# --- no pickle --------------------------------------------------------------------------------


class Booby:
    """Unpickling this makes a directory: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (str(self.marker),))


def test_no_pickle_is_loaded_from_model_artifacts(onnx_int4: Path, tmp_path: Path, audit: AuditWatch) -> None:
    """Pickles planted where MLflow flavors keep theirs are never opened, and nothing is unpickled."""
    import mlflow

    from slmflow import onnx_genai
    from slmflow.server.backend import load_backend

    path = tmp_path / "model"
    onnx_genai.save_model(onnx_int4, path)
    saved = [p for p in path.rglob("*") if p.is_file() and p.read_bytes()[:1] == b"\x80"]
    assert saved == [], f"the flavor wrote pickles: {saved}"
    marker = tmp_path / "unpickled"
    planted = [path / "python_model.pkl", path / "model.pkl", path / "model" / "model.pkl", path / "data" / "model.pkl"]
    for file in planted:
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(pickle.dumps(Booby(marker)))
    with audit.watch():
        model = mlflow.pyfunc.load_model(str(path))
        answer = model.predict({"messages": SPAIN})
        engine = onnx_genai.load_model(str(path))
        engine.close()
        model.get_raw_model().close()
        backend = load_backend(ServerSettings(model_uri=str(path)))
        backend.close()
    assert answer[0]["choices"][0]["message"]["content"] == MADRID
    unpickled = [args for event, args in audit.events if event == "pickle.find_class"]
    opened = [args[0] for event, args in audit.events if event == "open" and str(args[0]).endswith(".pkl")]
    assert not marker.exists() and unpickled == [] and opened == [], (unpickled, opened)
    record("security", pickles_planted=len(planted), pickle_classes_loaded=0, pickle_files_opened=0)


# --- limits -----------------------------------------------------------------------------------

SMALL_BODY = 64 * 1024


@pytest.fixture(scope="module")
def small_body_server(onnx_model_path: Path) -> Iterator[LiveServer]:
    yield from serve(ServerSettings(model_uri=str(onnx_model_path), max_body_bytes=SMALL_BODY, log_level="warning"))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/invocations"])
def test_body_size_limit_on_every_post_route(small_body_server: LiveServer, path: str) -> None:
    filler = "x" * SMALL_BODY
    body = {"messages": [{"role": "user", "content": filler}], "prompt": filler, "inputs": {"prompt": filler}}
    declared = httpx.post(f"{small_body_server.url}{path}", json=body, timeout=30)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(4):
            yield filler.encode()[: SMALL_BODY // 2]
        yield b'"}'

    streamed = httpx.post(
        f"{small_body_server.url}{path}", content=chunks(), headers={"content-type": "application/json"}, timeout=30
    )
    for response in (declared, streamed):
        assert response.status_code == 413 and envelope(response)["code"] == "request_too_large"
    ok = httpx.post(f"{small_body_server.url}/v1/chat/completions", json={"messages": SPAIN}, timeout=30)
    assert ok.status_code == 200


def test_prompt_length_limit_is_the_context_and_is_enforced(server: LiveServer) -> None:
    """A prompt as large as the default 4 MiB body allows is refused as over the context (how long
    that takes is recorded: it measures the machine as much as the server)."""
    import time

    text = "x" * (server.state.settings.max_body_bytes - 1024)  # one token per character
    timings = {}
    for path, body, param in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}, "messages"),
        ("/v1/completions", {"prompt": text}, "prompt"),
    ):
        started = time.monotonic()
        response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        timings[path] = round(time.monotonic() - started, 2)
        error = envelope(response)
        assert response.status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded", param)
    invocation = httpx.post(
        f"{server.url}/invocations", json={"inputs": {"messages": [{"role": "user", "content": text}]}}, timeout=60
    )
    assert invocation.status_code == 400 and "context" in envelope(invocation)["message"]
    record("security", seconds_to_refuse_a_4mib_prompt=timings)


# --- requests never reach the filesystem ----------------------------------------------------


def test_model_names_and_paths_in_requests_never_reach_the_filesystem(
    server: LiveServer, tmp_path: Path, audit: AuditWatch
) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    target = tmp_path / canary
    target.mkdir()
    (target / "MLmodel").write_text("flavors: {}\n")
    names = [str(target), f"../../../..{target}", f"file://{target}", f"models:/{canary}@champion",
             f"runs:/{canary}/model", f"{canary}/../../etc/passwd", f"mlflow-artifacts:/{canary}"]  # fmt: skip
    sent = 0
    with audit.watch():
        for name in names:
            for path, body in (
                ("/v1/chat/completions", {"model": name, "messages": SPAIN}),
                ("/v1/completions", {"model": name, "prompt": "The capital of Spain is", "max_tokens": 4}),
                ("/invocations", {"inputs": {"messages": SPAIN, "model": name}}),
                ("/invocations", {"inputs": {"messages": SPAIN}, "params": {"model": name}}),
            ):
                response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
                sent += 1
                assert response.status_code == 200, response.text
                assert canary not in response.text
                if path.startswith("/v1"):
                    assert response.json()["model"] == "tiny"  # the served model, whatever was asked
            for url in (f"/v1/models/{name}", f"/{name}", f"/v1/{canary}/..%2F..%2FMLmodel"):
                response = httpx.get(f"{server.url}{url}", timeout=30)
                sent += 1
                assert response.status_code == 404 and envelope(response)["code"] == "not_found"
        # A chat template is data, not code from the request: an include in a message stays text.
        include = [{"role": "user", "content": "{% include '" + str(target / "MLmodel") + "' %}"}]
        response = httpx.post(
            f"{server.url}/v1/chat/completions", json={"messages": include, "max_tokens": 4}, timeout=30
        )
        assert response.status_code == 200
        # A JSON schema's $ref to a file is refused, not fetched.
        ref = {"type": "json_schema", "json_schema": {"schema": {"$ref": f"file://{target}/MLmodel"}}}
        response = httpx.post(
            f"{server.url}/v1/chat/completions", json={"messages": SPAIN, "response_format": ref}, timeout=30
        )
        assert response.status_code == 400 and envelope(response)["param"] == "response_format"
        sent += 2
    touched = audit.matching(canary)
    assert touched == [], touched
    record("security", filesystem_probe_requests=sent, filesystem_accesses_from_requests=len(touched))
