"""GGUF files as a model source: checked cheaply, then dequantized into a float Hugging Face checkpoint.

transformers' GGUF loader does the dequantizing. Its model refuses `save_pretrained`, so the weights
are moved into a fresh model of the same class; the tokenizer, its chat template and a generation
config whose end-of-turn tokens are those the chat template uses are written beside them. From there
either route packages it like any checkpoint. The checkpoint is kept under the slmflow home, keyed by
the file's bytes, so packaging the same file again (another precision, the other route) skips the
dequantizing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect as source_code
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmflow.errors import SlmflowError
from slmflow.paths import slmflow_home
from slmflow.progress import Progress

MAGIC = b"GGUF"
# GGUF architecture -> the transformers class both transformers' GGUF loader and the ONNX Runtime
# GenAI model builder take. Tested end to end: llama (SmolLM2). The others are in both loaders' lists.
ONNX_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "nemotron": "NemotronForCausalLM",
}
# Tokens that end a turn in the chat templates of common model families.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
# Above this many bytes of float32 weights the checkpoint is written in bfloat16 (half the disk).
FLOAT32_LIMIT = 8 * 2**30


@dataclass(frozen=True)
class GgufFile:
    path: Path
    architecture: str
    name: str | None
    parameters: int


def find_gguf(folder: Path) -> Path | None:
    """The one `*.gguf` file of a folder that holds no checkpoint config; None if there is none."""
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        raise SlmflowError(f"{folder} holds {len(files)} GGUF files; name the one to package")
    return files[0] if files else None


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def inspect(path: Path) -> GgufFile:
    """Read a GGUF file's header and tensor table (not its weights): a damaged, truncated or
    unsupported file is a one-line SlmflowError here, before anything is converted."""
    if not is_gguf(path):
        raise SlmflowError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    stat = path.stat()
    return _read_header(str(path.absolute()), stat.st_size, stat.st_mtime_ns)


# Reading the header parses the tokenizer's vocabulary in Python: ~4 s for SmolLM2's 93 MB file, and
# one packaging asks four times (resolving, checking, logging params, converting). Keyed by size and
# modification time as well, so a file replaced in place is read again; failures are not cached.
@functools.lru_cache(maxsize=8)
def _read_header(path: str, size: int, mtime_ns: int) -> GgufFile:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SlmflowError("reading GGUF files needs the gguf package: pip install gguf accelerate") from None
    try:
        reader = GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
        name_field = reader.fields.get("general.name")
        name = str(name_field.contents()) if name_field is not None else None
        # Each tensor's data must lie inside the file: a truncated download fails here, by name.
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} ends past the end of the file")
        parameters = sum(int(t.n_elements) for t in reader.tensors)
    except Exception as e:  # the reader raises whatever numpy or struct raise on a damaged file
        raise SlmflowError(f"{path} is a damaged or truncated GGUF file: {_first_line(e)}") from None
    return GgufFile(Path(path), architecture, name, parameters)


def check_architecture(gguf: GgufFile, route: str) -> None:
    """The architectures each route can package, named in a one-line error for the rest."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if gguf.architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise SlmflowError(
            f"{gguf.path.name}: GGUF architecture {gguf.architecture!r} cannot be read by transformers' GGUF loader "
            f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    if route == "onnx" and gguf.architecture not in ONNX_ARCHITECTURES:
        raise SlmflowError(
            f"{gguf.path.name}: GGUF architecture {gguf.architecture!r} is not one the ONNX route can convert "
            f"({', '.join(sorted(ONNX_ARCHITECTURES))}); --route transformers can package it"
        )


def cached_checkpoint(gguf: GgufFile, progress: Progress | None = None, *, fresh: bool = False) -> tuple[Path, bool]:
    """The float checkpoint of `gguf` under the slmflow home, dequantized only if it is not there
    whole, or if `fresh` (the kept one is replaced once the new one is written): (its folder,
    whether it was there and taken)."""
    folder = cache_path(gguf.path)
    if not fresh and is_complete(folder):
        return folder, True
    return to_checkpoint(gguf, folder, progress), False


def cache_path(path: Path) -> Path:
    """Where the checkpoint of the GGUF file at `path` is kept: keyed by the file's bytes (a file
    replaced in place gets a new one), by this code and by the transformers that dequantizes."""
    import transformers

    digest = hashlib.sha256()
    for part in (source_code.getsource(sys.modules[__name__]), transformers.__version__):
        digest.update(part.encode())
    with path.open("rb") as f:
        digest.update(hashlib.file_digest(f, "sha256").digest())
    return slmflow_home() / "gguf" / f"{path.stem.lower()}-{digest.hexdigest()[:12]}"


def is_complete(folder: Path) -> bool:
    """True if `folder` holds a whole checkpoint: its config and every weight file at full size."""
    from slmflow.checkpoints import Checkpoint
    from slmflow.packaging import check_weights  # the sizes every packaging checks its source against

    if not (folder / "config.json").is_file():
        return False
    try:
        check_weights(Checkpoint(path=folder, kind="hf", source=str(folder)))
    except SlmflowError:
        return False
    return True


def to_checkpoint(gguf: GgufFile, output: Path, progress: Progress | None = None) -> Path:
    """Dequantize `gguf` into a Hugging Face checkpoint folder at `output` (staged, then renamed)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        _convert(gguf, staging, progress)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _convert(gguf: GgufFile, folder: Path, progress: Progress | None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source, name = gguf.path.parent, gguf.path.name
    if progress:
        progress(f"reading {name}", 0, 0)
    # The loader draws a tqdm bar of its own on stderr, under ours: it goes nowhere.
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    dtype = torch.float32 if 4 * gguf.parameters <= FLOAT32_LIMIT else torch.bfloat16

    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    ends = _end_of_turn_ids(tokenizer)
    config |= {"eos_token_id": ends[0], "pad_token_id": ends[0], "dtype": str(dtype).removeprefix("torch.")}
    # A GGUF without an output tensor shares the embeddings as the LM head.
    tied = "lm_head.weight" not in loaded.state_dict() or _shares_embeddings(loaded)
    config["tie_word_embeddings"] = tied
    clean = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise SlmflowError(f"{name}: the dequantized weights do not fit {clean.architectures}: {missing or unexpected}")
    if tied:
        model.tie_weights()
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=ends, pad_token_id=ends[0], do_sample=False
    )
    if progress:
        progress("writing the float checkpoint", 0, 0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _finish_tokenizer_config(folder, tokenizer, clean.max_position_embeddings)


def _end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-sequence token first, then every other end-of-turn token its chat
    template writes (SmolLM2's GGUF names <|im_end|>; the template also knows <|endoftext|>)."""
    template = tokenizer.chat_template or ""
    names = [tokenizer.eos_token] + [t for t in END_OF_TURN if t in template or t == "<|endoftext|>"]
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for token in names:
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    if not ids:
        raise SlmflowError("the GGUF's tokenizer names no end-of-sequence token")
    return ids


def _shares_embeddings(model: Any) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()


def _finish_tokenizer_config(folder: Path, tokenizer: Any, context_length: int) -> None:
    """What readers other than transformers 5 need: the chat template inline (ONNX Runtime GenAI's
    tokenizer reads tokenizer_config.json), and no load-time keys leaked into the file."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    # transformers 5 names its own backend class, which other readers do not know; the generic
    # fast tokenizer reads the same tokenizer.json.
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = context_length
    if tokenizer.chat_template and "chat_template" not in config:
        config["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
