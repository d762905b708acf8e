"""OpenAI tool calling through `slmflow serve`, with the real `openai` SDK: on the tiny fixture (any
arguments it writes must validate) and on the real model (it must also write the right ones)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import jsonschema_rs
import mlflow
import openai
import pytest

from slmflow.server import ServerSettings
from tests.server.conftest import SPAIN, LiveServer, serve

# Bounded (lengths, ranges, no extra properties), as a real tool's schema should be: a model that
# never closes a string (the tiny fixture was never taught JSON) still ends its call in a few tokens.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 999},
                "b": {"type": "integer", "minimum": 0, "maximum": 999},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: jsonschema_rs.validator_for(t["function"]["parameters"]) for t in (WEATHER, ADD)}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def assert_valid_call(call) -> dict:
    """A call names one of the tools and its arguments parse and validate against its schema."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert SCHEMAS[call.function.name].is_valid(arguments), (call.function.name, arguments)
    return arguments


def test_a_required_call_always_validates_even_when_requests_run_together(client) -> None:
    forced = client.chat.completions.create(model="tiny", messages=SPAIN, tools=[WEATHER, ADD], tool_choice="required")
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls and all(assert_valid_call(c) is not None for c in choice.message.tool_calls)

    async def concurrently(server_client) -> list:
        async with server_client as aclient:
            named = {"type": "function", "function": {"name": "add"}}
            return await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model="tiny", messages=SPAIN, tools=[WEATHER, ADD], tool_choice=named, temperature=t
                    )
                    for t in (0.0, 0.7, 1.0, 1.3)
                )
            )

    for response in asyncio.run(concurrently(client_async(client))):
        [call] = response.choices[0].message.tool_calls  # a named function: exactly one call
        assert call.function.name == "add" and set(assert_valid_call(call)) >= {"a", "b"}


def client_async(client: openai.OpenAI) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0, timeout=60)


def test_streamed_tool_call_deltas_reassemble_to_the_call(client) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(
        model="tiny", messages=PARIS, tools=[WEATHER], tool_choice=named, temperature=0
    ).choices[0]
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=PARIS, tools=[WEATHER], tool_choice=named, temperature=0, stream=True
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert all(d.index == 0 and d.id is None for d in deltas[1:])  # then argument pieces only
    assert "".join(d.function.arguments or "" for d in deltas) == whole.message.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # the call is never sent as content


def test_a_call_then_its_result_then_an_answer(client) -> None:
    first = client.chat.completions.create(model="tiny", messages=PARIS, tools=[WEATHER], tool_choice="required")
    message = first.choices[0].message
    history = [
        *PARIS,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in message.tool_calls]},
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 18, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"messages": [{"role": "assistant", "tool_calls": "call it"}]}, "messages[0].tool_calls"),
    ],
)
def test_bad_tool_definitions_are_a_400_in_the_envelope(client, fields: dict, param: str) -> None:
    body = {"model": "tiny", "messages": PARIS, **fields}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**body)
    assert error.value.status_code == 400 and error.value.body["param"] == param
    assert error.value.body["type"] == "invalid_request_error"


def test_tools_through_the_pyfunc(onnx_model_path) -> None:
    model = mlflow.pyfunc.load_model(str(onnx_model_path))
    [response] = model.predict({"messages": PARIS, "tools": [WEATHER]}, params={"tool_choice": "get_weather"})
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert SCHEMAS["get_weather"].is_valid(json.loads(call["function"]["arguments"]))


@pytest.fixture(scope="module")
def smol_server(smol_default: dict) -> Iterator[LiveServer]:
    """SmolLM2 as the suite registers it (the GGUF at the default int8), not converted again."""
    settings = ServerSettings(model_uri="models:/smol@champion", model_name="smol", traces=False, metrics_interval=0)
    yield from serve(settings)


def test_the_real_model_calls_the_right_function_with_the_right_arguments(smol_server: LiveServer) -> None:
    client = smol_server.client()
    response = client.chat.completions.create(
        model="smol", messages=PARIS, tools=[WEATHER, ADD], tool_choice="required", temperature=0
    )
    [call] = response.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert assert_valid_call(call)["city"] == "Paris"
