"""Request bodies: the server's own fields, typed strictly; and what the OpenAPI schema documents.

Sampling fields (temperature, top_p, max_tokens, stop, seed, response_format, ...) are not validated
here: `SamplingParams.from_mapping` is their one validator, shared with the flavor's pyfunc. Message
roles and contents are checked by the chat template's `validate_messages`. Unknown fields are kept
and ignored, as OpenAI ignores them. The OpenAPI schema still documents every field and every error
(`/openapi.json`): API clients and the reliability fuzzer (tests/reliability) generate requests from it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic.config import JsonDict

from slmflow.generation.chat import ROLES
from slmflow.generation.params import INT32_MAX, INT32_MIN, MAX_STOP_SEQUENCES, SamplingParams

MAX_N = 16  # choices per request, as the flavor's pyfunc allows


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """null means "the model's default" for every sampling field."""
    return {"anyOf": [schema, {"type": "null"}]}


# Documentation only (see the module docstring); ranges as SamplingParams and the engine enforce them.
SAMPLING_FIELDS: dict[str, dict[str, Any]] = {
    "max_tokens": _nullable({"type": "integer", "minimum": 1}),
    "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
    "min_tokens": _nullable({"type": "integer", "minimum": 0}),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "top_k": _nullable({"type": "integer", "minimum": 0, "maximum": INT32_MAX}),
    "seed": _nullable({"type": "integer", "minimum": INT32_MIN, "maximum": INT32_MAX}),
    "stop": _nullable(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_SEQUENCES},
            ]
        }
    ),
    "response_format": _nullable(
        {
            "anyOf": [
                {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}, "required": ["type"]},
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": "json_schema"},
                        "json_schema": {
                            "type": "object",
                            "properties": {"name": {}, "schema": {"type": "object"}},
                            "required": ["schema"],
                        },
                    },
                    "required": ["type", "json_schema"],
                },
            ]
        }
    ),
}
MESSAGES: JsonDict = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {
            "role": {"enum": list(ROLES)},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                            "required": ["type", "text"],
                        },
                    },
                ]
            },
            "name": {},
        },
        "required": ["role", "content"],
    },
}


def _whole_number(value: Any) -> Any:
    # JSON has one number type and JSON Schema's "integer" includes 2.0: take it, as max_tokens does.
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeInt = Annotated[StrictInt, BeforeValidator(_whole_number)]


def _document_sampling(schema: dict[str, Any]) -> None:
    schema["properties"].update(SAMPLING_FIELDS)


def sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """`SamplingParams.from_mapping`, minding OpenAI's two names for the length limit.

    `max_completion_tokens` wins over `max_tokens`, but a null one must not hide `max_tokens` (the
    request would generate to the end of the context), and an invalid `max_tokens` beside it is
    still a 400, not silently ignored. Found by the fuzzer; see tests/reliability.
    """
    if fields.get("max_completion_tokens") is None:
        fields = {key: value for key, value in fields.items() if key != "max_completion_tokens"}
    elif fields.get("max_tokens") is not None:
        SamplingParams.from_mapping({"max_tokens": fields["max_tokens"]})  # raises InvalidRequest
    return SamplingParams.from_mapping(fields)


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = None


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_document_sampling)

    model: StrictStr | None = None  # any name is accepted: one model is served
    n: WholeInt | None = Field(None, ge=1, le=MAX_N)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(OpenAIRequest):
    messages: list[Any] = Field(json_schema_extra=MESSAGES)
    # Checked by `Tools.parse` (a 400 naming the field), typed loosely here as the sampling fields are.
    tools: Any = Field(None, json_schema_extra={"type": ["array", "null"], "items": {"type": "object"}})
    tool_choice: Any = Field(
        None, json_schema_extra={"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "null"}]}
    )
    parallel_tool_calls: Any = Field(None, json_schema_extra={"type": ["boolean", "null"]})


class CompletionRequest(OpenAIRequest):
    prompt: StrictStr


# MLflow's scoring protocol as `/invocations` takes it (JSON; CSV and Parquet are taken too).
INVOCATIONS_BODY = {
    "type": "object",
    "properties": {
        "inputs": {
            "anyOf": [
                {"type": "object", "properties": {"messages": MESSAGES}, "required": ["messages"]},
                {"type": "object", "properties": {"prompt": {"type": "string"}}, "required": ["prompt"]},
            ]
        },
        "params": {
            "type": "object",
            "properties": {
                **{name: SAMPLING_FIELDS[name] for name in ("max_tokens", "temperature", "top_p", "top_k", "seed")},
                "stop": {"type": "array", "items": {"type": "string", "minLength": 1}},
            },
        },
    },
    "required": ["inputs"],
}


class ErrorObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """OpenAI's error envelope: the body of every error the server sends, whatever its status."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorObject


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorEnvelope, "description": "Bad request, missing API key, body too large, queue full (429)"},
    "5XX": {"model": ErrorEnvelope, "description": "A bug in the server, or a request over its time (504)"},
}
