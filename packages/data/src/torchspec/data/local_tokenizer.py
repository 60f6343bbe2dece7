"""A small byte-level BPE tokenizer built offline, for no-network runs and tests.

It carries the special tokens of the chosen templates and, as its ``chat_template``, the Jinja export of
the first one, so both registry and ``"hf"`` modes work with it. Training is single-threaded over a fixed
corpus, so the same arguments always give the same ``tokenizer.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from torchspec.data.errors import DataError
from torchspec.data.jinja_template import template_to_jinja
from torchspec.data.sample_data import sample_texts
from torchspec.data.templates import ChatTemplate, get_template

__all__ = ["build_local_tokenizer"]

# Kept out of the special set, as in the Qwen3 and DeepSeek vocabularies: decoding with
# skip_special_tokens=True keeps the reasoning markers.
_PLAIN_ADDED_TOKENS = ("<think>", "</think>")
_PAD_TOKEN = "<|endoftext|>"
# Words that templates render as plain text (role names, harmony channels), so they are single tokens.
_TEMPLATE_WORDS = ["system", "user", "assistant", "tool", "ipython", "analysis", "final", "tool_response"]


def build_local_tokenizer(
    output_dir: str | os.PathLike,
    texts: Iterable[str] | None = None,
    vocab_size: int = 2048,
    template: str | ChatTemplate | Sequence[str | ChatTemplate] = "qwen",
):
    """Train a byte-level BPE tokenizer of exactly ``vocab_size`` tokens, save it to ``output_dir`` and
    return it reloaded from there.

    ``texts`` defaults to the bundled sample conversations. ``template`` is one template or a list: the
    tokenizer gets every listed template's special tokens, and the first one's chat format as Jinja
    ``chat_template``, BOS and EOS (its final end-of-turn token). ``AutoTokenizer.from_pretrained(output_dir)``
    loads the result.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    chosen = [template] if isinstance(template, (str, ChatTemplate)) else list(template)
    if not chosen:
        raise DataError("build_local_tokenizer needs at least one template name")
    templates = [get_template(t) if isinstance(t, str) else t for t in chosen]

    special: list[str] = [_PAD_TOKEN]
    plain: list[str] = []
    for t in templates:
        for token in t.special_tokens:
            bucket = plain if token in _PLAIN_ADDED_TOKENS else special
            if token not in bucket:
                bucket.append(token)
    minimum = 256 + len(special) + len(plain)
    if vocab_size < minimum:
        raise DataError(f"vocab_size={vocab_size} is too small: the byte alphabet and special tokens need {minimum}")

    corpus = list(texts) if texts is not None else sample_texts()
    corpus += _TEMPLATE_WORDS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Untrimmed offsets: whitespace tokens keep their own characters, which the loss mask relies on.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(plain),
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in plain])
    # A small corpus runs out of merges before vocab_size; reserved tokens fill the rest (as Llama's do),
    # so len(tokenizer) == vocab_size and model configs can rely on it.
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - tokenizer.get_vocab_size())]
    tokenizer.add_special_tokens(reserved)

    primary = templates[0]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=primary.bos or None,
        eos_token=primary.last_end_of_turn or primary.end_of_turn,
        pad_token=_PAD_TOKEN,
        chat_template=template_to_jinja(primary),
        model_max_length=131072,
    )
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(output_dir)
    return AutoTokenizer.from_pretrained(output_dir)
