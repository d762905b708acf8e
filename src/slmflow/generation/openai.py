"""The one place that builds OpenAI-shaped results: chat completions, completions and stream chunks.

The flavor's pyfunc and the HTTP server both use these, so the two can never drift apart.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from slmflow.generation.tools import ToolCall

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens found already read (prefix reuse)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(frozen=True)
class Completion:
    """One finished generation: the new text only (and, where the engine made it, its token ids,
    end-of-turn token included)."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    token_ids: tuple[int, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()  # set (and text "") when the answer was function calls


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_completion(completions: list[Completion], *, model: str, id: str | None = None) -> dict[str, Any]:
    """A `chat.completion` object with one choice per completion (OpenAI's `n`)."""
    choices = [
        {
            "index": index,
            "message": _message(c),
            "finish_reason": c.finish_reason,
            "logprobs": None,
        }
        for index, c in enumerate(completions)
    ]
    return _envelope("chat.completion", id or new_id(), model, int(time.time()), choices, total_usage(completions))


def _message(completion: Completion) -> dict[str, Any]:
    if completion.tool_calls:
        return {"role": "assistant", "content": None, "tool_calls": [c.as_openai() for c in completion.tool_calls]}
    return {"role": "assistant", "content": completion.text}


def tool_call_deltas(calls: tuple[ToolCall, ...], piece: int = 16) -> list[list[dict[str, Any]]]:
    """The `delta.tool_calls` of the chunks that stream `calls`, as OpenAI sends them: for each call
    first its index, id, type and name with empty arguments, then its arguments in pieces."""
    deltas: list[list[dict[str, Any]]] = []
    for index, call in enumerate(calls):
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        deltas.append([head])
        for start in range(0, len(call.arguments), piece):
            deltas.append([{"index": index, "function": {"arguments": call.arguments[start : start + piece]}}])
    return deltas


def text_completion(completions: list[Completion], *, model: str, id: str | None = None) -> dict[str, Any]:
    """A legacy `text_completion` object (`/v1/completions`)."""
    choices = [
        {"index": index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        for index, c in enumerate(completions)
    ]
    return _envelope(
        "text_completion", id or new_id("cmpl"), model, int(time.time()), choices, total_usage(completions)
    )


def chat_chunk(
    *,
    id: str,
    model: str,
    created: int,
    index: int = 0,
    content: str | None = None,
    role: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: FinishReason | None = None,
    usage: Usage | None = None,
    with_choice: bool = True,
) -> dict[str, Any]:
    """A `chat.completion.chunk`; with `with_choice=False` it is the final usage-only chunk."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    choices = (
        [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if with_choice else []
    )
    return _envelope("chat.completion.chunk", id, model, created, choices, usage)


def total_usage(completions: list[Completion]) -> Usage:
    # n choices share one prompt: OpenAI counts its tokens once.
    prompt = completions[0].usage.prompt_tokens if completions else 0
    cached = min((c.usage.cached_tokens for c in completions), default=0)
    return Usage(prompt, sum(c.usage.completion_tokens for c in completions), cached)


def text_chunk(
    *,
    id: str,
    model: str,
    created: int,
    index: int = 0,
    content: str | None = None,
    finish_reason: FinishReason | None = None,
    usage: Usage | None = None,
    with_choice: bool = True,
) -> dict[str, Any]:
    """A streamed `text_completion` object (`/v1/completions` with `stream`)."""
    choice = {"index": index, "text": content or "", "finish_reason": finish_reason, "logprobs": None}
    return _envelope("text_completion", id, model, created, [choice] if with_choice else [], usage)


def _envelope(
    object: str, id: str, model: str, created: int, choices: list[dict[str, Any]], usage: Usage | None
) -> dict[str, Any]:
    """What every OpenAI completion object and chunk shares; `usage` only when there is one."""
    body: dict[str, Any] = {"id": id, "object": object, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage.as_dict()
    return body
