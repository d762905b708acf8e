"""Team mode: every command through a real `mlflow server` (PostgreSQL store, proxied artifacts, basic
auth) started by `slmflow server` on loopback.

The commands run as a user would run them: `slmflow` subprocesses whose only link to the server is
MLFLOW_TRACKING_URI and the credentials. The artifacts folder belongs to the server; the clients
never see it. Cuts and kills mid-upload are made deterministic by a TCP relay between client and
server that acts when it sees the model's upload request go by.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.conftest import free_port
from tests.server.conftest import MADRID, SPAIN, healthy, wait_until

pytestmark = pytest.mark.timeout(600)
SLMFLOW = str(Path(sys.executable).parent / "slmflow")


@dataclass(frozen=True)
class Team:
    url: str
    folder: Path
    password: str
    postgres: Path

    def env(self, user: str = "admin", password: str | None = None, url: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        return env | {
            "MLFLOW_TRACKING_URI": url or self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.password if password is None else password,
            "MLFLOW_EXPERIMENT_NAME": "team",
        }

    def run(self, *args: str, timeout: float = 300, **env_args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SLMFLOW, *args], env=self.env(**env_args), capture_output=True, text=True, timeout=timeout, check=False
        )

    def client(self):  # -> MlflowClient talking to the team server as admin
        import mlflow

        os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.password})
        return mlflow.MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    def sql(self, query: str) -> list[tuple]:
        """Ask the server's PostgreSQL directly: proof of where things are stored."""
        import psycopg

        with psycopg.connect(host=str(self.postgres), port=5432, user="slmflow", dbname="mlflow") as db:
            return db.execute(query).fetchall()


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    from slmflow import teamserver

    folder = tmp_path_factory.mktemp("team")
    port = free_port()
    log = (folder.parent / "slmflow-server.out").open("w")
    process = subprocess.Popen(
        [SLMFLOW, "server", "--folder", str(folder), "--port", str(port), "--json"],
        stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()  # one JSON line once the server answers, or EOF if it failed
    assert line, (folder.parent / "slmflow-server.out").read_text()[-3000:]
    about = json.loads(line)
    try:
        yield Team(
            url=about["url"],
            folder=folder,
            password=Path(about["password_file"]).read_text().strip(),
            postgres=teamserver.postgres_folder(folder),
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        assert process.returncode == 0, (folder.parent / "slmflow-server.out").read_text()[-3000:]
        # Stopped means stopped: no mlflow server and no PostgreSQL left running on that folder.
        assert not (teamserver.postgres_folder(folder) / "postmaster.pid").exists()
        teamserver.remove(folder)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key, None)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_the_whole_path_through_the_team_server(team: Team, onnx_int4: Path, tmp_path: Path) -> None:
    name = "team-tiny"
    # package (ONNX route) -> a version whose files went through the proxy into the server's folder
    result = team.run("package", str(onnx_int4), "--name", name, "--alias", "candidate", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    packaged = json.loads(result.stdout)  # nothing but the JSON on stdout, even with a tracking server
    assert packaged["version"] == "1"
    client = team.client()
    version = client.get_model_version(name, "1")
    model_id = packaged["model_uri"].removeprefix("models:/")
    assert list(team.folder.joinpath("artifacts").rglob(f"{model_id}/artifacts/MLmodel")), "not in the proxied store"
    assert client.get_logged_model(model_id).artifact_location.startswith("mlflow-artifacts:")
    assert (name,) in team.sql("SELECT name FROM registered_models")  # the registry is PostgreSQL
    assert version.aliases == ["candidate"]

    # eval, then promote on that evaluation, then compare the two aliases
    result = team.run("eval", f"models:/{name}@candidate", "--data", "builtin:capitals", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["metrics"]["accuracy"] == 1.0
    result = team.run("promote", name, "1", "--alias", "champion", "--gate", "accuracy>=0.9", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["promoted"] is True, result.stderr[-3000:]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    result = team.run("compare", f"models:/{name}@candidate", f"models:/{name}@champion", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    result = team.run("alias", name, "stable", "1")
    assert result.returncode == 0 and client.get_model_version_by_alias(name, "stable").version == "1"

    # chat and serve, loading through the proxy; the served request is traced into the team server
    result = team.run("chat", f"models:/{name}@champion", "--message", SPAIN[0]["content"])
    assert result.returncode == 0 and MADRID in result.stdout, result.stderr[-3000:]
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [SLMFLOW, "serve", f"models:/{name}@champion", "--port", str(port), "--metrics-interval", "1"],
        env=team.env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert wait_until(lambda: healthy(f"http://127.0.0.1:{port}") or server.poll() is not None, timeout=180)
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        ai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = ai.chat.completions.with_raw_response.create(model=name, messages=SPAIN, temperature=0)
        assert answer.parse().choices[0].message.content == MADRID
        request_id = answer.headers["x-request-id"]
    finally:
        server.terminate()
        server.wait(timeout=120)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    [trace] = [
        t
        for t in traced(team, f"slmflow-serve-{name}")
        if t.info.trace_metadata.get("slmflow.request_id") == request_id
    ]
    assert trace.info.tags["slmflow.model_version"] == "1" and trace.info.tags["slmflow.status"] == "ok"
    assert trace.info.trace_metadata["mlflow.modelId"] == model_id

    # batch on Spark: the driver loads through the proxy, the executors get the model from the driver
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": SPAIN}) + "\n" for _ in range(4)))
    output = tmp_path / "answers.parquet"
    result = team.run(
        "batch", f"models:/{name}@champion", "--input", str(prompts), "--output", str(output),
        "--master", "local[2]", "--params", '{"temperature": 0}', "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    batch = json.loads(result.stdout.strip().splitlines()[-1])
    assert (batch["rows"], batch["error_rows"]) == (4, 0)
    assert client.get_run(batch["run_id"]).info.status == "FINISHED"


# Packages through the library, printing every progress update as a JSON line (the CLI's bar is
# drawn only on a terminal).
PACKAGE_WITH_PROGRESS = """
import json, sys
from slmflow.packaging import PackageSpec, package
result = package(PackageSpec(source=sys.argv[1]), lambda *update: print(json.dumps(update), flush=True))
print(json.dumps({"size": result.metrics["model_size_bytes"]}))
"""


def test_packaging_reports_the_upload_through_the_server(team: Team, onnx_int4: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PACKAGE_WITH_PROGRESS, str(onnx_int4)],
        env=team.env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # (MLflow prints its run links to stdout too, outside the CLI)
    *updates, last = [json.loads(line) for line in result.stdout.splitlines() if line.startswith(("[", "{"))]
    upload = [(done, total) for message, done, total in updates if message == f"uploading the model to {team.url}"]
    size_mb = max(1, int(last["size"]) // 2**20)
    assert upload[0] == (0, size_mb) and upload[-1] == (size_mb, size_mb), upload
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(upload)), upload  # it only moves forward


def test_the_transformers_route_through_the_team_server(team: Team, tiny_checkpoint: Path) -> None:
    result = team.run("package", str(tiny_checkpoint), "--route", "transformers", "--name", "team-tiny-tf", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    result = team.run("chat", "models:/team-tiny-tf/1", "--message", SPAIN[0]["content"], "--max-tokens", "16")
    assert result.returncode == 0 and "Madrid" in result.stdout, result.stderr[-3000:]


def test_refusals_name_the_user_the_permission_and_the_model(team: Team, onnx_int4: Path) -> None:
    import mlflow.server

    readable, private = "team-readable", "team-private"
    for name in (readable, private):
        assert team.run("package", str(onnx_int4), "--name", name, "--no-quality").returncode == 0
    team.client()  # the admin's credentials in this process's environment
    auth = mlflow.server.get_app_client("basic-auth", tracking_uri=team.url)
    auth.create_user("bob", "bob-password-123")
    auth.grant_user_permission("bob", "registered_model", private, "DENY")
    bob = {"user": "bob", "password": "bob-password-123"}

    # READ by default: bob may load the readable model, not move its aliases
    result = team.run("chat", f"models:/{readable}/1", "--message", SPAIN[0]["content"], **bob)
    assert result.returncode == 0 and MADRID in result.stdout, result.stderr[-3000:]
    line = one_line_error(team.run("alias", readable, "champion", "1", **bob))
    assert f"user 'bob' lacks EDIT permission on registered model '{readable}'" in line, line
    line = one_line_error(team.run("promote", readable, "1", "--gate", "accuracy>=0", **bob))
    assert "user 'bob' lacks EDIT permission on experiment 'team'" in line, line  # its eval run comes first
    line = one_line_error(team.run("chat", f"models:/{private}/1", "--message", "hi", **bob))
    assert f"user 'bob' lacks READ permission on registered model '{private}'" in line, line
    line = one_line_error(team.run("package", str(onnx_int4), "--name", readable, "--no-quality", **bob))
    assert "user 'bob' lacks EDIT permission on experiment 'team'" in line, line
    line = one_line_error(team.run("alias", readable, "champion", "1", password="wrong"))
    assert "refused the credentials of user 'admin'" in line, line
    client = team.client()
    assert (
        client.get_registered_model(readable).aliases == {}
        and len(client.search_model_versions(f"name = '{readable}'")) == 1
    )


class Relay:
    """A TCP relay to the team server that acts on the first request whose line contains `marker`:
    "hold" stops forwarding (the request hangs, as if mid-upload), "cut" closes every connection and
    refuses new ones (the server went away)."""

    def __init__(self, target_port: int, marker: bytes, action: str) -> None:
        self.target_port, self.marker, self.action = target_port, marker, action
        self.seen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, upstream: bool) -> None:
        tail = b""
        try:
            while data := source.recv(65536):
                if upstream and not self.seen.is_set() and self.marker in tail + data:
                    self.seen.set()
                    if self.action == "cut":
                        self.close()
                    return  # "hold": this request never reaches the server
                tail = data[-len(self.marker) :]
                target.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() blocked in the other thread (close alone does not)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.mark.parametrize("fault", ["client killed", "server gone"])
def test_an_upload_cut_midway_registers_nothing_and_the_next_run_reports_it(
    team: Team, onnx_int4: Path, fault: str
) -> None:
    from mlflow.entities import LoggedModelStatus

    name = f"team-cut-{fault.split()[0]}"
    client = team.client()
    port = int(team.url.rsplit(":", 1)[1])
    relay = Relay(port, b"PUT /api/2.0/mlflow-artifacts/artifacts/", "hold" if fault == "client killed" else "cut")
    env = team.env(url=relay.url) | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    process = subprocess.Popen(
        [SLMFLOW, "package", str(onnx_int4), "--name", name, "--no-quality"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: relay.seen.is_set() or process.poll() is not None, timeout=300)
        assert relay.seen.is_set(), process.communicate()[1][-3000:]
        if fault == "client killed":
            process.kill()
        _, stderr = process.communicate(timeout=120)
    finally:
        relay.close()
    if fault == "server gone":
        line = one_line_error(subprocess.CompletedProcess([], process.returncode, "", stderr))
        assert f"cannot reach the tracking server at {relay.url}: connection" in line, line
    [cut] = list(client.search_runs([experiment_id(client)], "attributes.status = 'RUNNING'"))
    assert client.search_model_versions(f"name = '{name}'") == []

    result = team.run("package", str(onnx_int4), "--name", name, "--no-quality", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run {cut.info.run_id} (package-onnx) was interrupted" in result.stderr, result.stderr[-3000:]
    assert client.get_run(cut.info.run_id).info.status == "KILLED"
    unfinished = client.search_logged_models([experiment_id(client)], f"source_run_id = '{cut.info.run_id}'")
    assert unfinished and all(m.status == LoggedModelStatus.FAILED for m in unfinished)
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]


def experiment_id(client) -> str:
    return client.get_experiment_by_name("team").experiment_id


def traced(team: Team, experiment: str) -> list:
    # The client's own search, not mlflow.search_traces: that one reads the process's tracking URI,
    # and mlflow.set_tracking_uri also rewrites MLFLOW_TRACKING_URI in os.environ, so pointing it here
    # and back would leave every later user of the session's store (the in-process servers' monitors
    # included) talking to this server after it stopped.
    client = team.client()
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} on the team server"
    return list(client.search_traces(locations=[found.experiment_id], max_results=500))
