"""Conversation -> ``input_ids`` and an assistant-only ``loss_mask``.

The template renders the conversation to text plus the character spans the target model generates (see
``templates`` and ``hf_chat_template``); the tokenizer encodes the text once with character offsets, and a
token is supervised when its first character lies inside one of those spans. A token with an empty offset
range (some tokenizers trim whitespace out of offsets) is judged by the character just before it.
Spans start and end next to special tokens or newlines, so a token rarely straddles a boundary; one that
does goes with the side holding its first character.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

from torchspec.data.conversation import normalize_conversation
from torchspec.data.errors import DataError
from torchspec.data.hf_chat_template import HFChatTemplateRenderer
from torchspec.data.templates import ChatTemplate, RenderedConversation, get_template

__all__ = ["ConversationEncoder", "tokenize_conversation", "tokenizer_fingerprint"]

HF_TEMPLATE = "hf"


class ConversationEncoder:
    """Tokenizes normalized conversations for one (tokenizer, template, options) choice.

    Checks the tokenizer against the template once, at construction.
    """

    def __init__(
        self,
        tokenizer,
        template: str | ChatTemplate,
        *,
        max_seq_length: int | None = None,
        keep_reasoning: bool = True,
        last_turn_only: bool = False,
        system_prompt: str | None = None,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(
                f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; character offsets need one: load it "
                "with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        if max_seq_length is not None and max_seq_length <= 0:
            raise DataError(f"max_seq_length must be a positive integer or None, got {max_seq_length}")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self._render_options: dict[str, Any] = dict(
            keep_reasoning=keep_reasoning, last_turn_only=last_turn_only, system_prompt=system_prompt
        )
        if isinstance(template, str) and template == HF_TEMPLATE:
            self.template: ChatTemplate | str = HF_TEMPLATE
            self._renderer: HFChatTemplateRenderer | ChatTemplate = HFChatTemplateRenderer(tokenizer)
        else:
            self.template = get_template(template) if isinstance(template, str) else template
            if not isinstance(self.template, ChatTemplate):
                raise DataError(f"template must be a name, a ChatTemplate or 'hf', got {type(template).__name__}")
            _check_special_tokens(tokenizer, self.template)
            self._renderer = self.template

    def template_definition(self) -> dict:
        """What the rendering depends on, for cache fingerprints."""
        if self.template == HF_TEMPLATE:
            return {"hf_chat_template": self.tokenizer.chat_template}
        return cast(ChatTemplate, self.template).definition()

    def render(self, messages: list[dict]) -> RenderedConversation:
        return self._renderer.render(messages, **self._render_options)

    def encode_batch(self, conversations: list[list[dict]]) -> list[dict]:
        """Encode normalized conversations; each result has ``input_ids``, ``loss_mask`` and ``truncated``."""
        return self.encode_rendered([self.render(messages) for messages in conversations])

    def encode_rendered(self, rendered: list[RenderedConversation]) -> list[dict]:
        # The Rust tokenizer directly: same ids and offsets as tokenizer(...), without per-sample wrapping.
        encodings = self.tokenizer.backend_tokenizer.encode_batch(
            [r.text for r in rendered],
            add_special_tokens=False,  # templates render BOS themselves
        )
        results = []
        for r, encoding in zip(rendered, encodings):
            input_ids, loss_mask = encoding.ids, _mask_from_spans(r.text, r.spans, encoding.offsets)
            truncated = self.max_seq_length is not None and len(input_ids) > self.max_seq_length
            if truncated:
                input_ids, loss_mask = input_ids[: self.max_seq_length], loss_mask[: self.max_seq_length]
            results.append({"input_ids": input_ids, "loss_mask": loss_mask, "truncated": truncated})
        return results


def tokenize_conversation(
    conversation: list[dict],
    tokenizer,
    template: str | ChatTemplate,
    max_seq_length: int | None = None,
    keep_reasoning: bool = True,
    last_turn_only: bool = False,
    system_prompt: str | None = None,
    return_attention_mask: bool = False,
) -> dict[str, list[int]]:
    """Tokenize one conversation (OpenAI- or ShareGPT-style messages).

    ``template`` is a registered name (``list_templates()``), a ``ChatTemplate``, or ``"hf"`` for the
    tokenizer's own chat_template. Returns ``input_ids`` and ``loss_mask`` (1 on tokens the assistant
    generates: content, kept reasoning, end-of-turn), plus an all-ones ``attention_mask`` when asked.
    ``system_prompt`` applies when the conversation has no system message; with a registry template it
    replaces the template's default and ``""`` renders none, with ``"hf"`` it is inserted as a system
    message (the Jinja template's own default then cannot be switched off).
    """
    encoder = ConversationEncoder(
        tokenizer,
        template,
        max_seq_length=max_seq_length,
        keep_reasoning=keep_reasoning,
        last_turn_only=last_turn_only,
        system_prompt=system_prompt,
    )
    (encoded,) = encoder.encode_batch([normalize_conversation(conversation)])
    sample = {"input_ids": encoded["input_ids"], "loss_mask": encoded["loss_mask"]}
    if return_attention_mask:
        sample["attention_mask"] = [1] * len(encoded["input_ids"])
    return sample


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides how the tokenizer maps text to ids, plus its chat_template."""
    state = {
        "class": type(tokenizer).__name__,
        "tokenizer_json": tokenizer.backend_tokenizer.to_str(),
        "chat_template": tokenizer.chat_template,
        "special_tokens": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _mask_from_spans(text: str, spans, offsets) -> list[int]:
    # One flag per character, plus a trailing 0 that a zero-width token at offset 0 reads (index -1).
    inside = bytearray(len(text) + 1)
    for start, end in spans:
        inside[start:end] = b"\x01" * (end - start)
    return [inside[start if end > start else start - 1] for start, end in offsets]


def _check_special_tokens(tokenizer, template: ChatTemplate) -> None:
    vocab = tokenizer.get_vocab()
    for token in template.special_tokens:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if token not in vocab or len(ids) != 1 or ids[0] != vocab[token]:
            raise DataError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!s} has no single "
                f"token for {token!r}, which template {template.name!r} needs; pick the template of the target "
                "model, or template='hf' to use the tokenizer's own chat_template"
            )
