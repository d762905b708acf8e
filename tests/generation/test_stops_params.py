from __future__ import annotations

import pytest

from slmflow.errors import InvalidRequest
from slmflow.generation.params import SamplingParams, guidance_for
from slmflow.generation.stops import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_string_split_across_pieces_is_never_emitted() -> None:
    text, stopped = feed_all(StopMatcher(("STOP",)), ["Hello S", "TO", "P world"])
    assert (text, stopped) == ("Hello ", True)


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("ab ST") == ("ab ", False)  # "ST" held back
    assert matcher.feed("ay") == ("STay", False)


def test_earliest_of_several_stops_wins() -> None:
    text, stopped = feed_all(StopMatcher(("world", "lo")), ["hello world"])
    assert (text, stopped) == ("hel", True)


def test_without_stops_everything_passes_through() -> None:
    assert feed_all(StopMatcher(()), ["a", "b"]) == ("ab", False)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"seed": True}, "seed"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, "response_format"),
    ],
)
def test_invalid_fields_name_the_parameter(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        SamplingParams.from_mapping(fields)
    assert error.value.param == param


def test_valid_fields_are_kept_and_unknown_ones_ignored() -> None:
    params = SamplingParams.from_mapping(
        {"temperature": 0, "top_p": 1, "max_completion_tokens": 7, "stop": "x", "seed": 3, "logit_bias": {}}
    )
    assert params == SamplingParams(max_tokens=7, temperature=0.0, top_p=1.0, stop=("x",), seed=3)
    assert params.greedy


def test_merge_takes_unset_fields_from_defaults() -> None:
    merged = SamplingParams(max_tokens=5).merged_over(SamplingParams(max_tokens=9, temperature=0.7, top_k=4))
    assert merged == SamplingParams(max_tokens=5, temperature=0.7, top_k=4)


def test_json_object_maps_to_a_compact_object_schema() -> None:
    kind, schema = guidance_for({"type": "json_object"})
    assert kind == "json_schema"
    assert '"type": "object"' in schema and '"whitespace_flexible": false' in schema


def test_seed_zero_is_a_seed_and_choices_get_distinct_reproducible_seeds() -> None:
    params = SamplingParams(seed=0).merged_over(SamplingParams(seed=5, temperature=1.0))
    assert params.seed == 0
    assert [params.for_choice(i).seed for i in range(3)] == [0, 1, 2]
    assert SamplingParams().for_choice(2).seed is None
