"""The ONNX Runtime GenAI conversion step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slmflow import convert
from slmflow.errors import ConversionError, SlmflowError


def test_int4_conversion_writes_a_complete_genai_folder(onnx_int4: Path) -> None:
    config = json.loads((onnx_int4 / "genai_config.json").read_text())
    assert config["model"]["type"] == "phi3"
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in onnx_int4.iterdir()}
    assert not [p for p in onnx_int4.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_progress_reports_each_layer(tiny_checkpoint: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    convert.convert(
        tiny_checkpoint, tmp_path / "fp32", precision="fp32", num_layers=4, progress=lambda m, d, t: seen.append((d, t))
    )
    assert (1, 4) in seen and (4, 4) in seen


def test_failed_conversion_raises_and_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="model builder failed"):
        convert.convert(broken, tmp_path / "out", precision="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.parametrize(
    ("precision", "provider", "message"),
    [("int2", "cpu", "unknown precision"), ("fp16", "cpu", "cuda"), ("int4", "tpu", "execution provider")],
)
def test_bad_targets_are_refused_before_running(precision: str, provider: str, message: str) -> None:
    with pytest.raises(SlmflowError, match=message):
        convert.check_target(precision, provider)


def test_builder_command_uses_128_wide_int4_blocks(tmp_path: Path) -> None:
    command = convert.builder_command(tmp_path, tmp_path / "o", "int4", "cpu", tmp_path / "c")
    assert command[-2:] == ["--extra_options", "block_size=128"]
    assert "--extra_options" not in convert.builder_command(tmp_path, tmp_path / "o", "fp32", "cpu", tmp_path / "c")
