"""`trainer bench`: vLLM and the in-process evaluator judge the same draft alike.

On what both can run (greedy, float32, a chain of draft tokens) the two judges must produce the same
tokens for every turn (so MT-Bench's turn 2 is asked with the same turn-1 answer on both sides) and
count the same verification rounds and accepted draft tokens for every prompt, so the acceptance
length, its interval and the per-category results agree. Per draft position a count may differ by
one (float32 rounding flipping a near-tie late in a chain, as in test_engine.py). One engine start.
"""

import json
import os

import pytest

from torchspec.trainer.commands.bench import Protocol, read_prompt_set, run_bench
from torchspec.trainer.engine.launch import vllm_available

from e2e_helpers import SAMPLES, export

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not vllm_available() and os.environ.get("TORCHSPEC_REQUIRE_ENGINE") != "1",
        reason="vLLM is not installed (hatch run engine:integration runs these)",
    ),
]

QUESTIONS = [
    {
        "question_id": 1,
        "category": "math",
        "turns": ["Anna has 8 apples and gets 6 more. How many now?", "And 3 more?"],
    },
    {"question_id": 2, "category": "lists", "turns": ["Give me a list of 5 vehicles."]},
    {"question_id": 3, "category": "math", "turns": ["Which is bigger, 48 or 43?", "Is 20 even or odd?"]},
]


def test_vllm_and_the_evaluator_count_the_same_rounds(default_target, trained_run, tmp_path):
    from transformers import AutoTokenizer

    draft = export(trained_run("llama"), tmp_path / "llama_hf")
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tokenizer = AutoTokenizer.from_pretrained(default_target)
    sets = [read_prompt_set(str(questions), tokenizer), read_prompt_set(SAMPLES, tokenizer, limit=3)]
    results = {}
    for judge in ("vllm", "evaluator"):
        protocol = Protocol(judge=judge, num_draft_tokens=3, max_new_tokens=24, resamples=500)
        (result,), name = run_bench([(str(draft), None)], default_target, sets, protocol, tokenizer)
        results[judge] = result
    assert name == "evaluator"
    for served, evaluated in zip(results["vllm"].sets, results["evaluator"].sets, strict=True):
        print(
            f"\n{served.name}: vLLM {served.summary.acceptance_length:.3f} {served.summary.interval}, "
            f"evaluator {evaluated.summary.acceptance_length:.3f}"
        )
        for a, b in zip(served.outcomes, evaluated.outcomes, strict=True):
            assert a.generated_tokens == b.generated_tokens and a.turn_lengths == b.turn_lengths, a.prompt_id
            assert (len(a.accepted), sum(a.accepted)) == (len(b.accepted), sum(b.accepted)), a.prompt_id
        assert served.summary.acceptance_length == evaluated.summary.acceptance_length
        assert served.summary.interval == evaluated.summary.interval
        assert served.categories.keys() == evaluated.categories.keys()
        rounds = served.summary.num_rounds
        for x, y in zip(served.summary.position_acceptance, evaluated.summary.position_acceptance, strict=True):
            assert abs(round(x * rounds) - round(y * rounds)) <= 1
    # the trained draft is really used: an untrained one accepts nearly nothing
    assert results["vllm"].sets[1].summary.acceptance_length > 1.3
