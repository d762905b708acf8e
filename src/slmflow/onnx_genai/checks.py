"""What ONNX Runtime GenAI can run, checked before a request is queued.

A request the runtime cannot run must fail as the caller's error (HTTP 400), at once, rather than as
a failed batch on the engine's owner thread (a 500, after the request was accepted). Found by the
reliability fuzzer (tests/reliability/test_fuzz.py): seeds and top_k beyond 32 bits, top_k over the
vocabulary, lone UTF-16 surrogates in the prompt, and JSON schemas the guidance engine cannot compile
all failed there.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmflow.errors import InvalidRequest
from slmflow.generation.params import INT32_MAX, INT32_MIN, SamplingParams

if TYPE_CHECKING:
    from slmflow.generation.engine import GenerationEngine


def check_text(text: str, param: str) -> None:
    """The tokenizer takes UTF-8 only: a lone surrogate (JSON's "\\ud800") cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(
            f"{param} is not valid Unicode text ({e.reason} at character {e.start})", param=param
        ) from None


def check_choices(params: SamplingParams, n: int, vocab_size: int | None = None) -> None:
    """Every choice's params fit the runtime's integer types (choice i samples with seed + i), and
    top_k the vocabulary (the runtime refuses a larger one mid-batch)."""
    if vocab_size and params.top_k is not None and params.top_k > vocab_size:
        raise InvalidRequest(
            f"top_k must be at most the vocabulary size, {vocab_size}; got {params.top_k}", param="top_k"
        )
    for index in range(n):
        choice = params.for_choice(index)
        for name in ("seed", "top_k"):
            value = getattr(choice, name)
            if value is not None and not INT32_MIN <= value <= INT32_MAX:
                extra = f" (seed + choice index, with n={n})" if name == "seed" and index else ""
                raise InvalidRequest(f"{name} must be from {INT32_MIN} to {INT32_MAX}{extra}; got {value}", param=name)


def check_guidance(engine: GenerationEngine, guidance: tuple[str, str] | None) -> None:
    """Compile `response_format`'s grammar as the engine will, on its owner thread, between batches.

    A JSON schema the guidance engine rejects (unsupported keywords, unsatisfiable constraints, bad
    regex patterns, external $refs) is the caller's error. Compiling costs milliseconds, but waits
    for the running batch to end (a guided request runs alone, after it, anyway); grammars that
    compiled are remembered per model, so a schema used again is not compiled again.
    """
    if guidance is None:
        return
    key = (str(engine.model_dir), guidance)
    with _compiled_lock:
        if key in _compiled:
            _compiled.move_to_end(key)
            return
    try:
        engine.run_on_owner(lambda: _compile(*engine.genai_model(), guidance))
    except RuntimeError as e:
        raise InvalidRequest(f"response_format cannot be used: {e}", param="response_format") from None
    with _compiled_lock:
        _compiled[key] = None
        while len(_compiled) > _COMPILED_MAX:
            _compiled.popitem(last=False)


_COMPILED_MAX = 256
_compiled: OrderedDict[tuple[str, tuple[str, str]], None] = OrderedDict()
_compiled_lock = threading.Lock()


def check_request(engine: GenerationEngine, prompt: str, prompt_param: str, params: SamplingParams, n: int) -> None:
    check_text(prompt, prompt_param)
    check_choices(params, n, vocab_size(engine.model_dir))
    check_guidance(engine, params.guidance)


@functools.lru_cache(maxsize=8)
def vocab_size(model_dir: Path) -> int | None:
    """The model's vocabulary size, from its genai_config.json (None if it does not say)."""
    try:
        return int(json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _compile(og: Any, model: Any, guidance: tuple[str, str]) -> None:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=2, batch_size=1)
    params.set_guidance(*guidance)
    og.Generator(model, params)  # builds the grammar; raises RuntimeError on a bad one
