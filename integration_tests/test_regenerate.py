"""`trainer regenerate` with the real engine: vLLM (CPU build, float32, greedy) rewrites the answers of
the first sample conversations with the default tiny target.

The output must be a dataset the trainer takes (`build_training_dataset`), and every answer must be
the target's own greedy continuation: transformers' `generate(do_sample=False)` from the same prompt
tokens (the conversation so far, earlier answers already regenerated, rendered with the qwen
template plus its generation prompt) gives the same text, turn by turn. About 60 s on 2 CPU cores,
most of it the engine's start.

Needs vLLM like test_engine.py: skipped without it unless TORCHSPEC_REQUIRE_ENGINE=1 (CI), then it fails.
"""

import json
import os

import pytest
import torch

from torchspec.trainer.engine.launch import vllm_available

from e2e_helpers import SAMPLES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not vllm_available() and os.environ.get("TORCHSPEC_REQUIRE_ENGINE") != "1",
        reason="vLLM is not installed (hatch run engine:integration runs these)",
    ),
]

LIMIT, NEW_TOKENS = 8, 24


def test_regenerated_answers_are_the_targets_greedy_answers(default_target, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchspec.data import build_training_dataset, get_template
    from torchspec.trainer.cli import main
    from torchspec.trainer.commands.regenerate import turn_prompt

    out = tmp_path / "regenerated.jsonl"
    args = ["--output", str(out), "--limit", str(LIMIT), "--max-new-tokens", str(NEW_TOKENS)]
    code = main(["regenerate", *args, f"data.cache_dir={tmp_path / 'cache'}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    print(captured.out.strip().splitlines()[-1])
    regenerated = [json.loads(line)["conversations"] for line in out.read_text().splitlines()]
    original = [json.loads(line)["conversations"] for line in open(SAMPLES).read().splitlines()[:LIMIT]]
    assert len(regenerated) == LIMIT
    meta = json.loads((tmp_path / "regenerated.jsonl.meta.json").read_text())
    assert meta["sampling"]["temperature"] == 0.0 and meta["dtype"] == "float32"

    # The trainer takes it: every conversation tokenizes to a sample with supervised tokens.
    tokenizer = AutoTokenizer.from_pretrained(default_target)
    dataset, stats = build_training_dataset(str(out), tokenizer, "qwen", 2048, cache_dir=tmp_path / "cache")
    assert len(dataset) == LIMIT and stats.skipped_invalid == 0

    # The questions are the source's; the answers are the target's greedy ones.
    template = get_template("qwen")
    model = AutoModelForCausalLM.from_pretrained(default_target, dtype=torch.float32).eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = mismatches = changed = 0
    for messages, source in zip(regenerated, original):
        assert [m["role"] for m in messages] == [m["role"] for m in source]
        assert [m["content"] for m in messages if m["role"] != "assistant"] == [
            m["content"] for m in source if m["role"] != "assistant"
        ]
        for position, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer(turn_prompt(template, messages[:position]), add_special_tokens=False).input_ids
            with torch.no_grad():
                ids = model.generate(
                    torch.tensor([prompt]),
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    eos_token_id=im_end,
                    pad_token_id=tokenizer.pad_token_id,
                )[0, len(prompt) :].tolist()
            expected = tokenizer.decode(ids[:-1] if ids and ids[-1] == im_end else ids, skip_special_tokens=False)
            answers += 1
            changed += message["content"] != source[position]["content"]
            if message["content"] != expected:
                mismatches += 1
                print(f"turn {position}: vLLM {message['content']!r} vs transformers {expected!r}")
    assert answers >= 2 * LIMIT and mismatches == 0, f"{mismatches} of {answers} answers differ"
    assert changed > 0  # the tiny target does not simply repeat its training data
