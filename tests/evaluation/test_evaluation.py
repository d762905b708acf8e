"""Evaluation, route parity, quantization cost and gated promotion, on real registered models."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from slmflow.checkpoints import task
from slmflow.cli import main
from slmflow.errors import SlmflowError
from slmflow.evaluation import EVAL_RUN_TAG
from slmflow.evaluation.data import load_eval_set
from slmflow.evaluation.promotion import Gate


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def fp32_chat(tiny_checkpoint: Path, packaged: dict) -> str:
    run = invoke("package", str(tiny_checkpoint), "--precision", "fp32", "--name", "tiny-onnx-chat", "--json")
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)["version"]


def test_the_builtin_set_is_the_held_out_task() -> None:
    builtin = load_eval_set("builtin:capitals")
    assert builtin.rows == task.eval_rows()
    trained = {m[-2]["content"] for m in task.training_conversations()}
    assert not trained & {r["messages"][0]["content"] for r in builtin.rows}, "eval phrasings leak into training"


def test_csv_and_jsonl_files_load_and_bad_rows_are_named(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('prompt,expected,pattern\n"<|user|>\nhi<|end|>\n<|assistant|>\n",Hello,^H\n')
    assert load_eval_set(str(tmp_path / "a.csv")).rows == [
        {"prompt": "<|user|>\nhi<|end|>\n<|assistant|>\n", "expected": "Hello", "pattern": "^H"}
    ]
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n{"expected": "no input"}\n')
    with pytest.raises(SlmflowError, match="row 2 needs exactly one of"):
        load_eval_set(str(tmp_path / "b.jsonl"))
    with pytest.raises(SlmflowError, match="cannot read"):
        load_eval_set(str(tmp_path / "missing.jsonl"))
    # A row's own generation settings (as `slmflow traces export` writes them) are kept, and checked.
    settings = {"max_tokens": 3, "stop": ["."], "temperature": 0.7, "seed": 5}
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "x", "params": settings}) + "\n")
    assert load_eval_set(str(tmp_path / "c.jsonl")).rows == [{"prompt": "x", "params": settings}]
    for params, error in (
        ({"max_tokens": 0}, "row 2: params: max_tokens must be"),
        ({"n": 2}, "row 2: 'params' must be an object of max_tokens, stop"),
        ("max_tokens=3", "row 2: 'params' must be an object of"),
    ):
        rows = [{"prompt": "x"}, {"prompt": "y", "params": params}]
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(SlmflowError, match=error):
            load_eval_set(str(tmp_path / "d.jsonl"))


def test_gates_parse_and_report_the_measured_value() -> None:
    gate = Gate.parse("accuracy >= 0.9")
    assert gate.check({"accuracy": 0.95}) is None
    assert gate.check({"accuracy": 0.5}) == "gate accuracy>=0.9 failed: accuracy = 0.5"
    assert "no metric 'bleu'" in Gate.parse("bleu>0.1").check({"accuracy": 1.0})
    assert Gate.parse("mean_latency_s<=2").no_worse(1.0, 1.5)
    with pytest.raises(SlmflowError, match="cannot read gate"):
        Gate.parse("accuracy is great")


def test_eval_logs_metrics_table_and_tags_the_version(packaged: dict) -> None:
    run = invoke("eval", "models:/tiny-onnx-chat@champion", "--json")
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    metrics = report["metrics"]
    assert 0.9 <= metrics["accuracy"] <= 1.0 and metrics["contains"] >= metrics["accuracy"]
    assert metrics["tokens_per_s"] > 0 and metrics["mean_latency_s"] > 0
    version = MlflowClient().get_model_version_by_alias("tiny-onnx-chat", "champion")
    assert version.tags[EVAL_RUN_TAG] == report["run_id"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(report["run_id"])}
    assert {"eval_table.json", "eval_summary.json"} <= artifacts
    logged = MlflowClient().get_run(report["run_id"]).data.metrics
    assert logged["accuracy"] == metrics["accuracy"] and "exact_match/mean" in logged


def test_transformers_and_onnx_fp32_give_identical_greedy_answers(packaged: dict, fp32_chat: str) -> None:
    run = invoke("compare", "models:/tiny-transformers-chat@champion", f"models:/tiny-onnx-chat/{fp32_chat}", "--json")
    assert run.exit_code == 0, run.output
    metrics = json.loads(run.stdout)["metrics"]
    assert metrics["identical_share"] >= 0.95
    assert metrics["accuracy_a"] == pytest.approx(metrics["accuracy_b"], abs=0.05)
    assert "diff.md" in {a.path for a in MlflowClient().list_artifacts(json.loads(run.stdout)["run_id"])}


def test_perplexity_measures_the_cost_of_int4(packaged: dict, fp32_chat: str) -> None:
    results = {}
    for key, uri in {
        "int4": f"models:/tiny-onnx-chat/{packaged['onnx-chat']['version']}",
        "fp32": f"models:/tiny-onnx-chat/{fp32_chat}",
        "torch": "models:/tiny-transformers-chat@champion",
    }.items():
        run = invoke("eval", uri, "--perplexity", "builtin:capitals", "--json")
        assert run.exit_code == 0, run.output
        results[key] = json.loads(run.stdout)["metrics"]["perplexity"]
    assert results["fp32"] == pytest.approx(results["torch"], rel=1e-3), "the fp32 export changed the model"
    assert 1.0 < results["fp32"] < 5.0, "the fixture should predict its held-out transcripts well"
    assert results["int4"] != results["fp32"] and results["int4"] < 2 * results["fp32"]


def test_a_failing_gate_leaves_the_alias_where_it_was(packaged: dict, fp32_chat: str) -> None:
    before = MlflowClient().get_model_version_by_alias("tiny-onnx-chat", "champion").version
    run = invoke("promote", "tiny-onnx-chat", fp32_chat, "--alias", "champion", "--gate", "accuracy>=1.01")
    assert run.exit_code == 1
    assert "gate accuracy>=1.01 failed: accuracy = " in run.stderr
    assert MlflowClient().get_model_version_by_alias("tiny-onnx-chat", "champion").version == before


def test_a_passing_gate_moves_the_alias_and_reuses_the_evaluation(packaged: dict, fp32_chat: str) -> None:
    first = invoke("promote", "tiny-onnx-chat", fp32_chat, "--alias", "staging", "--gate", "accuracy>=0.9", "--json")
    assert first.exit_code == 0, first.output
    assert str(MlflowClient().get_model_version_by_alias("tiny-onnx-chat", "staging").version) == fp32_chat
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    again = invoke("promote", "tiny-onnx-chat", fp32_chat, "--alias", "staging", "--gate", "accuracy>=0.9", "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["eval_run_id"] == json.loads(first.stdout)["eval_run_id"]
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before


def test_no_worse_than_current_blocks_a_regression(tiny_checkpoint: Path, packaged: dict) -> None:
    worse = json.loads(
        invoke("package", str(tiny_checkpoint), "--max-tokens", "2", "--name", "tiny-onnx-chat", "--json").stdout
    )
    before = MlflowClient().get_model_version_by_alias("tiny-onnx-chat", "champion").version
    run = invoke("promote", "tiny-onnx-chat", worse["version"], "--no-worse-than-current", "--gate", "accuracy>=0")
    assert run.exit_code == 1
    assert f"is worse than the current version {before}'s" in run.stderr
    assert MlflowClient().get_model_version_by_alias("tiny-onnx-chat", "champion").version == before
