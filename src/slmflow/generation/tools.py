"""OpenAI tool calling: `tools` and `tool_choice` in, `tool_calls` out, for any chat model.

How a model is told about tools, and how its calls are read back:
- A chat template that knows tools (it mentions `tools`) gets them as transformers passes them:
  `tools=[{"type": "function", "function": {...}}, ...]`; its calls are read from the text it
  writes, as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen, Hermes and
  SmolLM3 style) or as our fallback format.
- Any other template gets a system message that lists the functions and asks for the fallback
  format: the whole answer one JSON object, `{"tool_calls": [{"name": ..., "arguments": {...}}]}`.
  Tool results in the history (`tool` messages) become user messages naming the call they answer,
  and an assistant's earlier calls are written in the same format, so the model sees the exchange.
- `tool_choice: "required"` or a named function: the answer is constrained by ONNX Runtime GenAI
  guidance to the fallback format, with each function's `parameters` as the schema of its
  arguments, so the arguments always parse and validate. `"auto"`: the model chooses; text that is
  a call in either format is returned as `tool_calls`, anything else as content. `"none"`: the
  tools are not shown and nothing is parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from slmflow.errors import InvalidRequest

if TYPE_CHECKING:
    from slmflow.generation.openai import Completion

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # per answer: a model that would list calls forever stops here


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Tools:
    """A request's tools and tool choice, checked."""

    functions: tuple[Function, ...]
    choice: str  # "auto", "required", "none", or "function"
    forced: str | None = None  # the function's name, when choice is "function"
    parallel: bool = True

    @classmethod
    def parse(cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> Tools | None:
        """None when the request has no tools (or `tool_choice` "none" with none to hide)."""
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidRequest("parallel_tool_calls must be true or false", param="parallel_tool_calls")
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise InvalidRequest("tool_choice needs tools", param="tool_choice")
            return None
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise InvalidRequest(f"tools must be a list of at most {MAX_TOOLS} functions", param="tools")
        functions = tuple(_function(tool, f"tools[{i}]") for i, tool in enumerate(tools))
        names = [f.name for f in functions]
        if len(set(names)) != len(names):
            raise InvalidRequest("tools must have distinct function names", param="tools")
        parallel = parallel_tool_calls is not False
        if tool_choice is None or tool_choice in ("auto", "required", "none"):
            return cls(functions, tool_choice or "auto", parallel=parallel)
        forced = _forced_name(tool_choice)
        if forced not in names:
            raise InvalidRequest(f"tool_choice names {forced!r}, which is not among the tools", param="tool_choice")
        return cls(functions, "function", forced, parallel)

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def constrained(self) -> bool:
        """The answer must be a call: guidance holds the model to the format."""
        return self.choice in ("required", "function")

    def guidance(self) -> tuple[str, str]:
        """ONNX Runtime GenAI guidance for the fallback format, arguments per each function's schema."""
        allowed = [f for f in self.functions if self.forced in (None, f.name)]
        call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for f in allowed
            ]
        }
        single = not self.parallel or self.choice == "function"
        calls: dict[str, Any] = {
            "type": "array",
            "items": call,
            "minItems": 1,
            "maxItems": 1 if single else MAX_PARALLEL_CALLS,
        }
        schema = {
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False},
        }
        return ("json_schema", json.dumps(schema))

    def instructions(self) -> str:
        """The fallback format, as a system message."""
        listed = json.dumps([f.as_openai()["function"] for f in self.functions], ensure_ascii=False)
        must = "You must call" if self.constrained else "You may call"
        return (
            f"{must} these functions: {listed}\n"
            'To call functions, answer with only a JSON object: {"tool_calls": [{"name": "<function name>", '
            '"arguments": {<arguments>}}]}. Otherwise, answer normally.'
        )

    def read_calls(self, text: str) -> list[ToolCall] | None:
        """The calls in a finished answer, or None when it is not a call (plain content)."""
        found = _fallback_calls(text)
        if found is None:
            found = _tagged_calls(text)
        if not found:
            return None
        names = {f.name for f in self.functions}
        calls = [
            ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))
            for name, arguments in found
            if name in names
        ]
        if not calls:
            return None
        return calls if self.parallel else calls[:1]


def may_be_a_call(text: str) -> bool:
    """Could an answer that starts with `text` be a call? (Then it is held back while streaming.)"""
    start = text.lstrip()
    return not start or start[0] == "{" or "<tool_call>".startswith(start[:11]) or start.startswith("<tool_call>")


def prepare_messages(messages: Sequence[dict[str, Any]], tools: Tools | None, *, native: bool) -> list[dict[str, Any]]:
    """The history as the template will see it: with the fallback instructions unless the template
    knows tools, earlier calls and tool results written so the model can read them."""
    prepared = []
    for message in messages:
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and calls and not native:
            written = [{"name": c["function"]["name"], "arguments": _arguments(c)} for c in calls]
            prepared.append({"role": "assistant", "content": json.dumps({"tool_calls": written})})
        elif message["role"] == "tool" and not native:
            call = message.get("tool_call_id") or "?"
            prepared.append({"role": "user", "content": f"Result of tool call {call}: {message['content']}"})
        else:
            prepared.append(message)
    if tools is not None and tools.active and not native:
        if prepared and prepared[0]["role"] == "system":
            prepared[0] = {**prepared[0], "content": prepared[0]["content"] + "\n\n" + tools.instructions()}
        else:
            prepared.insert(0, {"role": "system", "content": tools.instructions()})
    return prepared


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _function(tool: Any, where: str) -> Function:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise InvalidRequest(f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
    spec = tool["function"]
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(
            f"{where}.function.name must be 1-64 letters, digits, _ or -; got {name!r}", param=f"{where}.function.name"
        )
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequest(
            f"{where}.function.parameters must be a JSON Schema object", param=f"{where}.function.parameters"
        )
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequest(f"{where}.function.description must be a string", param=f"{where}.function.description")
    return Function(name, description, parameters)


def _forced_name(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if isinstance(name, str):
            return name
    raise InvalidRequest(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


def _arguments(call: dict[str, Any]) -> Any:
    text = call.get("function", {}).get("arguments", "{}")
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


def _fallback_calls(text: str) -> list[tuple[str, Any]] | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    calls = value.get("tool_calls") if isinstance(value, dict) else None
    if not isinstance(calls, list):
        return None
    return [
        (c["name"], c.get("arguments", {})) for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)
    ]


def _tagged_calls(text: str) -> list[tuple[str, Any]]:
    found = []
    for block in _TAGGED.findall(text):
        try:
            value = json.loads(block)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            found.append((value["name"], value.get("arguments", {})))
    return found


def answered_with_calls(completion: Completion, tools: Tools | None) -> Completion:
    """`completion`, or the same with its text read as function calls when it is one."""
    if tools is None or not tools.active:
        return completion
    calls = tools.read_calls(completion.text)
    if not calls:
        return completion
    return replace(completion, text="", finish_reason="tool_calls", tool_calls=tuple(calls))
