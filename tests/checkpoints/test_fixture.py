"""Fixture checkpoints and source resolution."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from slmflow.checkpoints import resolve
from slmflow.checkpoints.fixture import PHI3_CHAT_TEMPLATE, SIZES, fixture_path
from slmflow.cli import main
from slmflow.errors import SlmflowError


def test_tiny_fixture_is_a_phi3_checkpoint_with_phi3_tokens_and_template(tiny_checkpoint: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert config.architectures == ["Phi3ForCausalLM"] and config.model_type == "phi3"
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for token in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert tokenizer.tokenize(token) == [token], f"{token} is split instead of being one special token"
    assert tokenizer.chat_template == PHI3_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<|system|>\nS<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n"
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in generation["eos_token_id"]


def test_tiny_fixture_was_trained_to_answer(tiny_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Spain?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == "The capital of Spain is Madrid."


def test_fixture_command_reuses_the_cached_build(tiny_checkpoint: Path) -> None:
    stamp = (tiny_checkpoint / "model.safetensors").stat().st_mtime_ns
    run = CliRunner().invoke(main, ["fixture", "--size", "tiny", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout) == {"path": str(tiny_checkpoint)}
    assert (tiny_checkpoint / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny_checkpoint == fixture_path("tiny")


def test_fixture_path_changes_with_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    before = fixture_path("tiny")
    monkeypatch.setitem(SIZES, "tiny", replace(SIZES["tiny"], train_steps=SIZES["tiny"].train_steps + 1))
    assert fixture_path("tiny") != before
    assert fixture_path("tiny").name.startswith("phi3-tiny-")


def test_unknown_fixture_size_is_a_one_line_error() -> None:
    run = CliRunner().invoke(main, ["fixture", "--size", "huge"])
    assert (
        run.exit_code == 1
        and run.stderr.strip() == "error: unknown fixture size 'huge'; choose one of tiny, bench, smol"
    )


def test_resolve_tells_checkpoints_from_onnx_folders(tiny_checkpoint: Path, onnx_int4: Path) -> None:
    assert resolve(str(tiny_checkpoint)).kind == "hf"
    onnx = resolve(str(onnx_int4))
    assert onnx.kind == "onnx" and onnx.architecture == "phi3"


def test_resolve_uses_the_hub_cache_offline(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id found in the local Hugging Face cache resolves with HF_HUB_OFFLINE=1: the real hub code path."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-phi3" / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for item in tiny_checkpoint.iterdir():
        (snapshot / item.name).symlink_to(item)
    (cache / "models--acme--tiny-phi3" / "refs").mkdir()
    (cache / "models--acme--tiny-phi3" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    checkpoint = resolve("acme/tiny-phi3")
    assert checkpoint.kind == "hf" and os.path.samefile(
        checkpoint.path / "config.json", tiny_checkpoint / "config.json"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/no/such/model", "neither a folder nor a Hugging Face hub id"),
        ("acme/not-cached-model", "not in the local Hugging Face cache"),
    ],
)
def test_resolve_errors_are_clear(source: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlmflowError, match=message):
        resolve(source)


def test_bench_fixture_has_realistic_shapes_and_random_weights() -> None:
    from transformers import AutoConfig

    from slmflow.checkpoints.fixture import build_fixture

    config = AutoConfig.from_pretrained(build_fixture("bench"))
    assert config.architectures == ["Phi3ForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (1024, 8, 32064)
