"""Run an MLflow model over evaluation rows (timed, one row at a time) and score text perplexity."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from slmflow.errors import SlmflowError

EVAL_MAX_TOKENS = 256  # an evaluated answer's bound when neither the model nor the caller sets one


@dataclass(frozen=True)
class Prediction:
    text: str
    latency_s: float
    prompt_tokens: int | None
    completion_tokens: int | None

    def as_outputs(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "latency_s": self.latency_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


class ModelRunner:
    """A loaded pyfunc model with what evaluation needs to know about it."""

    def __init__(self, model_uri: str, params: dict[str, Any] | None = None) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        self.model_uri = model_uri
        try:
            self.model = mlflow.pyfunc.load_model(model_uri)
        except MlflowException as e:
            raise SlmflowError(f"cannot load {model_uri}: {e.message}") from e
        flavors = self.model.metadata.flavors
        self.flavor = (
            "onnx_genai" if "onnx_genai" in flavors else "transformers" if "transformers" in flavors else "other"
        )
        inputs = self.model.metadata.get_input_schema()
        names = inputs.input_names() if inputs else []
        self.input_kind = "prompt" if "prompt" in names else "messages"
        # Greedy decoding unless asked otherwise: evaluations and comparisons must be repeatable.
        # (MLflow's transformers flavor rejects temperature 0; its checkpoints decode greedily by default.)
        # Answers are bounded unless the model or the caller sets a bound: an unbounded small model
        # ran to its whole context (65 s and 10,000 characters per row for SmolLM2).
        defaults: dict[str, Any] = {}
        if self.flavor == "onnx_genai":
            packaged = self.model.metadata.flavors["onnx_genai"].get("generation_defaults") or {}
            defaults = {"temperature": 0.0, "max_tokens": packaged.get("max_tokens") or EVAL_MAX_TOKENS}
        self.defaults, self.explicit = defaults, params or {}

    def predict(self, row: dict[str, Any]) -> Prediction:
        if self.input_kind not in row:
            raise SlmflowError(f"{self.model_uri} takes '{self.input_kind}' rows; this data has {sorted(row)}")
        params = self._params_for(row)
        # MLflow's transformers chat flavor takes generation settings as input fields, not params.
        by_field = self.flavor == "transformers"
        model_input = {self.input_kind: row[self.input_kind], **(params if by_field else {})}
        started = time.perf_counter()
        response = self.model.predict(model_input, params=None if by_field or not params else params)
        latency = time.perf_counter() - started
        first = response[0] if isinstance(response, list) else response
        if isinstance(first, dict):  # an OpenAI chat completion
            usage = first.get("usage") or {}
            return Prediction(
                first["choices"][0]["message"]["content"],
                latency,
                usage.get("prompt_tokens"),
                usage.get("completion_tokens"),
            )
        return Prediction(str(first), latency, None, None)

    def _params_for(self, row: dict[str, Any]) -> dict[str, Any]:
        """The evaluation's defaults, then the row's own settings (a served request's, as `slmflow
        traces export` writes them), then the caller's --params."""
        params = {**self.defaults, **row.get("params", {}), **self.explicit}
        if self.flavor == "transformers":  # it has no seed, and rejects temperature 0 (it decodes greedily)
            params = {k: v for k, v in params.items() if k != "seed" and not (k == "temperature" and v == 0)}
        return params

    def text_perplexity(self, text: str) -> tuple[float, int]:
        """(perplexity, tokens scored) of a whole text, in context-sized windows."""
        scorer = self._scorer()
        ids = scorer.encode(text)
        logprobs = [lp for chunk in _windows(ids, scorer.context_length) for lp in scorer.logprobs(chunk)]
        return _perplexity(logprobs), len(logprobs)

    def answer_perplexity(self, rows: list[dict[str, Any]]) -> tuple[float, int]:
        """(perplexity, tokens scored) of each row's `expected` answer given its prompt.

        For an instruction model this is the quantization cost that matters: how much less likely
        the reference answers become, not how well the model predicts the users' questions.
        """
        scorer = self._scorer()
        logprobs: list[float] = []
        for row in rows:
            if row.get("expected"):
                prompt = scorer.encode(scorer.render(row))
                answer = scorer.encode(row["expected"])
                logprobs += scorer.logprobs(prompt + answer)[-len(answer) :]
        if not logprobs:
            raise SlmflowError("answer perplexity needs rows with an 'expected' answer")
        return _perplexity(logprobs), len(logprobs)

    def _scorer(self) -> _OnnxScorer | _TorchScorer:
        if self.flavor == "onnx_genai":
            return _OnnxScorer(self.model.get_raw_model())
        if self.flavor == "transformers":
            return _TorchScorer(self.model_uri)
        raise SlmflowError(f"perplexity needs an onnx_genai or transformers model; {self.model_uri} is neither")


class _OnnxScorer:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.context_length = engine.context_length

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def render(self, row: dict[str, Any]) -> str:
        return row["prompt"] if "prompt" in row else self.engine.render_chat(row["messages"])

    def logprobs(self, ids: list[int]) -> list[float]:
        return self.engine.token_logprobs(ids)


class _TorchScorer:
    def __init__(self, model_uri: str) -> None:
        import mlflow

        pipe = mlflow.transformers.load_model(model_uri)
        self.model, self.tokenizer = pipe.model, pipe.tokenizer
        self.context_length = self.model.config.max_position_embeddings

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, row: dict[str, Any]) -> str:
        if "prompt" in row:
            return row["prompt"]
        return self.tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)

    def logprobs(self, ids: list[int]) -> list[float]:
        import torch

        with torch.no_grad():
            tensor = torch.tensor([ids])
            log_softmax = torch.log_softmax(self.model(tensor).logits[0, :-1].double(), dim=-1)
            return log_softmax.gather(1, tensor[0, 1:, None]).squeeze(1).tolist()


def _perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def _windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[start : start + size] for start in range(0, len(ids), size) if len(ids[start : start + size]) > 1]
