"""Assistant spans from the tokenizer's own Jinja ``chat_template`` (template ``"hf"``).

No registry entry is needed: the layout is recovered from renders of the template itself.

- The conversation is rendered once as is, and once with every assistant content replaced by a unique
  placeholder. Putting the contents back into the placeholder render must give the real render exactly;
  that locates every assistant content to the character (a template that trims content is matched by
  trying the trimmed content too).
- For assistant message ``i``, the render of ``messages[:i]`` must be a prefix of the full render (the
  template does not rewrite history once later turns follow; an end-of-chat suffix such as Phi-3's EOS
  is cut off at the last special token or newline). The generation prompt, the text that
  ``add_generation_prompt=True`` appends, is what the server inserts, so it is context; the assistant's own
  text starts where it ends. The one departure accepted is a thinking template whose prompt opens a
  think block the turn does not have: the turn then starts where the ``<think>`` opener would be.
- An empty think block right after that point (``<think>`` + whitespace + ``</think>``) is context.
- The turn ends with the first special token after the content, which must follow it with nothing but
  whitespace in between: that is the end-of-turn token the model emits. Text after it is context.

Every failed step raises ``DataError``: a wrong mask silently trains the draft on the wrong tokens.
"""

from __future__ import annotations

import re

from torchspec.data.errors import DataError
from torchspec.data.templates import RenderedConversation

__all__ = ["HFChatTemplateRenderer"]

_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


class HFChatTemplateRenderer:
    """Renders normalized messages with ``tokenizer.apply_chat_template`` and finds the assistant spans."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"template 'hf' needs a tokenizer with a chat_template, and {type(tokenizer).__name__} "
                f"({getattr(tokenizer, 'name_or_path', '?')}) has none; pass a registry template name instead"
            )
        self._tokenizer = tokenizer
        special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        special.update(tokenizer.all_special_tokens)
        special.discard("")
        if not special:
            raise DataError("template 'hf' needs special tokens to find end-of-turn tokens, and the tokenizer has none")
        self._special = re.compile("|".join(re.escape(token) for token in sorted(special, key=len, reverse=True)))

    def render(
        self,
        messages: list[dict],
        *,
        keep_reasoning: bool = True,
        last_turn_only: bool = False,
        system_prompt: str | None = None,
    ) -> RenderedConversation:
        chat = [_to_chat_message(message, keep_reasoning) for message in messages]
        if system_prompt and chat[0]["role"] != "system":
            chat.insert(0, {"role": "system", "content": system_prompt})

        assistant_positions = [i for i, message in enumerate(chat) if message["role"] == "assistant"]
        full = self._apply(chat, add_generation_prompt=False)
        if not assistant_positions:
            return RenderedConversation(full, ())
        content_ranges = self._locate_contents(chat, assistant_positions, full)

        supervised = assistant_positions[-1:] if last_turn_only else assistant_positions
        spans = []
        for position in supervised:
            start = self._generated_start(chat, position, full)
            content_start, content_end = content_ranges[position]
            if start > content_start:
                raise DataError(
                    f"assistant message {position}: the chat_template's generation prompt overlaps the message "
                    "content; use a registry template"
                )
            end_of_turn = self._special.search(full, content_end)
            if end_of_turn is None or full[content_end : end_of_turn.start()].strip():
                raise DataError(
                    f"assistant message {position}: no special end-of-turn token right after its content in the "
                    "chat_template render; use a registry template"
                )
            spans.append((start, end_of_turn.end()))
        return RenderedConversation(full, tuple(spans))

    def _apply(self, chat: list[dict], *, add_generation_prompt: bool) -> str:
        try:
            text = self._tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as error:  # Jinja raises its own types, and templates call raise_exception()
            raise DataError(f"the tokenizer's chat_template failed to render: {error}") from error
        if not isinstance(text, str):
            raise DataError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
        return text

    def _locate_contents(self, chat: list[dict], positions: list[int], full: str) -> dict[int, tuple[int, int]]:
        """Character range of every assistant content in ``full``, via a placeholder render."""
        placeholders = {position: f"\ue000{position}\ue001" for position in positions}
        marked_chat = [
            {**message, "content": placeholders[i]} if i in placeholders else message for i, message in enumerate(chat)
        ]
        marked = self._apply(marked_chat, add_generation_prompt=False)
        for strip in (False, True):  # templates that `| trim` the content render it stripped
            pieces, ranges, cursor, last = [], {}, 0, 0
            for position in positions:
                at = marked.find(placeholders[position], last)
                if at < 0:
                    raise DataError(
                        f"assistant message {position}: the chat_template does not render its content; "
                        "use a registry template"
                    )
                content = chat[position]["content"].strip() if strip else chat[position]["content"]
                pieces.append(marked[last:at])
                cursor += at - last
                ranges[position] = (cursor, cursor + len(content))
                pieces.append(content)
                cursor += len(content)
                last = at + len(placeholders[position])
            pieces.append(marked[last:])
            if "".join(pieces) == full:
                return ranges
        raise DataError(
            "the chat_template rewrites assistant content (beyond trimming whitespace), so its tokens cannot be "
            "located; use a registry template"
        )

    def _generated_start(self, chat: list[dict], position: int, full: str) -> int:
        """Where the model's own text of assistant message ``position`` begins in ``full``."""
        history = self._apply(chat[:position], add_generation_prompt=False) if position else ""
        prompt = self._apply(chat[:position], add_generation_prompt=True)
        if not prompt.startswith(history):
            # Some templates end a finished chat with EOS instead of a generation prompt (Phi-3 does):
            # the shared part, cut back to a token boundary, is the history.
            shared = _common_prefix_length(prompt, 0, history)
            history = prompt[: max(b for b in self._boundaries(prompt) if b <= shared)]
        if prompt == history:
            raise DataError(
                "the chat_template ignores add_generation_prompt, so the assistant header cannot be told apart "
                "from the content; use a registry template"
            )
        if not full.startswith(history):
            raise DataError(
                f"assistant message {position}: the chat_template renders earlier turns differently once later "
                "turns follow; set last_turn_only=True or use a registry template"
            )
        generation_prompt = prompt[len(history) :]
        matched = _common_prefix_length(full, len(history), generation_prompt)
        if matched < len(generation_prompt):
            # The one departure we accept: a prompt that opens a think block the turn does not have.
            matched = max(b for b in self._boundaries(generation_prompt) if b <= matched)
            if matched == 0 or not generation_prompt[matched:].lstrip().startswith("<think>"):
                raise DataError(
                    f"assistant message {position}: the assistant header {generation_prompt!r} never appears in "
                    "the rendered text; use a registry template"
                )
        start = len(history) + matched
        empty_think = _EMPTY_THINK.match(full, start)
        return empty_think.end() if empty_think else start

    def _boundaries(self, text: str) -> list[int]:
        boundaries = [0]
        boundaries += [match.end() for match in self._special.finditer(text)]
        boundaries += [i + 1 for i, char in enumerate(text) if char == "\n"]
        return boundaries


def _to_chat_message(message: dict, keep_reasoning: bool) -> dict:
    chat_message = {"role": message["role"], "content": message["content"]}
    if keep_reasoning and message.get("reasoning_content"):
        chat_message["reasoning_content"] = message["reasoning_content"]
    return chat_message


def _common_prefix_length(text: str, offset: int, prefix: str) -> int:
    length = 0
    for a, b in zip(text[offset : offset + len(prefix)], prefix):
        if a != b:
            break
        length += 1
    return length
