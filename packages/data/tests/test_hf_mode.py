"""Template "hf": spans derived from the tokenizer's Jinja chat_template."""

import json

import pytest
from transformers import AutoTokenizer

from torchspec.data import DataError, list_templates, sample_conversations_path, tokenize_conversation

from data_test_helpers import CONVERSATION, supervised_runs


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def with_chat_template(tokenizer_dir, jinja):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = jinja
    return tokenizer


# Hand-written templates in the style of the official ones (transformers renders with trim_blocks, so
# newlines are written as string literals, never after a block tag).
QWEN25_STYLE = (
    "{% for m in messages %}"
    "{% if loop.first and m.role != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_STYLE_TRIMMING = (
    "{{ '<|begin_of_text|>' }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Like Qwen3 Thinking-2507: reasoning is rendered only after the last user message, and the generation
# prompt opens the think block.
QWEN3_THINKING_STYLE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% if loop.index0 > ns.last_user and m.reasoning_content %}"
    "{{ '<think>\\n' + m.reasoning_content.strip() + '\\n</think>\\n\\n' }}"
    "{% endif %}"
    "{{ m.content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)


# Like Phi-3's: a finished chat ends with EOS, which the generation prompt replaces.
PHI3_STYLE = (
    "{% for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}"
)


@pytest.mark.parametrize("name", list_templates())
@pytest.mark.parametrize(
    "options",
    [{}, {"keep_reasoning": False}, {"last_turn_only": True}, {"system_prompt": "Be nice."}],
    ids=["default", "drop-reasoning", "last-turn", "system-prompt"],
)
def test_hf_mode_agrees_with_the_registry(tokenizer_for, name, options):
    tokenizer = tokenizer_for(name)
    no_system = CONVERSATION[1:] if "system_prompt" in options else CONVERSATION
    assert tokenize_conversation(no_system, tokenizer, "hf", **options) == tokenize_conversation(
        no_system, tokenizer, name, **options
    )


@pytest.mark.parametrize("name", ["qwen3-thinking", "gpt-oss", "kimi-k2-thinking", "llama3"])
def test_hf_mode_agrees_with_the_registry_on_the_samples(tokenizer_for, name):
    tokenizer = tokenizer_for(name)
    with sample_conversations_path().open() as lines:
        conversations = [json.loads(line)["conversations"] for line in lines][:60]
    for conversation in conversations:
        assert tokenize_conversation(conversation, tokenizer, "hf") == tokenize_conversation(
            conversation, tokenizer, name
        )


def test_independent_chatml_template_matches_qwen(tokenizer_dir):
    tokenizer = with_chat_template(tokenizer_dir, QWEN25_STYLE)
    for conversation in (CONVERSATION, CONVERSATION[1:]):
        plain = [{"role": m["role"], "content": m["content"]} for m in conversation]
        assert tokenize_conversation(plain, tokenizer, "hf") == tokenize_conversation(plain, tokenizer, "qwen")


def test_end_of_chat_eos_is_context(tokenizer_dir):
    tokenizer = with_chat_template(tokenizer_dir, PHI3_STYLE)
    hf = tokenize_conversation(CONVERSATION, tokenizer, "hf")
    registry = tokenize_conversation(CONVERSATION, tokenizer, "phi3")
    assert hf["input_ids"] == registry["input_ids"] + [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert hf["loss_mask"] == registry["loss_mask"] + [0]


def test_trimming_template_supervises_the_trimmed_content(tokenizer_dir):
    tokenizer = with_chat_template(tokenizer_dir, LLAMA3_STYLE_TRIMMING)
    conversation = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "  Hello there.\n"}]
    sample = tokenize_conversation(conversation, tokenizer, "hf")
    assert [decode(tokenizer, r) for r in supervised_runs(sample)] == ["Hello there.<|eot_id|>"]
    trimmed = [{"role": m["role"], "content": m["content"].strip()} for m in conversation]
    assert sample == tokenize_conversation(trimmed, tokenizer, "llama3")


def test_thinking_template_with_history_rules(tokenizer_dir):
    tokenizer = with_chat_template(tokenizer_dir, QWEN3_THINKING_STYLE)
    conversation = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5.", "reasoning_content": "2 + 3 = 5."},  # dropped from history
        {"role": "user", "content": "Spell cat."},
        {"role": "assistant", "content": "C-A-T.", "reasoning_content": "Letters in order."},
    ]
    sample = tokenize_conversation(conversation, tokenizer, "hf")
    assert "2 + 3 = 5." not in decode(tokenizer, sample["input_ids"])
    assert [decode(tokenizer, r) for r in supervised_runs(sample)] == [
        "5.<|im_end|>",
        "Letters in order.\n</think>\n\nC-A-T.<|im_end|>",  # "<think>\n" is in the generation prompt
    ]
    # Same tokens and mask as the registry template given the history the Jinja template keeps.
    registry_view = [conversation[0], {"role": "assistant", "content": "5."}, *conversation[2:]]
    assert sample == tokenize_conversation(registry_view, tokenizer, "qwen3-thinking", system_prompt="")


@pytest.mark.parametrize(
    ("jinja", "match"),
    [
        (  # no add_generation_prompt block
            "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}",
            "ignores add_generation_prompt",
        ),
        (  # plain-text turns: nothing marks the end of an answer (the first special token ends the chat)
            "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% else %}{{ '<|endoftext|>' }}{% endif %}",
            "no special end-of-turn token right after its content",
        ),
        (  # content is transformed
            "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content | upper + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            "rewrites assistant content",
        ),
        (  # the generation prompt names a role the rendered turns never use
            "{% for m in messages %}{{ '<|im_start|>' + ('bot' if m.role == 'assistant' else m.role) + '\\n' }}"
            "{{ m.content + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            "assistant header .* never appears",
        ),
    ],
    ids=["no-generation-prompt", "no-end-token", "rewritten-content", "header-mismatch"],
)
def test_unusable_chat_templates_fail_loudly(tokenizer_dir, jinja, match):
    tokenizer = with_chat_template(tokenizer_dir, jinja)
    with pytest.raises(DataError, match=match):
        tokenize_conversation(CONVERSATION, tokenizer, "hf")


def test_history_rewriting_template_needs_last_turn_only(tokenizer_dir):
    # Marks the latest user message, so earlier prefixes render differently once more turns follow.
    jinja = (
        "{% set ns = namespace(last_user=-1) %}"
        "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
        "{% if loop.index0 == ns.last_user %}{{ ' (latest)' }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer = with_chat_template(tokenizer_dir, jinja)
    with pytest.raises(DataError, match="renders earlier turns differently.*last_turn_only=True"):
        tokenize_conversation(CONVERSATION, tokenizer, "hf")
    sample = tokenize_conversation(CONVERSATION, tokenizer, "hf", last_turn_only=True)
    assert [decode(tokenizer, r) for r in supervised_runs(sample)] == ["1, 2, 3, 4.<|im_end|>"]


def test_tokenizer_without_chat_template_is_rejected(tokenizer_dir):
    tokenizer = with_chat_template(tokenizer_dir, None)
    with pytest.raises(DataError, match="has none; pass a registry template name"):
        tokenize_conversation(CONVERSATION, tokenizer, "hf")
