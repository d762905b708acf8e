"""What a conversion cost: the packaged ONNX model measured against the checkpoint it came from.

Offline, on built-in data, the source in torch (float32) and the packaged model in ONNX Runtime
GenAI reading the very same token ids:
- perplexity of a plain English text (`data/reference.txt`, about 550 tokens), and top-1 agreement
  on it (the share of positions where both rank the same next token first);
- greedy agreement on everyday prompts (`data/everyday_eval.jsonl`): the share of prompts whose
  first MAX_NEW_TOKENS greedy tokens are identical.

Perplexity and top-1 agreement are the steady measures: on SmolLM2-135M-Instruct int8 moved
perplexity +0.25% (top-1 96%), int4 +12% to +80% by recipe (top-1 79% to 51%). Greedy agreement is
the strict one: a small model has many near-ties (SmolLM2's first token for "What is the capital
of France?" wins by 0.08 logits), so one flipped token sends an answer elsewhere: int8 still agrees
on only 11 of 20. It tells "bit for bit the same" (fp32: 20/20) from "not quite".

The source's side depends only on the checkpoint, so it is cached (under the slmflow home, keyed
by the checkpoint's contents): packaging one checkpoint at several precisions measures torch once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from slmflow.paths import slmflow_home
from slmflow.progress import Progress

MAX_NEW_TOKENS = 32
METRIC_PREFIX = "quality."


@dataclass(frozen=True)
class QualityReport:
    perplexity_source: float
    perplexity: float
    tokens_scored: int
    top1_agreement: float  # share of text positions where both rank the same next token first
    greedy_agreement: float  # share of prompts with identical greedy tokens
    prompts: int
    answers: list[dict[str, Any]] = field(default_factory=list)  # prompt, source, packaged, same
    # Where the model has a prefill graph (prefill_graph.py), `perplexity` is the prefill graph's,
    # which reads prompts; this is the decode graph's, which writes every answer token but the first.
    perplexity_decode_graph: float | None = None

    @property
    def perplexity_increase_pct(self) -> float:
        return 100.0 * (self.perplexity / self.perplexity_source - 1.0)

    @property
    def decode_graph_increase_pct(self) -> float | None:
        if self.perplexity_decode_graph is None:
            return None
        return 100.0 * (self.perplexity_decode_graph / self.perplexity_source - 1.0)

    @property
    def worst_increase_pct(self) -> float:
        """The larger increase of the model's graphs: what a quality budget is held to."""
        decode = self.decode_graph_increase_pct
        return self.perplexity_increase_pct if decode is None else max(self.perplexity_increase_pct, decode)

    def metrics(self) -> dict[str, float]:
        metrics = {
            f"{METRIC_PREFIX}perplexity_source": self.perplexity_source,
            f"{METRIC_PREFIX}perplexity": self.perplexity,
            f"{METRIC_PREFIX}perplexity_increase_pct": self.perplexity_increase_pct,
            f"{METRIC_PREFIX}top1_agreement": self.top1_agreement,
            f"{METRIC_PREFIX}greedy_agreement": self.greedy_agreement,
        }
        decode = self.decode_graph_increase_pct
        if self.perplexity_decode_graph is not None and decode is not None:
            metrics[f"{METRIC_PREFIX}perplexity_decode_graph"] = self.perplexity_decode_graph
            metrics[f"{METRIC_PREFIX}decode_graph_increase_pct"] = decode
        return metrics

    def summary(self) -> str:
        decode = self.decode_graph_increase_pct
        return (
            f"perplexity {self.perplexity:.3f} vs {self.perplexity_source:.3f} for the source "
            f"({self.perplexity_increase_pct:+.2f}%{'' if decode is None else f'; decode graph {decode:+.2f}%'}), "
            f"same top-1 token at {100 * self.top1_agreement:.1f}% of positions, greedy answers identical on "
            f"{round(self.greedy_agreement * self.prompts)}/{self.prompts} prompts"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "perplexity_increase_pct": self.perplexity_increase_pct,
            "decode_graph_increase_pct": self.decode_graph_increase_pct,
        }


def reference_text() -> str:
    return resources.files("slmflow.data").joinpath("reference.txt").read_text()


def everyday_prompts() -> list[list[dict[str, str]]]:
    lines = resources.files("slmflow.data").joinpath("everyday_eval.jsonl").read_text().splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def measure(source: Path, onnx_folder: Path, progress: Progress | None = None) -> QualityReport:
    """Measure the ONNX Runtime GenAI model in `onnx_folder` against the checkpoint in `source`."""
    from slmflow.generation.engine import GenerationEngine
    from slmflow.generation.params import SamplingParams

    reference = _source_measures(source, progress)
    text_ids, prompts = reference["text_ids"], reference["prompt_ids"]
    _say(progress, "measuring the packaged model (ONNX Runtime GenAI)")
    engine = GenerationEngine(onnx_folder)
    try:
        scores = engine.score(text_ids)
        greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
        streams = engine.submit_all([(ids, greedy) for ids in prompts])
        answers = [list(_without_end(stream.result().token_ids, engine.eos_token_ids)) for stream in streams]
    finally:
        engine.close()
    decode_graph = _decode_graph_perplexity(onnx_folder, text_ids)
    rows = [
        {"prompt": messages[-1]["content"], "source": theirs, "packaged": ours, "same": theirs == ours}
        for messages, theirs, ours in zip(everyday_prompts(), reference["answers"], answers, strict=True)
    ]
    top1 = sum(a == b for a, b in zip(reference["top_tokens"], scores.top_tokens, strict=True))
    return QualityReport(
        perplexity_source=reference["perplexity"],
        perplexity=_perplexity(scores.logprobs),
        tokens_scored=len(scores.logprobs),
        top1_agreement=top1 / len(scores.top_tokens),
        greedy_agreement=sum(1 for row in rows if row["same"]) / len(rows),
        prompts=len(rows),
        answers=rows,
        perplexity_decode_graph=decode_graph,
    )


def _decode_graph_perplexity(onnx_folder: Path, text_ids: list[int]) -> float | None:
    """The reference text's perplexity read by the builder's graph, where a prefill graph reads
    prompts (None where there is none)."""
    from slmflow.generation.decoder import PREFILL_FILE
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    if not (onnx_folder / PREFILL_FILE).is_file():
        return None
    engine = GenerationEngine(onnx_folder, EngineOptions(prefill_graph=False))
    try:
        return _perplexity(engine.score(text_ids).logprobs)
    finally:
        engine.close()


def _source_measures(source: Path, progress: Progress | None) -> dict[str, Any]:
    """The source checkpoint's side: token ids, perplexity, top tokens, greedy answers (cached)."""
    cache = slmflow_home() / "quality" / f"{_digest(source)}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    _say(progress, "measuring the source checkpoint (torch)")
    reference = _TorchReference(source)
    text_ids = reference.encode(reference_text())[: reference.context_length]
    logprobs, top_tokens = reference.score(text_ids)
    prompt_ids = [reference.chat_ids(messages) for messages in everyday_prompts()]
    measures = {
        "text_ids": text_ids,
        "prompt_ids": prompt_ids,
        "perplexity": _perplexity(logprobs),
        "top_tokens": top_tokens,
        "answers": [reference.greedy(ids) for ids in prompt_ids],
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".tmp")
    partial.write_text(json.dumps(measures))
    partial.replace(cache)
    return measures


def _digest(source: Path) -> str:
    """Everything the source's measures depend on: the checkpoint's files, the data, the versions."""
    import torch
    import transformers

    digest = hashlib.sha256()
    for part in (reference_text(), json.dumps(everyday_prompts()), str(MAX_NEW_TOKENS), torch.__version__):
        digest.update(part.encode())
    digest.update(transformers.__version__.encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(source)).encode())
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:24]


class _TorchReference:
    """The source checkpoint in torch, float32, greedy: the quality the conversion is measured against."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        config = self.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos = frozenset(eos if isinstance(eos, list) else [eos])
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(str(text))

    def score(self, ids: list[int]) -> tuple[list[float], list[int]]:
        """(log p of each next token, the token ranked first) at every position after the first."""
        import torch

        with torch.no_grad():
            tensor = torch.tensor([ids])
            log_softmax = torch.log_softmax(self.model(tensor).logits[0, :-1].double(), dim=-1)
            logprobs = log_softmax.gather(1, tensor[0, 1:, None]).squeeze(1).tolist()
            return logprobs, log_softmax.argmax(dim=1).tolist()

    def greedy(self, ids: list[int]) -> list[int]:
        """Greedy tokens one prompt at a time (a padded batch is numerically a different model)."""
        import torch

        tokens: list[int] = []
        with torch.no_grad():
            output = self.model(torch.tensor([ids]), use_cache=True)
            for _ in range(MAX_NEW_TOKENS):
                token = int(output.logits[0, -1].argmax())
                if token in self.eos:
                    break
                tokens.append(token)
                output = self.model(torch.tensor([[token]]), past_key_values=output.past_key_values, use_cache=True)
        return tokens


def _without_end(tokens: tuple[int, ...], eos: frozenset[int]) -> tuple[int, ...]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def _perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def _say(progress: Progress | None, message: str) -> None:
    if progress:
        progress(message, 0, 0)
