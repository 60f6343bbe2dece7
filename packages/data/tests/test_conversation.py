"""Message normalization: both record shapes in, one shape out, one-line errors for the rest."""

import pytest

from torchspec.data import DataError, normalize_conversation


def test_openai_and_sharegpt_messages_normalize_to_the_same_form():
    openai = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "R"},
        {"role": "tool", "content": "T"},
    ]
    sharegpt = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q"},
        {"from": "gpt", "value": "A", "thinking": "R"},
        {"from": "tool", "value": "T"},
    ]
    expected = [
        {"role": "system", "content": "S", "reasoning_content": None},
        {"role": "user", "content": "Q", "reasoning_content": None},
        {"role": "assistant", "content": "A", "reasoning_content": "R"},
        {"role": "tool", "content": "T", "reasoning_content": None},
    ]
    assert normalize_conversation(openai) == expected
    assert normalize_conversation(sharegpt) == expected


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_every_reasoning_field_is_read(key):
    (message,) = normalize_conversation([{"role": "assistant", "content": "A", key: "why"}])
    assert message["reasoning_content"] == "why"


def test_blank_reasoning_and_non_assistant_reasoning_are_dropped():
    messages = normalize_conversation(
        [{"role": "user", "content": "Q", "reasoning": "x"}, {"role": "assistant", "content": "A", "thinking": " \n"}]
    )
    assert [m["reasoning_content"] for m in messages] == [None, None]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "conversation is empty"),
        ({"role": "user"}, "must be a list of messages, got dict"),
        ([{"role": "narrator", "content": "x"}], r"message 0: unknown role 'narrator'; use one of"),
        ([{"content": "x"}], "message 0: no 'role' .* or 'from'"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}],
            r"message 1 \(assistant\): content must be a string, got list",
        ),
        ([{"role": "user", "content": None}], "content must be a string, got NoneType"),
        ([{"role": "assistant", "content": "   "}], "content is empty"),
        (["hello"], "expected an object with role/content, got str"),
        ([{"role": "assistant", "content": "a", "reasoning_content": 3}], "'reasoning_content' must be a string"),
    ],
)
def test_bad_messages_raise_one_line_errors(messages, match):
    with pytest.raises(DataError, match=match) as raised:
        normalize_conversation(messages)
    assert "\n" not in str(raised.value)
