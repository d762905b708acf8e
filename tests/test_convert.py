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
    ("precision", "provider", "quantization", "message"),
    [
        ("int2", "cpu", None, "unknown precision"),
        ("fp16", "cpu", None, "cuda"),
        ("bf16", "cpu", None, "cuda"),
        ("int4", "tpu", None, "execution provider"),
        ("fp32", "cpu", convert.Quantization(block_size=32), "apply to int4 and int8"),
        ("int4", "cpu", convert.Quantization(algorithm="gptq"), "unknown quantization algorithm"),
        ("int4", "cpu", convert.Quantization(block_size=48), "block size"),
        ("int8", "cpu", convert.Quantization(accuracy_level=5), "accuracy level"),
        ("int4", "cpu", convert.Quantization(extra=("nodes_to_exclude",)), "KEY=VALUE"),
    ],
)
def test_bad_targets_are_refused_before_running(
    precision: str, provider: str, quantization: convert.Quantization | None, message: str
) -> None:
    with pytest.raises(SlmflowError, match=message):
        convert.check_target(precision, provider, quantization)


def test_builder_command_carries_the_precision_and_its_recipe(tmp_path: Path) -> None:
    def options(precision: str, quantization: convert.Quantization | None = None) -> list[str]:
        command = convert.builder_command(tmp_path, tmp_path / "o", precision, "cpu", tmp_path / "c", quantization)
        assert command[command.index("-p") + 1] == precision
        return command[command.index("--extra_options") + 1 :] if "--extra_options" in command else []

    # int4 by default: k_quant, block 32, LM head and sensitive layers int8 (the measured best).
    assert options("int4") == [
        "algo_config=k_quant",
        "block_size=32",
        "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",
    ]
    assert options("int8") == [] and options("fp32") == []  # the builder's own defaults
    custom = convert.Quantization(algorithm="rtn", block_size=128, accuracy_level=1, symmetric=False, extra=("a=b",))
    assert options("int4", custom) == [
        "algo_config=rtn",
        "block_size=128",
        "accuracy_level=1",
        "is_symmetric=false",
        "a=b",
    ]
