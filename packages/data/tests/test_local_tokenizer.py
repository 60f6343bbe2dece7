"""build_local_tokenizer: deterministic, loadable, and carrying the templates' tokens and chat format."""

import pytest
from transformers import AutoTokenizer

from torchspec.data import DataError, build_local_tokenizer, get_template, list_templates, tokenize_conversation

from data_test_helpers import CONVERSATION, supervised_runs

SMALL_CORPUS = ["the cat sat on the mat", "two plus three is five", "count from one to four"] * 20


def test_same_inputs_give_the_same_tokenizer(tmp_path):
    build_local_tokenizer(tmp_path / "a", texts=SMALL_CORPUS, vocab_size=400, template=["llama3", "qwen3-thinking"])
    build_local_tokenizer(tmp_path / "b", texts=SMALL_CORPUS, vocab_size=400, template=["llama3", "qwen3-thinking"])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shared_tokenizer_has_every_template_token(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 2048
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    for name in list_templates():
        for token in get_template(name).special_tokens:
            assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
            assert (token in special) == (token not in ("<think>", "</think>"))


def test_single_template_sets_chat_format_bos_and_eos(tmp_path):
    tokenizer = build_local_tokenizer(tmp_path, texts=SMALL_CORPUS, vocab_size=400, template="llama3")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert tokenize_conversation(CONVERSATION, tokenizer, "hf") == tokenize_conversation(
        CONVERSATION, tokenizer, "llama3"
    )
    rendered = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("What is 2 plus 3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_default_corpus_tokenizes_sample_text_compactly(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sample = tokenize_conversation(CONVERSATION, tokenizer, "phi3")
    words = sum(len(m["content"].split()) for m in CONVERSATION)
    assert len(sample["input_ids"]) < 3 * words  # merges were learned, not bytes
    assert len(supervised_runs(sample)) == 3


def test_too_small_vocab_is_rejected(tmp_path):
    with pytest.raises(DataError, match="vocab_size=100 is too small"):
        build_local_tokenizer(tmp_path, texts=SMALL_CORPUS, vocab_size=100)
    with pytest.raises(DataError, match="unknown chat template"):
        build_local_tokenizer(tmp_path, texts=SMALL_CORPUS, template=["qwen", "nope"])
