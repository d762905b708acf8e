"""Signatures and input examples of the flavor's two tasks."""

from __future__ import annotations

from typing import Any

TASKS = ("chat", "prompt")

# The reference tutorial's two example inputs, verbatim.
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}
PROMPT_EXAMPLE = {
    "prompt": "<|system|>You are a stand-up comedian.<|end|><|user|>Tell me a joke about atom<|end|><|assistant|>"
}


def default_input_example(task: str) -> dict[str, Any]:
    return CHAT_EXAMPLE if task == "chat" else PROMPT_EXAMPLE


def signature_for(task: str):  # -> mlflow.models.ModelSignature
    """`chat`: MLflow's llm/v1/chat signature plus `seed`; `prompt`: prompt -> string, params per call."""
    from mlflow.models import ModelSignature
    from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA
    from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("temperature", DataType.double, None),
            ParamSpec("top_p", DataType.double, None),
            ParamSpec("top_k", DataType.long, None),
            ParamSpec("max_tokens", DataType.long, None),
            ParamSpec("seed", DataType.long, None),
            ParamSpec("stop", DataType.string, [], shape=(-1,)),
        ]
    )
    if task == "chat":
        inputs = Schema([*CHAT_MODEL_INPUT_SCHEMA.inputs, ColSpec(DataType.long, "seed", required=False)])
        return ModelSignature(inputs=inputs, outputs=CHAT_MODEL_OUTPUT_SCHEMA, params=params)
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "prompt")]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=params,
    )
