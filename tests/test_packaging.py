"""`slmflow package` / `slmflow alias`: runs, params, metrics, registry, and every bad-input path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from slmflow.cli import main
from slmflow.onnx_genai.schema import CHAT_EXAMPLE, PROMPT_EXAMPLE

MADRID = "The capital of Spain is Madrid."


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def run_count() -> int:
    return len(mlflow.search_runs(search_all_experiments=True, output_format="list"))


def test_json_output_names_run_uri_and_version(packaged: dict) -> None:
    for key, result in packaged.items():
        assert set(result) == {"run_id", "model_uri", "registered_name", "version", "quality"}
        # The ONNX route measures what the conversion cost; the transformers route converts nothing.
        assert (result["quality"] is None) == (key == "transformers-chat")
        assert result["registered_name"] == f"tiny-{key}"
        assert result["model_uri"].startswith("models:/")
        alias = MlflowClient().get_model_version_by_alias(result["registered_name"], "champion")
        assert str(alias.version) == result["version"]


def test_onnx_run_records_params_and_metrics(packaged: dict, tiny_checkpoint: Path) -> None:
    run = MlflowClient().get_run(packaged["onnx-chat"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["source"] == str(tiny_checkpoint)
    assert run.data.params["route"] == "onnx" and run.data.params["precision"] == "int8"  # the default
    assert run.data.params["quantization"] == "builder defaults" and run.data.params["prefill_graph"] == "True"
    assert run.data.params["task"] == "chat" and run.data.params["architecture"] == "Phi3ForCausalLM"
    for metric in ("conversion_seconds", "model_size_bytes", "load_seconds", "quality_seconds"):
        assert run.data.metrics[metric] > 0
    quality = {k: v for k, v in run.data.metrics.items() if k.startswith("quality.")}
    assert set(quality) == {
        "quality.perplexity_source",
        "quality.perplexity",
        "quality.perplexity_increase_pct",
        "quality.top1_agreement",
        "quality.greedy_agreement",
        # int8 builds read prompts with a prefill graph: the builder's graph is measured too
        "quality.perplexity_decode_graph",
        "quality.decode_graph_increase_pct",
    }
    assert quality["quality.perplexity"] > 1 and quality["quality.perplexity_source"] > 1
    assert quality["quality.perplexity_increase_pct"] == pytest.approx(
        100 * (quality["quality.perplexity"] / quality["quality.perplexity_source"] - 1)
    )
    assert 0 <= quality["quality.greedy_agreement"] <= 1 and 0 < quality["quality.top1_agreement"] <= 1
    assert packaged["onnx-chat"]["quality"]["perplexity"] == quality["quality.perplexity"]
    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/quality.json")
    assert len(report["answers"]) == report["prompts"] == 20


@pytest.mark.parametrize("key", ["onnx-chat", "transformers-chat"])
def test_chat_models_answer_the_tutorial_input_from_the_registry(packaged: dict, key: str) -> None:
    model = mlflow.pyfunc.load_model(f"models:/tiny-{key}@champion")
    response = model.predict(CHAT_EXAMPLE)
    assert response[0]["choices"][0]["message"]["content"] == MADRID
    assert response[0]["usage"]["prompt_tokens"] == 13


def test_prompt_model_answers_the_tutorial_prompt_from_the_registry(packaged: dict) -> None:
    model = mlflow.pyfunc.load_model("models:/tiny-onnx-prompt@champion")
    assert model.predict(PROMPT_EXAMPLE) == ["Why can't you trust an atom? Because they make up everything!"]


def test_an_onnx_genai_folder_is_packaged_as_is(onnx_int4: Path) -> None:
    run = invoke("package", str(onnx_int4), "--json")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    params = MlflowClient().get_run(result["run_id"]).data.params
    assert params["source_kind"] == "onnx" and params["precision"] == "as-is"
    assert result["version"] is None
    answer = mlflow.pyfunc.load_model(result["model_uri"]).predict(CHAT_EXAMPLE)
    assert answer[0]["choices"][0]["message"]["content"] == MADRID


def test_generation_defaults_are_logged_and_applied(tiny_checkpoint: Path) -> None:
    run = invoke("package", str(tiny_checkpoint), "--max-tokens", "3", "--json")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert MlflowClient().get_run(result["run_id"]).data.params["generation.max_tokens"] == "3"
    answer = mlflow.pyfunc.load_model(result["model_uri"]).predict(CHAT_EXAMPLE)
    assert answer[0]["choices"][0]["finish_reason"] == "length"


def test_alias_command_moves_an_alias(packaged: dict, onnx_int4: Path) -> None:
    second = json.loads(invoke("package", str(onnx_int4), "--name", "tiny-onnx-chat", "--json").stdout)
    assert second["version"] != packaged["onnx-chat"]["version"]
    assert invoke("alias", "tiny-onnx-chat", "champion", second["version"]).exit_code == 0
    assert str(MlflowClient().get_model_version_by_alias("tiny-onnx-chat", "champion").version) == second["version"]
    assert invoke("alias", "tiny-onnx-chat", "champion", packaged["onnx-chat"]["version"]).exit_code == 0
    champion = MlflowClient().get_model_version_by_alias("tiny-onnx-chat", "champion")
    assert str(champion.version) == packaged["onnx-chat"]["version"]


def assert_one_line_error(run, *fragments: str) -> None:
    assert run.exit_code == 1, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in run.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["/no/such/folder", "--name", "never-registered"], ["not found"]),
        (["{ckpt}", "--route", "gguf", "--name", "never-registered"], ["unknown route", "gguf"]),
        (["{ckpt}", "--task", "summarize", "--name", "never-registered"], ["unknown task"]),
        (["{ckpt}", "--precision", "int3", "--name", "never-registered"], ["unknown precision"]),
        (["{ckpt}", "--precision", "fp16", "--name", "never-registered"], ["fp16", "cuda"]),
        (["{ckpt}", "--route", "transformers", "--task", "prompt", "--name", "never-registered"], ["chat"]),
        (["{ckpt}", "--alias", "champion"], ["--alias needs --name"]),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_run(
    tiny_checkpoint: Path, args: list[str], fragments: list[str]
) -> None:
    before = run_count()
    assert_one_line_error(invoke("package", *(a.format(ckpt=tiny_checkpoint) for a in args)), *fragments)
    assert run_count() == before
    assert not MlflowClient().search_model_versions("name='never-registered'")


def test_a_folder_that_is_no_model_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(invoke("package", str(tmp_path)), "neither a Hugging Face checkpoint", "genai_config.json")
    assert_one_line_error(invoke("package", str(tmp_path / "notes.txt")), "is a file, but not a GGUF file")


def test_an_unreachable_hub_id_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(invoke("package", "microsoft/Phi-3-mini-4k-instruct"), "not in the local Hugging Face cache")


def test_a_failed_conversion_marks_the_run_failed_and_registers_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    # Complete, but with a dtype nothing can read: it passes the pre-run weight check, fails the builder.
    # (A truncated file is now refused before any run starts: tests/reliability/test_packaging_faults.py.)
    data = weights.read_bytes()
    weights.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"Q99"', 1))
    run = invoke("package", str(broken), "--name", "tiny-broken", "--alias", "champion")
    assert_one_line_error(run, "model builder failed")
    failed = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"params.source = '{broken}'", output_format="list"
    )
    assert [r.info.status for r in failed] == ["FAILED"]
    assert not MlflowClient().search_model_versions("name='tiny-broken'")
    assert not list(tmp_path.glob("**/.convert-*")), "a half-written conversion was left behind"


def test_alias_to_a_missing_version_fails_in_one_line(packaged: dict) -> None:
    assert_one_line_error(invoke("alias", "tiny-onnx-chat", "champion", "999"), "999")
    assert_one_line_error(invoke("alias", "no-such-model", "champion", "1"), "no-such-model")
