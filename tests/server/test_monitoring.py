"""Monitoring: what `slmflow serve` served, found in MLflow as traces and as a run of serving metrics,
and turned back into evaluation data. Real SQLite store, real server, real `openai` client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from click.testing import CliRunner

from slmflow.cli import main
from slmflow.server import ServerSettings
from tests.conftest import free_port
from tests.server.conftest import LONG, MADRID, SPAIN, LiveServer, healthy, serve, traces_by_request, wait_until

CHAT = "/v1/chat/completions"
EXPERIMENT = "monitoring-tests"
PRIVATE = "monitoring-tests-private"


@pytest.fixture(scope="module")
def traced(registered_model_uri: str) -> Iterator[LiveServer]:
    settings = ServerSettings(
        model_uri=registered_model_uri, model_name="tiny", trace_experiment=EXPERIMENT, metrics_interval=0.2
    )
    yield from serve(settings)


def root(trace: Any) -> Any:
    return next(span for span in trace.data.spans if span.parent_id is None)


def test_each_request_is_a_trace_linked_to_the_served_model(traced: LiveServer) -> None:
    client = traced.client()
    ids = {}
    plain = client.chat.completions.with_raw_response.create(model="tiny", messages=SPAIN, temperature=0, seed=3)
    ids["plain"] = plain.headers["x-request-id"]
    two = client.chat.completions.with_raw_response.create(model="tiny", messages=SPAIN, n=2)
    ids["n=2"] = two.headers["x-request-id"]
    with httpx.stream("POST", f"{traced.url}{CHAT}", json={"messages": SPAIN, "stream": True}, timeout=60) as response:
        ids["stream"] = response.headers["x-request-id"]
        streamed = [line for line in response.iter_lines() if line]
    bad = httpx.post(f"{traced.url}{CHAT}", json={"messages": SPAIN, "temperature": 7}, timeout=60)
    ids["400"] = bad.headers["x-request-id"]
    body = {"messages": SPAIN, "stream": True, "max_tokens": LONG, "min_tokens": LONG}
    with httpx.stream("POST", f"{traced.url}{CHAT}", json=body, timeout=60) as response:
        ids["left"] = response.headers["x-request-id"]
        next(line for line in response.iter_lines() if '"content":"' in line and '"content":""' not in line)
    assert plain.parse().choices[0].message.content == MADRID and streamed[-1] == "data: [DONE]"

    traces = traces_by_request(EXPERIMENT, ids.values())
    version = mlflow.MlflowClient().get_model_version_by_alias("server-tiny", "champion")
    for kind, request_id in ids.items():
        trace = traces[request_id]
        # Linked to the LoggedModel that the registered version's run logged.
        assert mlflow.get_logged_model(trace.info.trace_metadata["mlflow.modelId"]).source_run_id == version.run_id
        tags = trace.info.tags
        assert tags["slmflow.model_uri"] == "models:/server-tiny@champion" and tags["slmflow.route"] == CHAT, kind
        assert (tags["slmflow.registered_model"], tags["slmflow.model_version"]) == ("server-tiny", "1"), kind
        assert root(trace).attributes["slmflow.duration_s"] > 0, kind

    ok = root(traces[ids["plain"]])
    assert ok.inputs["messages"] == SPAIN and (ok.inputs["temperature"], ok.inputs["seed"]) == (0, 3)
    assert ok.outputs["choices"] == [{"text": MADRID, "finish_reason": "stop"}]
    assert ok.outputs["usage"]["completion_tokens"] == plain.parse().usage.completion_tokens
    assert ok.attributes["slmflow.time_to_first_token_s"] > 0
    assert traces[ids["plain"]].info.tags["slmflow.status"] == "ok" and traces[ids["plain"]].info.state.value == "OK"

    assert [c["text"] for c in root(traces[ids["n=2"]]).outputs["choices"]] == [MADRID, MADRID]
    assert root(traces[ids["stream"]]).outputs["choices"] == [{"text": MADRID, "finish_reason": "stop"}]

    refused = traces[ids["400"]]
    assert refused.info.tags["slmflow.status"] == "error_400" and refused.info.state.value == "ERROR"
    error = bad.json()["error"]
    assert bad.status_code == 400 and root(refused).attributes["slmflow.outcome"] == (error["code"] or error["type"])

    left = traces[ids["left"]]
    assert left.info.tags["slmflow.status"] == "cancelled"
    partial = root(left).outputs["choices"][0]
    assert partial["finish_reason"] is None and partial["text"], partial  # what was sent before the client left
    assert traced.metric("slmflow_traces_recorded_total") >= len(ids)
    assert traced.metric("slmflow_traces_dropped_total") == 0


def test_the_server_logs_serving_metrics_as_time_series_in_a_run(traced: LiveServer) -> None:
    for _ in range(3):
        traced.client().chat.completions.create(model="tiny", messages=SPAIN)
    monitor = traced.state.monitor
    assert wait_until(lambda: monitor.run_id is not None, timeout=30)
    client = mlflow.MlflowClient()

    def series() -> list[Any]:
        return client.get_metric_history(monitor.run_id, "requests")

    assert wait_until(lambda: len(series()) >= 2 and sum(m.value for m in series()) >= 3, timeout=60)
    run = client.get_run(monitor.run_id)
    assert run.info.run_name == "serve-tiny" and run.data.params["model_uri"] == "models:/server-tiny@champion"
    for key in ("generated_tokens_per_s", "queue_depth", "batch_size", "errors", "ttft_p50_s", "ttft_p95_s"):
        assert key in run.data.metrics, key
    assert run.info.experiment_id == mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def test_metadata_only_traces_keep_no_prompt_or_answer(onnx_model_path: Path) -> None:
    secret = "What is the capital of Spain? My account number is 1234-5678."
    settings = ServerSettings(model_uri=str(onnx_model_path), trace_content=False, trace_experiment=PRIVATE)
    for live in serve(settings):
        response = live.client().chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": secret}]
        )
        answer = response.parse().choices[0].message.content
        request_id = response.headers["x-request-id"]
        trace = traces_by_request(PRIVATE, [request_id])[request_id]
    stored = json.dumps(trace.to_dict())
    assert "1234-5678" not in stored and "account number" not in stored
    assert answer and answer not in stored
    span = root(trace)
    assert span.inputs["message_count"] == 1 and span.outputs["choices"] == [{"finish_reason": "stop"}]
    assert span.outputs["usage"]["completion_tokens"] > 0 and trace.info.tags["slmflow.status"] == "ok"


def test_an_unreachable_tracking_server_never_fails_a_request(onnx_model_path: Path, tmp_path: Path) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": dead,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
    }
    log = (tmp_path / "serve.log").open("w")
    command = [str(Path(sys.executable).parent / "slmflow"), "serve", str(onnx_model_path), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: healthy(url) or process.poll() is not None, timeout=180), "no server"
        for _ in range(5):
            answer = httpx.post(f"{url}{CHAT}", json={"messages": SPAIN}, timeout=60)
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == MADRID

        def dropped() -> float:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            return float(
                next(line.split()[-1] for line in text.splitlines() if line.startswith("slmflow_traces_dropped_total"))
            )

        assert wait_until(lambda: dropped() >= 5, timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=60)
    output = (tmp_path / "serve.log").read_text()
    assert output.count("request traces are being dropped") == 1, output[-3000:]  # logged once, not per request
    assert "Traceback" not in output


def test_served_requests_become_an_eval_set_for_the_next_version(traced: LiveServer, tmp_path: Path) -> None:
    client = traced.client()
    questions = [f"What is the capital of {country}?" for country in ("Spain", "France", "Japan")]
    served = [
        client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": question}], temperature=0
        ).headers["x-request-id"]
        for question in questions
    ]
    # Answers cut by max_tokens or a stop sequence, one sampled with a seed, one without.
    settings = {
        "What is the capital of Italy?": {"max_tokens": 3, "temperature": 0},
        "What is the capital of Germany?": {"stop": ["capital"], "temperature": 0},
        "What is the capital of Peru?": {"temperature": 1.0, "top_p": 0.9, "seed": 11, "max_tokens": 5},
        "What is the capital of Chile?": {"temperature": 1.0, "max_tokens": 40},
    }
    for question, params in settings.items():
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": question}], **params
        )
        served.append(raw.headers["x-request-id"])
        assert raw.parse().choices[0].finish_reason == ("length" if question.endswith(("Italy?", "Peru?")) else "stop")
    traces_by_request(EXPERIMENT, served)
    output = tmp_path / "served.jsonl"
    run = CliRunner().invoke(main, ["traces", "export", EXPERIMENT, "--output", str(output), "--json"])
    assert run.exit_code == 0, run.output
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert {row["messages"][-1]["content"] for row in rows} >= set(questions) | set(settings)
    assert all(row["expected"] and row["model_version"] == "1" for row in rows)
    replayed = {row["messages"][-1]["content"]: row.get("params") for row in rows}
    assert replayed["What is the capital of Italy?"] == {"max_tokens": 3, "temperature": 0}
    assert replayed["What is the capital of Germany?"] == {"stop": ["capital"], "temperature": 0}
    assert replayed["What is the capital of Peru?"] == settings["What is the capital of Peru?"]
    assert replayed["What is the capital of Chile?"] == {"max_tokens": 40}  # an unseeded sample: replayed greedily
    # Replaying the served traffic on the same version reproduces every greedy or seeded answer, cut
    # ones included (each row generated with its own settings); the unseeded sample is left out.
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(row) + "\n" for row in rows if "Chile" not in row["messages"][-1]["content"]))
    run = CliRunner().invoke(main, ["eval", "models:/server-tiny@champion", "--data", str(replay), "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.strip().splitlines()[-1])["metrics"]["accuracy"] == 1.0
    refused = CliRunner().invoke(main, ["traces", "export", "no-such-experiment", "--output", str(output)])
    assert refused.exit_code == 1 and "no experiment named 'no-such-experiment'" in refused.stderr


def test_an_answer_cut_by_the_served_models_own_bound_replays_cut_on_another_version(
    onnx_int4: Path, registered_model_uri: str, tmp_path: Path
) -> None:
    """A request that set no max_tokens, cut by the served model's packaged max_tokens (3), replayed
    on a version packaged with none (the evaluation's bound then is 256): its row carries the 3."""
    from slmflow import onnx_genai

    short = tmp_path / "tiny-short"
    onnx_genai.save_model(onnx_int4, short, task="chat", generation_defaults={"max_tokens": 3})
    experiment = "monitoring-tests-short"
    for live in serve(ServerSettings(model_uri=str(short), model_name="tiny", trace_experiment=experiment)):
        raw = live.client().chat.completions.with_raw_response.create(model="tiny", messages=SPAIN, temperature=0)
        answer = raw.parse().choices[0]
        assert answer.finish_reason == "length" and answer.message.content != MADRID, answer
        assert MADRID.startswith(answer.message.content), answer
        traces_by_request(experiment, [raw.headers["x-request-id"]])
    output = tmp_path / "served.jsonl"
    run = CliRunner().invoke(main, ["traces", "export", experiment, "--output", str(output)])
    assert run.exit_code == 0, run.output
    [row] = [json.loads(line) for line in output.read_text().splitlines()]
    assert row["expected"] == answer.message.content and row["params"] == {"max_tokens": 3, "temperature": 0}
    run = CliRunner().invoke(main, ["eval", registered_model_uri, "--data", str(output), "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.strip().splitlines()[-1])["metrics"]["accuracy"] == 1.0


def test_a_zero_sample_rate_traces_nothing_but_still_counts_every_request(onnx_model_path: Path) -> None:
    settings = ServerSettings(
        model_uri=str(onnx_model_path),
        trace_sample_rate=0.0,
        trace_experiment="monitoring-unsampled",
        metrics_interval=0.2,
    )
    for live in serve(settings):
        for _ in range(4):
            assert (
                live.client().chat.completions.create(model="tiny", messages=SPAIN).choices[0].message.content == MADRID
            )
        monitor = live.state.monitor
        client = mlflow.MlflowClient()

        def counted(monitor: Any = monitor, client: Any = client) -> float:
            if monitor.run_id is None:
                return 0
            return sum(m.value for m in client.get_metric_history(monitor.run_id, "requests"))

        assert wait_until(lambda: counted() >= 4, timeout=60)
        assert live.metric("slmflow_traces_recorded_total") == 0
    experiment = mlflow.get_experiment_by_name("monitoring-unsampled")
    assert mlflow.search_traces(locations=[experiment.experiment_id], return_type="list") == []
