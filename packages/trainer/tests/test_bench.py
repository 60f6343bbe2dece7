"""``trainer bench``: prompt sets (MT-Bench layout with its multi-turn protocol, conversations),
per-category results, the protocol printout, the JSON and pictures, and one-line errors. The
in-process evaluator judges here (tiny random models, a few tokens); vLLM's agreement with it is
integration_tests/test_bench.py."""

import json

import pytest

from torchspec.trainer.cli import main
from torchspec.trainer.commands.bench import BenchPrompt, PromptSet, read_prompt_set, run_turns
from torchspec.trainer.commands.evaluate import chat_prompt_ids

from trainer_test_helpers import assert_one_line_error, save_small_llama_draft, save_tiny_qwen3

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 82, "category": "writing", "turns": ["Name three colours."]},
    {"question_id": 101, "category": "math", "turns": ["What is 2 + 3?", "And times 4?"]},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random Qwen3 target with a local tokenizer, and a random draft for it."""
    from transformers import AutoConfig

    from torchspec.data import build_local_tokenizer

    target = tmp_path_factory.mktemp("target")
    tokenizer = build_local_tokenizer(target, vocab_size=320)
    save_tiny_qwen3(target, num_layers=4, vocab=len(tokenizer), hidden=64)
    draft = tmp_path_factory.mktemp("draft")
    vocab = AutoConfig.from_pretrained(target).vocab_size
    save_small_llama_draft(draft, vocab, 64, 64, seed=1, include_embeddings=False, num_target_layers=4)
    return {"target": target, "draft": draft, "tokenizer": tokenizer}


def _write_questions(path, records=QUESTIONS):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mt_bench_layout_is_read_with_categories_and_turns(tmp_path, models):
    prompt_set = read_prompt_set(str(_write_questions(tmp_path / "question.jsonl")), models["tokenizer"])
    assert prompt_set.layout == "mt-bench" and prompt_set.has_categories
    assert prompt_set.name == tmp_path.name  # MT-Bench's file is question.jsonl: named by its folder
    assert [(p.prompt_id, p.category, p.num_turns) for p in prompt_set.prompts] == [
        ("81", "writing", 2),
        ("82", "writing", 1),
        ("101", "math", 2),
    ]
    assert len(read_prompt_set(str(tmp_path / "question.jsonl"), models["tokenizer"], limit=2).prompts) == 2


def test_conversations_are_read_as_evaluate_reads_them(tmp_path, models):
    from torchspec.data import sample_conversations_path
    from torchspec.trainer.commands.evaluate import prompts_from_conversations

    prompt_set = read_prompt_set(str(sample_conversations_path()), models["tokenizer"], limit=3)
    assert prompt_set.layout == "conversations" and not prompt_set.has_categories
    expected = prompts_from_conversations(str(sample_conversations_path()), models["tokenizer"], "conversations", 3)
    assert [p.token_ids for p in prompt_set.prompts] == expected


def test_turn_two_is_asked_with_turn_ones_generated_answer(models):
    """MT-Bench's protocol: the second prompt is the chat with the first answer the judge generated;
    acceptance counts the rounds of both turns."""
    tokenizer = models["tokenizer"]
    prompt_set = PromptSet(
        "q",
        "q.jsonl",
        "mt-bench",
        [BenchPrompt("1", "a", turns=["Hello there.", "Tell me more."]), BenchPrompt("2", "b", turns=["Hi."])],
    )
    answer = tokenizer.encode("Sure, here it is.", add_special_tokens=False)
    seen = []

    def generate(prompts):
        seen.append(prompts)
        return [(answer, [len(seen), 0]) for _ in prompts]  # rounds tagged by the call they came from

    outcomes = run_turns(prompt_set, tokenizer, generate)
    assert len(seen) == 2 and len(seen[0]) == 2 and len(seen[1]) == 1  # turn 1 of both, turn 2 of one
    assert seen[0][0] == chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hello there."}])
    assert seen[1][0] == chat_prompt_ids(
        tokenizer,
        [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)},
            {"role": "user", "content": "Tell me more."},
        ],
    )
    assert outcomes[0].accepted == [1, 0, 2, 0] and outcomes[1].accepted == [1, 0]
    assert outcomes[0].generated_tokens == 2 * len(answer)


def test_bench_reports_the_protocol_categories_and_writes_json_and_pictures(tmp_path, models, capsys):
    (tmp_path / "mt").mkdir()
    questions = _write_questions(tmp_path / "mt" / "question.jsonl")
    output = tmp_path / "out" / "bench.json"
    output.parent.mkdir()
    code = main(
        [
            "bench",
            "--draft",
            str(models["draft"]),
            "--target",
            str(models["target"]),
            "--prompts",
            str(questions),
            "--judge",
            "evaluator",
            "--num-draft-tokens",
            "2",
            "--max-new-tokens",
            "4",
            "--resamples",
            "200",
            "--output",
            str(output),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    protocol_line = next(line for line in out.splitlines() if line.startswith("protocol"))
    for fragment in (
        "judge evaluator",
        "2 draft tokens, chain",
        "temperature 0 (greedy), top-p 1",
        "max 4 new tokens per turn, stop at EOS",
        "batch 1 (the evaluator decodes one prompt at a time)",
        "seed 0",
        "95% percentile bootstrap over prompts, 200 resamples",
    ):
        assert fragment in protocol_line, protocol_line
    assert "acceptance length" in out and "95% CI [" in out and "math" in out and "writing" in out

    record = json.loads(output.read_text())
    assert record["protocol"]["judge"] == "evaluator" and record["protocol"]["num_draft_tokens"] == 2
    (result,) = record["results"]
    (mt,) = result["sets"]
    assert mt["layout"] == "mt-bench" and mt["num_prompts"] == 3 and mt["num_turns"] == 5
    assert set(mt["categories"]) == {"math", "writing"}
    assert mt["categories"]["writing"]["num_prompts"] == 2 and mt["categories"]["math"]["num_prompts"] == 1
    # the categories partition the set's rounds; the per-prompt counts are the set's
    assert sum(c["num_rounds"] for c in mt["categories"].values()) == mt["num_rounds"]
    assert sum(p["rounds"] for p in mt["prompts"]) == mt["num_rounds"] > 0
    low, high = mt["interval"]["low"], mt["interval"]["high"]
    assert low <= mt["acceptance_length"] <= high and len(mt["position_acceptance"]) == 2
    for key in ("categories", "positions"):
        picture = output.with_name(f"bench_{key}.png")
        assert record["pictures"][key] == str(picture)
        data = picture.read_bytes()
        assert data.startswith(PNG_HEADER) and len(data) > 5000
    assert "steps" not in record["pictures"]  # a single draft: no curve over training steps


def _bench(capsys, *args):
    code = main(["bench", "--judge", "evaluator", *args])
    return code, capsys.readouterr().err


def test_an_unknown_layout_is_one_line_naming_the_file_and_the_expected_keys(tmp_path, models, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "hello", "id": 1}\n')
    code, err = _bench(
        capsys, "--draft", str(models["draft"]), "--target", str(models["target"]), "--prompts", str(prompts)
    )
    assert_one_line_error(code, err, str(prompts), "keys of", "id, text", "question_id, category, turns")
    assert not (models["draft"] / "bench.json").exists()


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"question_id": 1, "category": "x", "turns": []}, "'turns' must be a non-empty list"),
        ({"question_id": 1, "category": "x", "turns": [3]}, "'turns' must be a non-empty list"),
        ({"category": "x", "turns": ["hi"]}, "needs question_id, category, turns"),
    ],
)
def test_bad_mt_bench_records_are_one_line(tmp_path, models, capsys, record, fragment):
    prompts = _write_questions(tmp_path / "question.jsonl", [QUESTIONS[0], record])
    code, err = _bench(
        capsys, "--draft", str(models["draft"]), "--target", str(models["target"]), "--prompts", str(prompts)
    )
    assert_one_line_error(code, err, f"{prompts}:2", fragment)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--prompts", "missing.jsonl"], ["--prompts missing.jsonl: no such file"]),
        (["--batch", "4"], ["--batch 4 with --judge evaluator", "one prompt at a time"]),
        (["--top-p", "0"], ["--top-p 0.0: must be in (0, 1]"]),
        (["--temperature", "-1"], ["--temperature -1.0"]),
    ],
)
def test_bad_options_are_one_line(models, capsys, args, fragments):
    code, err = _bench(capsys, "--draft", str(models["draft"]), "--target", str(models["target"]), *args)
    assert_one_line_error(code, err, *fragments)


def test_a_run_without_checkpoints_and_a_missing_draft_are_one_line(tmp_path, models, capsys):
    (tmp_path / "run").mkdir()
    code, err = _bench(capsys, "--run", str(tmp_path / "run"), "--target", str(models["target"]))
    assert_one_line_error(code, err, f"--run {tmp_path / 'run'}: no complete checkpoint")
    code, err = _bench(capsys, "--draft", str(tmp_path / "nope"), "--target", str(models["target"]))
    assert_one_line_error(code, err, f"--draft {tmp_path / 'nope'}: no config.json there")


def test_a_run_gets_the_picture_across_its_checkpoints(tmp_path):
    from torchspec.trainer.commands.bench import BenchResult, Protocol, SetResult, render_pictures
    from torchspec.trainer.loop.acceptance_stats import ratio_interval, summarize

    def measured(accepted):
        summary = summarize(accepted, 2, resamples=100)
        positions = [
            ratio_interval([sum(a >= i for a in p) for p in accepted], [len(p) for p in accepted]) for i in (1, 2)
        ]
        return SetResult("mt", "q.jsonl", "mt-bench", summary, positions, {"math": summary}, [])

    results = [BenchResult(f"iter_{step}", step, [measured([[step // 20, 0, 1], [1, 2]])]) for step in (20, 40, 60)]
    pictures = render_pictures(results, Protocol(judge="evaluator", num_draft_tokens=2), "evaluator")
    assert set(pictures) == {"categories", "positions", "steps"}
    assert all(data.startswith(PNG_HEADER) and len(data) > 5000 for data in pictures.values())
