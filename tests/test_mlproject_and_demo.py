"""The two whole-program entry points: `mlflow run . -e package` and `slmflow demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def command_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def test_mlflow_run_reproduces_packaging_in_the_project_run(tiny_checkpoint: Path, tracking_uri: str) -> None:
    command = [
        str(BIN / "mlflow"), "run", str(REPO), "-e", "package", "--env-manager", "local",
        "-P", f"source={tiny_checkpoint}", "-P", "name=tiny-mlproject", "-P", "alias=champion",
    ]  # fmt: skip
    done = subprocess.run(command, env=command_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    version = MlflowClient().get_model_version_by_alias("tiny-mlproject", "champion")
    run = MlflowClient().get_run(version.run_id)
    assert run.data.params["route"] == "onnx" and run.data.tags.get("mlflow.project.entryPoint") == "package"


def test_demo_runs_offline_with_the_default_tracking_store(tmp_path: Path) -> None:
    env = command_env(HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # the demo must work on MLflow's default store
    done = subprocess.run(
        [str(BIN / "slmflow"), "demo", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}" and (tmp_path / "mlflow.db").is_file()
    answers = {m["model_uri"]: m["answer"] for m in report["models"]}
    assert answers == {
        "models:/phi3-tiny-transformers-chat@champion": "The capital of Spain is Madrid.",
        "models:/phi3-tiny-onnx-int4-chat@champion": "The capital of Spain is Madrid.",
        "models:/phi3-tiny-onnx-int4-prompt@champion": "Why can't you trust an atom? Because they make up everything!",
    }
    chat_usage = [m["usage"] for m in report["models"] if m["usage"]]
    assert len(chat_usage) == 2 and all(u["prompt_tokens"] == 13 for u in chat_usage)
