"""Message validation: what reaches a chat template is plain text, or the request is refused."""

from __future__ import annotations

import pytest

from slmflow.errors import InvalidRequest
from slmflow.generation.chat import validate_messages


def test_text_parts_are_joined_into_the_message_text() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    assert validate_messages([{"role": "user", "content": parts}]) == [{"role": "user", "content": "Hello, world"}]


@pytest.mark.parametrize(
    "parts",
    [
        [{"type": "text", "text": 0.0}],  # found by the schema fuzzer: a number passed as text
        [{"type": "text"}],
        [{"type": "image_url", "image_url": {"url": "http://x"}}],
        ["just a string"],
    ],
)
def test_parts_that_are_not_text_are_refused_naming_the_message(parts) -> None:
    with pytest.raises(InvalidRequest) as error:
        validate_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}])
    assert error.value.param == "messages[1].content"
