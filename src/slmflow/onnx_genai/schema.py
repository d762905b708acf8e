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
    """`chat`: MLflow's llm/v1/chat signature plus `seed`, with `tools` taking any JSON Schema (MLflow's
    own allows only type/enum/items/description per property: no lengths, ranges or nesting);
    `prompt`: prompt -> string, params per call."""
    from mlflow.models import ModelSignature
    from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA
    from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("temperature", DataType.double, None),
            ParamSpec("top_p", DataType.double, None),
            ParamSpec("top_k", DataType.long, None),
            ParamSpec("max_tokens", DataType.long, None),
            ParamSpec("seed", DataType.long, None),
            ParamSpec("stop", DataType.string, [], shape=(-1,)),
            # Chat: auto, required, none, or the name of the function to call (params are scalars).
            ParamSpec("tool_choice", DataType.string, None),
            ParamSpec("parallel_tool_calls", DataType.boolean, None),
        ]
    )
    if task == "chat":
        columns = [
            ColSpec(AnyType(), "tools", required=False) if column.name == "tools" else column
            for column in CHAT_MODEL_INPUT_SCHEMA.inputs
        ]
        inputs = Schema([*columns, ColSpec(DataType.long, "seed", required=False)])
        return ModelSignature(inputs=inputs, outputs=CHAT_MODEL_OUTPUT_SCHEMA, params=params)
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "prompt")]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=params,
    )
