"""Request bodies: the server's own fields, typed strictly.

Sampling fields (temperature, top_p, max_tokens, stop, seed, response_format, ...) are not declared
here: `SamplingParams.from_mapping` is their one validator, shared with the flavor's pyfunc. Message
roles and contents are checked by the chat template's `validate_messages`. Unknown fields are kept
and ignored, as OpenAI ignores them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_N = 16  # choices per request, as the flavor's pyfunc allows


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = None


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None  # any name is accepted: one model is served
    n: StrictInt | None = Field(None, ge=1, le=MAX_N)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(OpenAIRequest):
    messages: list[Any]


class CompletionRequest(OpenAIRequest):
    prompt: StrictStr
