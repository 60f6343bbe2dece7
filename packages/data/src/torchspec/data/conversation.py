"""Normalize one conversation record to OpenAI-style ``{"role", "content", "reasoning_content"}`` messages.

Accepted message shapes, freely mixed within a conversation:

- OpenAI: ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``
- ShareGPT: ``{"from": "system" | "human" | "gpt", "value": str}``

Optional reasoning for an assistant turn is read from ``reasoning_content``, ``thinking`` or ``reasoning``
(first non-empty wins). Reasoning on other roles is ignored: only assistant text is ever supervised.
"""

from __future__ import annotations

from typing import Any

from torchspec.data.errors import DataError

__all__ = ["normalize_conversation"]

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool": "tool",
}


def normalize_conversation(messages: Any) -> list[dict[str, str | None]]:
    """Return ``messages`` as a new list of ``{"role", "content", "reasoning_content"}`` dicts.

    Raises ``DataError`` (message prefixed with the offending message index) for an empty or non-list
    conversation, an unknown role, non-string content, or an assistant turn with no content.
    """
    if not isinstance(messages, list):
        raise DataError(f"conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise DataError("conversation is empty; every record needs at least one message")
    return [_normalize_message(index, message) for index, message in enumerate(messages)]


def _normalize_message(index: int, message: Any) -> dict[str, str | None]:
    if not isinstance(message, dict):
        raise DataError(f"message {index}: expected an object with role/content, got {type(message).__name__}")
    raw_role = _first_present(message, ("role", "from"))
    if raw_role is None:
        raise DataError(f"message {index}: no 'role' (OpenAI) or 'from' (ShareGPT) key; keys are {sorted(message)}")
    role = _ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        raise DataError(f"message {index}: unknown role {raw_role!r}; use one of {sorted(_ROLE_ALIASES)}")

    content = _first_present(message, ("content", "value"))
    if not isinstance(content, str):
        raise DataError(
            f"message {index} ({role}): content must be a string, got {type(content).__name__}; "
            "flatten multi-part content to text before loading"
        )

    reasoning = None
    if role == "assistant":
        for key in _REASONING_KEYS:
            value = message.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"message {index} (assistant): '{key}' must be a string, got {type(value).__name__}")
            if value.strip():
                reasoning = value
                break
        if not content.strip():
            # Nothing the model answered: supervising only the end-of-turn token would teach the draft to
            # end turns immediately.
            raise DataError(f"message {index} (assistant): content is empty; drop the turn or the record")
    return {"role": role, "content": content, "reasoning_content": reasoning}


def _first_present(message: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if message.get(key) is not None:
            return message[key]
    return None
