"""Registry templates: rendered text and loss mask, token by token, against hand-written expectations."""

import dataclasses

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from torchspec.data import (
    DataError,
    build_local_tokenizer,
    get_template,
    list_templates,
    normalize_conversation,
    tokenize_conversation,
)

from data_test_helpers import ASSISTANT_CONTENTS, CONVERSATION, REASONING, supervised_runs

# The full text each template renders for CONVERSATION (reasoning kept), written out by hand.
EXPECTED_TEXT = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 plus 3 is 5.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSpell cat.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nC-A-T.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCount from 1 to 4.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n1, 2, 3, 4.<|eot_id|>"
    ),
    "llama4": (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou answer briefly.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2 plus 3?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n2 plus 3 is 5.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nSpell cat.<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nC-A-T.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nCount from 1 to 4.<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n1, 2, 3, 4.<|eot|>"
    ),
    "qwen": (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 plus 3 is 5.<|im_end|>\n"
        "<|im_start|>user\nSpell cat.<|im_end|>\n"
        "<|im_start|>assistant\nC-A-T.<|im_end|>\n"
        "<|im_start|>user\nCount from 1 to 4.<|im_end|>\n"
        "<|im_start|>assistant\n1, 2, 3, 4.<|im_end|>\n"
    ),
    "qwen3-instruct": (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n2 plus 3 is 5.<|im_end|>\n"
        "<|im_start|>user\nSpell cat.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nC-A-T.<|im_end|>\n"
        "<|im_start|>user\nCount from 1 to 4.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n1, 2, 3, 4.<|im_end|>\n"
    ),
    "qwen3-thinking": (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd 2 and 3 to get 5.\n</think>\n\n2 plus 3 is 5.<|im_end|>\n"
        "<|im_start|>user\nSpell cat.<|im_end|>\n"
        "<|im_start|>assistant\nC-A-T.<|im_end|>\n"
        "<|im_start|>user\nCount from 1 to 4.<|im_end|>\n"
        "<|im_start|>assistant\n1, 2, 3, 4.<|im_end|>\n"
    ),
    "deepseek-v3": (
        "<｜begin▁of▁sentence｜>You answer briefly.<｜User｜>What is 2 plus 3?"
        "<｜Assistant｜>2 plus 3 is 5.<｜end▁of▁sentence｜>"
        "<｜User｜>Spell cat.<｜Assistant｜>C-A-T.<｜end▁of▁sentence｜>"
        "<｜User｜>Count from 1 to 4.<｜Assistant｜>1, 2, 3, 4.<｜end▁of▁sentence｜>"
    ),
    "deepseek-r1-distill": (
        "<｜begin▁of▁sentence｜>You answer briefly.<｜User｜>What is 2 plus 3?"
        "<｜Assistant｜><think>\nAdd 2 and 3 to get 5.\n</think>\n\n2 plus 3 is 5.<｜end▁of▁sentence｜>"
        "<｜User｜>Spell cat.<｜Assistant｜>C-A-T.<｜end▁of▁sentence｜>"
        "<｜User｜>Count from 1 to 4.<｜Assistant｜>1, 2, 3, 4.<｜end▁of▁sentence｜>"
    ),
    "kimi-k2-instruct": (
        "<|im_system|>system<|im_middle|>You answer briefly.<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 2 plus 3?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>2 plus 3 is 5.<|im_end|>"
        "<|im_user|>user<|im_middle|>Spell cat.<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>C-A-T.<|im_end|>"
        "<|im_user|>user<|im_middle|>Count from 1 to 4.<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>1, 2, 3, 4.<|im_end|>"
    ),
    "kimi-k2-thinking": (
        "<|im_system|>system<|im_middle|>You answer briefly.<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 2 plus 3?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>Add 2 and 3 to get 5.</think>2 plus 3 is 5.<|im_end|>"
        "<|im_user|>user<|im_middle|>Spell cat.<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>C-A-T.<|im_end|>"
        "<|im_user|>user<|im_middle|>Count from 1 to 4.<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>1, 2, 3, 4.<|im_end|>"
    ),
    "phi3": (
        "<|system|>\nYou answer briefly.<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n"
        "<|assistant|>\n2 plus 3 is 5.<|end|>\n<|user|>\nSpell cat.<|end|>\n<|assistant|>\nC-A-T.<|end|>\n"
        "<|user|>\nCount from 1 to 4.<|end|>\n<|assistant|>\n1, 2, 3, 4.<|end|>\n"
    ),
    "phi4": (
        "<|im_start|>system<|im_sep|>You answer briefly.<|im_end|><|im_start|>user<|im_sep|>What is 2 plus 3?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>2 plus 3 is 5.<|im_end|><|im_start|>user<|im_sep|>Spell cat.<|im_end|>"
        "<|im_start|>assistant<|im_sep|>C-A-T.<|im_end|><|im_start|>user<|im_sep|>Count from 1 to 4.<|im_end|>"
        "<|im_start|>assistant<|im_sep|>1, 2, 3, 4.<|im_end|>"
    ),
    "gpt-oss": (
        "<|start|>system<|message|>You answer briefly.<|end|><|start|>user<|message|>What is 2 plus 3?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Add 2 and 3 to get 5.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>2 plus 3 is 5.<|end|>"
        "<|start|>user<|message|>Spell cat.<|end|><|start|>assistant<|channel|>final<|message|>C-A-T.<|end|>"
        "<|start|>user<|message|>Count from 1 to 4.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>1, 2, 3, 4.<|return|>"
    ),
}

# What the model generates in each assistant turn: the supervised text, turn by turn.
_EOT = {
    "llama3": "<|eot_id|>",
    "llama4": "<|eot|>",
    "qwen": "<|im_end|>",
    "qwen3-instruct": "<|im_end|>",
    "qwen3-thinking": "<|im_end|>",
    "deepseek-v3": "<｜end▁of▁sentence｜>",
    "deepseek-r1-distill": "<｜end▁of▁sentence｜>",
    "kimi-k2-instruct": "<|im_end|>",
    "kimi-k2-thinking": "<|im_end|>",
    "phi3": "<|end|>",
    "phi4": "<|im_end|>",
}


def expected_generated(name: str, keep_reasoning: bool) -> list[str]:
    if name == "gpt-oss":
        turns = [f"<|channel|>final<|message|>{c}<|end|>" for c in ASSISTANT_CONTENTS]
        turns[-1] = turns[-1].replace("<|end|>", "<|return|>")
        if keep_reasoning:
            turns[0] = f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant" + turns[0]
        return turns
    turns = [c + _EOT[name] for c in ASSISTANT_CONTENTS]
    if keep_reasoning and name in ("qwen3-thinking", "deepseek-r1-distill"):
        turns[0] = f"{REASONING}\n</think>\n\n" + turns[0]  # the opener "<think>\n" is in the prompt
    if keep_reasoning and name == "kimi-k2-thinking":
        turns[0] = f"<think>{REASONING}</think>" + turns[0]
    return turns


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_registry_covers_the_required_templates():
    assert set(EXPECTED_TEXT) <= set(list_templates())


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
@pytest.mark.parametrize("keep_reasoning", [True, False])
def test_mask_is_exactly_the_generated_text(tokenizer_for, name, keep_reasoning):
    tokenizer = tokenizer_for(name)
    sample = tokenize_conversation(CONVERSATION, tokenizer, name, keep_reasoning=keep_reasoning)

    assert len(sample["input_ids"]) == len(sample["loss_mask"]) and set(sample["loss_mask"]) == {0, 1}
    if keep_reasoning:
        assert decode(tokenizer, sample["input_ids"]) == EXPECTED_TEXT[name]
    runs = supervised_runs(sample)
    assert [decode(tokenizer, run) for run in runs] == expected_generated(name, keep_reasoning)
    # Each supervised run ends with the single end-of-turn token the model emits.
    end_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|return|>", _EOT.get(name, "<|end|>"))}
    assert all(run[-1] in end_ids for run in runs)


@pytest.mark.parametrize("name", ["qwen", "gpt-oss", "kimi-k2-thinking", "deepseek-r1-distill"])
def test_last_turn_only_supervises_the_final_answer(tokenizer_for, name):
    tokenizer = tokenizer_for(name)
    sample = tokenize_conversation(CONVERSATION, tokenizer, name, last_turn_only=True)
    full = tokenize_conversation(CONVERSATION, tokenizer, name)
    assert sample["input_ids"] == full["input_ids"]
    assert [decode(tokenizer, run) for run in supervised_runs(sample)] == expected_generated(name, True)[-1:]


def test_reasoning_on_the_last_turn_only_is_supervised_when_kept(tokenizer_for):
    tokenizer = tokenizer_for("qwen3-thinking")
    conversation = CONVERSATION[:-1] + [{"role": "assistant", "content": "1, 2, 3, 4.", "thinking": "Count up."}]
    runs = supervised_runs(tokenize_conversation(conversation, tokenizer, "qwen3-thinking", last_turn_only=True))
    assert [decode(tokenizer, r) for r in runs] == ["Count up.\n</think>\n\n1, 2, 3, 4.<|im_end|>"]


def test_blank_reasoning_renders_as_no_reasoning(tokenizer_for):
    tokenizer = tokenizer_for("kimi-k2-thinking")
    blank = [dict(m, reasoning_content="  \n ") if m["role"] == "assistant" else m for m in CONVERSATION]
    without = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CONVERSATION]
    assert tokenize_conversation(blank, tokenizer, "kimi-k2-thinking") == tokenize_conversation(
        without, tokenizer, "kimi-k2-thinking"
    )


def test_instruct_template_drops_reasoning(tokenizer_for):
    tokenizer = tokenizer_for("qwen3-instruct")
    with_reasoning = tokenize_conversation(CONVERSATION, tokenizer, "qwen3-instruct")
    assert "Add 2 and 3" not in decode(tokenizer, with_reasoning["input_ids"])


def test_system_prompt_precedence(tokenizer_for):
    tokenizer = tokenizer_for("qwen")
    no_system = CONVERSATION[1:3]

    def text(conversation, **options):
        return decode(tokenizer, tokenize_conversation(conversation, tokenizer, "qwen", **options)["input_ids"])

    default = get_template("qwen").default_system_prompt
    assert text(no_system).startswith(f"<|im_start|>system\n{default}<|im_end|>\n<|im_start|>user")
    assert text(no_system, system_prompt="Be nice.").startswith("<|im_start|>system\nBe nice.<|im_end|>\n")
    assert text(no_system, system_prompt="").startswith("<|im_start|>user\n")
    assert text(CONVERSATION, system_prompt="Be nice.") == EXPECTED_TEXT["qwen"]


def test_sharegpt_and_openai_messages_tokenize_alike(tokenizer_for):
    tokenizer = tokenizer_for("llama3")
    sharegpt = [
        {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
        for m in CONVERSATION
    ]
    plain = [{"role": m["role"], "content": m["content"]} for m in CONVERSATION]
    assert tokenize_conversation(sharegpt, tokenizer, "llama3") == tokenize_conversation(plain, tokenizer, "llama3")


def test_truncation_cuts_ids_and_mask_together(tokenizer_for):
    tokenizer = tokenizer_for("qwen")
    full = tokenize_conversation(CONVERSATION, tokenizer, "qwen")
    cut = tokenize_conversation(CONVERSATION, tokenizer, "qwen", max_seq_length=20, return_attention_mask=True)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["loss_mask"] == full["loss_mask"][:20]
    assert cut["attention_mask"] == [1] * 20


def test_tool_turns_are_context(tokenizer_for):
    tokenizer = tokenizer_for("qwen")
    conversation = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    sample = tokenize_conversation(conversation, tokenizer, "qwen", system_prompt="")
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in decode(
        tokenizer, sample["input_ids"]
    )
    assert [decode(tokenizer, r) for r in supervised_runs(sample)] == ["Checking.<|im_end|>", "It is sunny.<|im_end|>"]
    with pytest.raises(DataError, match="has no 'tool' role"):
        tokenize_conversation(conversation, tokenizer, "phi3")


def test_unknown_template_lists_the_registry():
    with pytest.raises(DataError, match="unknown chat template 'mistral'.*llama3.*qwen3-thinking"):
        get_template("mistral")


def test_tokenizer_without_the_template_tokens_is_rejected(tmp_path):
    qwen_only = build_local_tokenizer(tmp_path, texts=["a few words of text"] * 5, vocab_size=300, template="qwen")
    with pytest.raises(DataError, match=r"no single token for '<\|begin_of_text\|>'.*template 'llama3'"):
        tokenize_conversation(CONVERSATION, qwen_only, "llama3")


def test_token_straddling_a_span_start_goes_with_its_first_character(tmp_path):
    # Trained so that "\n " is one token: after the "assistant\n" header, content "  indented" then
    # starts inside that token, whose first character belongs to the header.
    tokenizer = build_local_tokenizer(tmp_path, texts=["word\n  indented line\n  more"] * 50, vocab_size=400)
    conversation = [{"role": "user", "content": "word"}, {"role": "assistant", "content": "  indented"}]
    sample = tokenize_conversation(conversation, tokenizer, "qwen", system_prompt="")
    tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"])
    straddling = tokens.index("ĊĠ", tokens.index("assistant"))
    assert sample["loss_mask"][straddling] == 0
    assert [decode(tokenizer, r) for r in supervised_runs(sample)] == [" indented<|im_end|>"]


def test_trimmed_offsets_give_the_same_mask(tokenizer_dir):
    # Some tokenizers trim spaces out of offsets, leaving space tokens with empty ranges. Here the header
    # ends with a space and the content starts with a newline, so the header's space token becomes an
    # empty range sitting exactly on the span start: it is judged by the character before it.
    untrimmed = AutoTokenizer.from_pretrained(tokenizer_dir)
    trimmed = AutoTokenizer.from_pretrained(tokenizer_dir)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    spaced = dataclasses.replace(get_template("qwen"), name="spaced", assistant_header="<|im_start|>assistant: ")
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nHello   there \n\n"}]
    text = spaced.render(normalize_conversation(conversation), system_prompt="").text
    offsets = trimmed(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    span_start = text.index("\nHello")
    assert (span_start, span_start) in offsets  # the case under test does occur

    expected = tokenize_conversation(conversation, untrimmed, spaced, system_prompt="")
    assert [decode(untrimmed, r) for r in supervised_runs(expected)] == ["\nHello   there \n\n<|im_end|>"]
    assert tokenize_conversation(conversation, trimmed, spaced, system_prompt="") == expected
