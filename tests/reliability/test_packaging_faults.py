"""Faults in packaging: `slmflow package` killed midway, and model folders with broken weights.

Whatever is killed or broken, three things must hold afterwards: no registered version points to an
incomplete model, the tracking store still reads, and the next run says what is wrong in one line.
The kills are real SIGKILLs of a real `slmflow package` process; the point of the kill is made
deterministic by watching its children (conversion) or by a pause injected into its upload (log).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from slmflow.cli import main
from slmflow.errors import SlmflowError
from tests.reliability.conftest import record
from tests.server.conftest import wait_until

BUILDER = "onnxruntime_genai.models.builder"
PAUSED = "PAUSED-MIDWAY-THROUGH-THE-UPLOAD"
# Runs `slmflow package`, but its artifact upload copies the small files, then half of the largest
# one, and stops there until killed: a log killed midway, at its most dangerous point (MLmodel there).
UPLOAD_THEN_STOP = f"""
import sys, time
from pathlib import Path
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

def log_artifacts(self, local_dir, artifact_path=None):
    files = sorted((p for p in Path(local_dir).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for source in files:
        target = Path(self.artifact_dir, artifact_path or "", source.relative_to(local_dir))
        target.parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        if source == files[-1]:
            target.write_bytes(data[: len(data) // 2])
            print("{PAUSED}", file=sys.stderr, flush=True)
            time.sleep(600)
        target.write_bytes(data)

LocalArtifactRepository.log_artifacts = log_artifacts
from slmflow.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An experiment of its own, with its artifacts in a temp folder; subprocesses log into it."""
    import mlflow

    name = "slmflow-reliability-packaging"
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.MlflowClient().create_experiment(name, artifact_location=str(tmp_path_factory.mktemp("artifacts")))
    return name


def cli_env(experiment: str, tmp: Path) -> dict[str, str]:
    tmp.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_EXPERIMENT_ID"}
    return {**env, "MLFLOW_EXPERIMENT_NAME": experiment, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1"}


def slmflow_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "slmflow"), *args]


def assert_registry_sound() -> int:
    """The store reads, and every registered version's model is complete. Returns the versions seen."""
    import mlflow

    from slmflow.onnx_genai import FLAVOR_NAME, check_model_folder

    client = mlflow.MlflowClient()
    client.search_experiments()
    for experiment in client.search_experiments():
        client.search_runs([experiment.experiment_id], max_results=50)
    versions = client.search_model_versions(max_results=1000)
    for version in versions:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
        model = mlflow.models.Model.load(str(local))
        if FLAVOR_NAME in model.flavors:
            check_model_folder(local / model.flavors[FLAVOR_NAME]["model_dir"])
    return len(versions)


def versions_of(name: str) -> list[str]:
    import mlflow

    return [str(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name='{name}'")]


def runs_of(experiment: str) -> list:
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    return mlflow.MlflowClient().search_runs([found.experiment_id], max_results=1000) if found else []


def kill_when(process: subprocess.Popen, ready, timeout: float) -> float:
    """SIGKILL `process` once ready() is true; return how long that took."""
    started = time.monotonic()
    try:
        assert wait_until(lambda: ready() or process.poll() is not None, timeout=timeout, interval=0.05)
        if process.poll() is not None:
            output = process.stderr.read() if process.stderr else ""
            raise AssertionError(
                f"slmflow package ended (exit {process.returncode}) before the kill point: {output[-2000:]}"
            )
    except BaseException:
        process.kill()
        raise
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return time.monotonic() - started


@pytest.mark.timeout(240)
def test_killed_conversion_and_killed_log_leave_no_version_and_the_next_run_works(
    tiny_checkpoint: Path, onnx_int4: Path, experiment: str, tmp_path: Path
) -> None:
    import mlflow

    name = "reliability-killed"
    env = cli_env(experiment, tmp_path / "tmp")

    # 1. Killed during conversion: as soon as the model builder runs.
    process = subprocess.Popen(
        slmflow_command("package", str(tiny_checkpoint), "--name", name, "--alias", "champion", "--json"),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    parent = psutil.Process(process.pid)
    builders: list[psutil.Process] = []
    outputs: list[Path] = []  # each builder's output folder (-o)

    def builder_running() -> bool:
        try:
            found = [(c, c.cmdline()) for c in parent.children(recursive=True)]
        except psutil.Error:
            return False
        builders[:] = [child for child, command in found if BUILDER in " ".join(command)]
        outputs[:] = [Path(command[command.index("-o") + 1]) for _, command in found if BUILDER in " ".join(command)]
        return bool(builders)

    kill_when(process, builder_running, timeout=120)
    killed = time.monotonic()

    def builder_gone() -> bool:
        return all(not b.is_running() or b.status() == psutil.STATUS_ZOMBIE for b in builders)

    assert wait_until(builder_gone, timeout=120)
    orphan_seconds = time.monotonic() - killed
    # Killed with its caller, the builder never finished; orphaned, it would have converted on to
    # the end (minutes on a real model) and written its config last, into a folder nobody cleans up.
    assert not any((output / "genai_config.json").exists() for output in outputs), (
        "the model builder kept converting after its caller was killed"
    )
    assert versions_of(name) == []
    [first_killed] = [r.info.run_id for r in runs_of(experiment) if r.info.status == "RUNNING"]

    # 2. Killed during the log: the model's files half uploaded to the artifact store.
    process = subprocess.Popen(
        [sys.executable, "-c", UPLOAD_THEN_STOP, "package", str(onnx_int4), "--name", name, "--alias", "champion"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[str] = []

    def paused() -> bool:
        line = process.stderr.readline()  # the child prints MLflow warnings, then our marker
        lines.append(line)
        return PAUSED in line or line == ""

    kill_when(process, paused, timeout=120)
    assert any(PAUSED in line for line in lines), "".join(lines[-20:])
    # That second run, before it was killed, reported the first one and ended it as KILLED.
    assert any(f"run {first_killed} (package-onnx) was interrupted" in line for line in lines), "".join(lines[-20:])
    assert mlflow.get_run(first_killed).info.status == "KILLED"
    assert versions_of(name) == []
    sound_versions = assert_registry_sound()

    # The half-logged model is there, unregistered; loading it says what is wrong.
    [second_killed] = [r for r in runs_of(experiment) if r.info.status == "RUNNING"]  # nobody left to end it
    partial = [
        m
        for m in mlflow.search_logged_models(experiment_ids=[second_killed.info.experiment_id], output_format="list")
        if m.source_run_id == second_killed.info.run_id
    ]
    assert partial, "the killed log left no logged model to inspect"
    with pytest.raises(SlmflowError, match="truncated"):
        mlflow.pyfunc.load_model(f"models:/{partial[0].model_id}")

    # 3. The next run packages and registers a complete model.
    result = subprocess.run(
        slmflow_command("package", str(onnx_int4), "--name", name, "--alias", "champion", "--json"),
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert versions_of(name) == ["1"]
    # ... and reports the interrupted log, which it ends as KILLED.
    assert f"run {second_killed.info.run_id} (package-onnx) was interrupted" in result.stderr, result.stderr[-2000:]
    assert mlflow.get_run(second_killed.info.run_id).info.status == "KILLED"
    assert [r for r in runs_of(experiment) if r.info.status == "RUNNING"] == []
    assert assert_registry_sound() == sound_versions + 1
    record(
        "packaging_kills",
        kills=2,
        builder_gone_after_kill_seconds=round(orphan_seconds, 2),
        versions_registered_by_killed_runs=0,
        interrupted_runs_reported_and_ended_by_the_next_run=2,
        next_run_version=1,
    )


def damaged(source: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / damage
    shutil.copytree(source, folder)
    weights = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    if damage == "truncated-weights":
        os.truncate(weights, weights.stat().st_size // 3)
    elif damage == "missing-weights":
        weights.unlink()
    elif damage == "truncated-graph":
        graph = folder / "model.onnx"
        os.truncate(graph, graph.stat().st_size // 2)
    elif damage == "missing-graph":
        (folder / "model.onnx").unlink()
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            "truncated-weights",
            r"model\.onnx\.data has [\d,]+ bytes, but model\.onnx reads [\d,]+; the file is truncated",
        ),
        ("missing-weights", r"model\.onnx\.data \(weights of model\.onnx\) is missing"),
        ("truncated-graph", r"model\.onnx does not parse"),
        ("missing-graph", r"model\.onnx is missing"),
    ],
)
def test_a_broken_onnx_folder_is_named_before_any_run(
    onnx_int4: Path, tmp_path: Path, damage: str, message: str
) -> None:
    import mlflow

    folder = damaged(onnx_int4, tmp_path, damage)
    name = f"reliability-{damage}"
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    run = CliRunner().invoke(main, ["package", str(folder), "--name", name, "--json"])
    assert run.exit_code == 1
    first_line = run.stderr.strip().splitlines()[-1]
    assert first_line.startswith("error: the model in") and re.search(message, first_line), run.stderr
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before
    assert versions_of(name) == []
    record("packaging_damaged_folders", **{damage: first_line.split(str(folder))[-1].strip()})


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_broken_checkpoint_is_named_before_any_run(tiny_checkpoint: Path, tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size - 1000)
    else:
        weights.unlink()
    run = CliRunner().invoke(main, ["package", str(folder), "--name", f"reliability-checkpoint-{damage}", "--json"])
    assert run.exit_code == 1
    expected = "the file is truncated" if damage == "truncated" else "no *.safetensors or *.bin file"
    assert expected in run.stderr, run.stderr


def test_a_registered_model_whose_weights_were_cut_afterwards_fails_to_load_clearly(
    onnx_int4: Path, tmp_path: Path
) -> None:
    """Storage damaged after registration: serving it names the file instead of ONNX Runtime's error."""
    from slmflow import onnx_genai
    from slmflow.server import ServerSettings
    from slmflow.server.backend import load_backend

    path = tmp_path / "model"
    onnx_genai.save_model(onnx_int4, path)
    os.truncate(path / "model" / "model.onnx.data", 1000)
    with pytest.raises(SlmflowError, match=r"model\.onnx\.data has 1,000 bytes.*truncated"):
        load_backend(ServerSettings(model_uri=str(path)))
