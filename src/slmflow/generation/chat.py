"""The model's own chat template, rendered the way transformers renders it (sandboxed Jinja)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from slmflow.errors import InvalidRequest, SlmflowError

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplate:
    """Renders OpenAI-style messages into the model's prompt text."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_model_dir(cls, folder: Path) -> ChatTemplate | None:
        """The template in `chat_template.jinja` or `tokenizer_config.json`, or None if there is none."""
        config = _read_json(folder / "tokenizer_config.json")
        source: Any = None
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text()
        elif config.get("chat_template"):
            source = config["chat_template"]
            if isinstance(source, list):  # named templates: the default one serves chat
                source = {t["name"]: t["template"] for t in source}.get("default")
        if not source:
            return None
        return cls(
            source, bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token"))
        )

    @cached_property
    def _compiled(self):  # jinja2.Template
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(self.source)
        except TemplateError as e:
            raise SlmflowError(f"the model's chat template does not compile: {e}") from e

    @property
    def knows_tools(self) -> bool:
        """Does the template render `tools` itself (as transformers passes them)?"""
        return "tools" in self.source

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools,
            )
        except TemplateError as e:
            raise InvalidRequest(f"the model's chat template rejected the messages: {e}", param="messages") from e


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI chat messages and return them as plain {role, content[, name]} dicts (an
    assistant's `tool_calls` and a tool result's `tool_call_id` kept)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", param=f"{where}.role")
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            calls = _tool_calls(calls, where)
        content = "" if calls and message.get("content") is None else _content_text(message.get("content"), where)
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if message.get("name"):
            entry["name"] = str(message["name"])
        if calls:
            entry["tool_calls"] = calls
        if role == "tool" and message.get("tool_call_id") is not None:
            entry["tool_call_id"] = str(message["tool_call_id"])
        clean.append(entry)
    return clean


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's earlier calls: [{id, type, function: {name, arguments}}], as OpenAI sends them."""
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        for c in calls
    ):
        raise InvalidRequest(
            f"{where}.tool_calls must be a list of {{id, type, function: {{name, arguments}}}}",
            param=f"{where}.tool_calls",
        )
    return [
        {
            "id": str(c.get("id", "")),
            "type": "function",
            "function": {"name": c["function"]["name"], "arguments": str(c["function"].get("arguments", "{}"))},
        }
        for c in calls
    ]


def _content_text(content: Any, where: str) -> str:
    """Plain text of a message: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _token_text(token: Any) -> str:
    if isinstance(token, dict):  # AddedToken serialised by older transformers
        return str(token.get("content", ""))
    return token or ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
