"""Builders shared by the data tests."""

import json
from pathlib import Path

from transformers import AutoTokenizer

from torchspec.data import get_template, template_to_jinja

# A multi-turn conversation with a system prompt; the first answer carries reasoning.
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5.", "reasoning_content": "Add 2 and 3 to get 5."},
    {"role": "user", "content": "Spell cat."},
    {"role": "assistant", "content": "C-A-T."},
    {"role": "user", "content": "Count from 1 to 4."},
    {"role": "assistant", "content": "1, 2, 3, 4."},
]
ASSISTANT_CONTENTS = ["2 plus 3 is 5.", "C-A-T.", "1, 2, 3, 4."]
REASONING = "Add 2 and 3 to get 5."


def load_tokenizer_with_template(tokenizer_dir, template_name):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = template_to_jinja(get_template(template_name))
    return tokenizer


def supervised_runs(sample):
    """Token-id runs where loss_mask is 1, in order."""
    runs, current = [], []
    for token, flag in zip(sample["input_ids"], sample["loss_mask"]):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def write_jsonl(path: Path, records) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path
