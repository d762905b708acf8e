"""Tool calling's pure parts: checking tools and tool_choice, the prompt, reading calls back."""

from __future__ import annotations

import json

import pytest

from slmflow.errors import InvalidRequest
from slmflow.generation.openai import Completion, Usage
from slmflow.generation.tools import Tools, answered_with_calls, may_be_a_call, prepare_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ("get_weather", None, "tools"),
        ([{"type": "function"}], None, "tools[0]"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            None,
            "tools[0].function.parameters",
        ),
        ([WEATHER, WEATHER], None, "tools"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tools_name_the_field(tools, choice, param: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        Tools.parse(tools, choice)
    assert error.value.param == param


@pytest.mark.parametrize("tools", [None, [], [WEATHER]])
def test_parallel_tool_calls_must_be_a_boolean_with_or_without_tools(tools) -> None:
    # Found by the schema fuzzer: with no tools, parallel_tool_calls=2 used to pass unchecked.
    with pytest.raises(InvalidRequest) as error:
        Tools.parse(tools, None, 2)
    assert error.value.param == "parallel_tool_calls"


def test_choices_and_the_guidance_that_holds_a_call_to_its_schema() -> None:
    assert Tools.parse(None) is None and Tools.parse([], "none") is None
    auto = Tools.parse([WEATHER, TIME])
    assert (auto.choice, auto.constrained, auto.active) == ("auto", False, True)
    assert not Tools.parse([WEATHER], "none").active
    forced = Tools.parse([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    kind, grammar = forced.guidance()
    schema = json.loads(grammar)
    calls = schema["properties"]["tool_calls"]
    assert kind == "json_schema" and calls["maxItems"] == 1
    assert [c["properties"]["name"]["const"] for c in calls["items"]["anyOf"]] == ["get_time"]
    required = json.loads(Tools.parse([WEATHER, TIME], "required", parallel_tool_calls=True).guidance()[1])
    assert required["properties"]["tool_calls"]["maxItems"] == 8  # parallel calls, but not without end
    assert [c["properties"]["arguments"] for c in required["properties"]["tool_calls"]["items"]["anyOf"]] == [
        WEATHER["function"]["parameters"],
        TIME["function"]["parameters"],
    ]


def test_calls_are_read_in_both_formats_and_only_for_known_functions() -> None:
    tools = Tools.parse([WEATHER, TIME])
    ours = tools.read_calls(
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]}'
    )
    assert [(c.name, json.loads(c.arguments)) for c in ours] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c.id.startswith("call_") for c in ours) and len({c.id for c in ours}) == 2
    tagged = tools.read_calls('Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert [c.name for c in tagged] == ["get_time"]
    assert tools.read_calls("It is sunny in Paris.") is None
    assert tools.read_calls('{"tool_calls": [{"name": "launch_rockets", "arguments": {}}]}') is None
    single = Tools.parse([WEATHER, TIME], parallel_tool_calls=False)
    assert len(single.read_calls('{"tool_calls": [{"name": "get_time"}, {"name": "get_time"}]}')) == 1


def test_a_completion_that_is_a_call_becomes_tool_calls() -> None:
    usage = Usage(10, 5)
    call = Completion('{"tool_calls": [{"name": "get_time", "arguments": {}}]}', "stop", usage)
    answered = answered_with_calls(call, Tools.parse([TIME]))
    assert (answered.text, answered.finish_reason, answered.tool_calls[0].name) == ("", "tool_calls", "get_time")
    plain = Completion("It is noon.", "stop", usage)
    assert answered_with_calls(plain, Tools.parse([TIME])) == plain
    assert answered_with_calls(call, None) == call and answered_with_calls(call, Tools.parse([TIME], "none")) == call


def test_text_that_may_begin_a_call_is_held_back() -> None:
    assert may_be_a_call("") and may_be_a_call("  {") and may_be_a_call("<tool") and may_be_a_call("<tool_call>{")
    assert not may_be_a_call("The") and not may_be_a_call("<b>")


def test_the_fallback_prompt_lists_the_functions_and_writes_the_history_readably() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"},
    ]
    prepared = prepare_messages(history, Tools.parse([WEATHER]), native=False)
    assert prepared[0]["role"] == "system" and prepared[0]["content"].startswith(
        "Be brief.\n\nYou may call these functions"
    )
    assert "get_weather" in prepared[0]["content"] and '"tool_calls"' in prepared[0]["content"]
    assert json.loads(prepared[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    }
    assert prepared[3] == {"role": "user", "content": "Result of tool call call_1: 18 C, sunny"}
    # A template that knows tools gets the history as it is.
    assert prepare_messages(history, Tools.parse([WEATHER]), native=True) == history


def test_a_template_that_knows_tools_gets_them_as_transformers_passes_them() -> None:
    from slmflow.generation.chat import ChatTemplate

    source = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}"
        "<tool_call>{{ c.function.name }}</tool_call>{% endfor %}</{{ m.role }}>{% endfor %}"
    )
    template = ChatTemplate(source)
    assert template.knows_tools and not ChatTemplate("{{ messages[0].content }}").knows_tools
    tools = Tools.parse([WEATHER])
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    shown = [f.as_openai() for f in tools.functions]
    rendered = template.render(prepare_messages(history, tools, native=True), tools=shown)
    assert rendered.startswith("<tools>[{") and '"name": "get_weather"' in rendered
    assert "<assistant><tool_call>get_weather</tool_call></assistant><tool>sunny</tool>" in rendered
    assert "You may call" not in rendered  # no fallback instructions for a template that knows tools
