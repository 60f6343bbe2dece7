"""`trainer regenerate` without vLLM: the prompts of each turn, the batching, the reasoning split, the
counts, and the command's one-line errors, against a fake engine.

The fake engine plays the target with a script (prompt text -> answer text) and behaves as vLLM's
`generate` does for the worker: it stops at the first stop token (included in the output), or
after `max_new_tokens` with finish reason "length". The real engine is exercised by
integration_tests/test_regenerate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torchspec.trainer.commands.regenerate as regenerate_module
from torchspec.data import get_template
from torchspec.trainer.cli import main
from torchspec.trainer.commands.regenerate import regenerate_conversations, split_answer, turn_prompt
from torchspec.trainer.engine.launch import EngineError

from trainer_test_helpers import assert_one_line_error

_real_start_engine = regenerate_module._start_engine

QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from torchspec.data import build_local_tokenizer

    # The special tokens of every template used below; EOS is qwen's <|im_end|>.
    return build_local_tokenizer(
        tmp_path_factory.mktemp("tokenizer"), template=["qwen", "qwen3-thinking", "kimi-k2-thinking", "gpt-oss"]
    )


class FakeEngine:
    """``send``/``reply``/``close`` like ``EngineWorker``; ``answer(prompt_text, request_index)``
    returns the text the "target" generates, end-of-turn token included where it ends its turn."""

    def __init__(self, tokenizer, answer, fail_on_request: int | None = None):
        self.tokenizer, self.answer, self.fail_on_request = tokenizer, answer, fail_on_request
        self.requests: list[dict] = []
        self.closed = False
        self.vllm_version = "fake"

    def send(self, op, **request):
        self.requests.append({"op": op, **request})
        return len(self.requests) - 1

    def reply(self, request_id):
        if request_id == self.fail_on_request:
            raise EngineError("vLLM failed a request: RuntimeError: out of memory (log: engine.log)")
        request = self.requests[request_id]
        outputs, reasons = [], []
        for ids in request["prompts"]:
            text = self.answer(self.tokenizer.decode(ids, skip_special_tokens=False), request_id)
            out = self.tokenizer.encode(text, add_special_tokens=False)
            stop = next((i for i, token in enumerate(out) if token in request["stop_token_ids"]), None)
            if stop is not None and stop < request["max_new_tokens"]:
                outputs.append(out[: stop + 1])
                reasons.append("stop")
            else:
                outputs.append(out[: request["max_new_tokens"]])
                reasons.append("length")
        return {"outputs": outputs, "finish_reasons": reasons}

    def close(self):
        self.closed = True

    def prompt_texts(self, request_index: int) -> list[str]:
        return [self.tokenizer.decode(p, skip_special_tokens=False) for p in self.requests[request_index]["prompts"]]


def numbered_answer(prompt: str, _request: int) -> str:
    """Answer n of a conversation is "answer n" (n = assistant headers in the prompt)."""
    return f"answer {prompt.count('<|im_start|>assistant')}<|im_end|>"


def conversation(*turns: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return messages


def run(tokenizer, conversations, answer=numbered_answer, template="qwen", **options):
    engine = FakeEngine(tokenizer, answer)
    written, stats = regenerate_conversations(conversations, engine, tokenizer, get_template(template), **options)
    return engine, written, stats


# --- prompts and batching -------------------------------------------------------------------------


def test_each_turn_is_prompted_with_the_regenerated_history(tokenizer):
    source = conversation("Hi there", "original one", "And now?", "original two")
    engine, written, stats = run(tokenizer, [source])

    assert [engine.prompt_texts(i) for i in range(len(engine.requests))] == [
        [QWEN_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"],
        [
            QWEN_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nanswer 1<|im_end|>\n"
            "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
        ],
    ]
    # The token ids sent are the tokenizer's encoding of that text (what training tokenizes too).
    assert engine.requests[0]["prompts"][0] == tokenizer.encode(
        turn_prompt(get_template("qwen"), source[:1]), add_special_tokens=False
    )
    assert written == [conversation("Hi there", "answer 1", "And now?", "answer 2")]
    assert (stats.conversations, stats.written, stats.turns_regenerated) == (1, 1, 2)
    assert stats.tokens_generated == 2 * len(tokenizer.encode("answer 1<|im_end|>", add_special_tokens=False))


def test_the_kth_turns_of_all_conversations_are_one_request_with_the_sampling_settings(tokenizer):
    sources = [
        conversation("a", "x", "b", "x"),
        conversation("c", "x"),
        conversation("d", "x", "e", "x", "f", "x", system="Be brief."),
    ]
    engine, written, stats = run(tokenizer, sources, max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3)

    assert [len(r["prompts"]) for r in engine.requests] == [3, 2, 1]
    (im_end,) = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    for request in engine.requests:
        assert request["op"] == "generate"
        assert (request["max_new_tokens"], request["temperature"], request["top_p"], request["seed"]) == (
            7,
            0.5,
            0.9,
            3,
        )
        assert request["stop_token_ids"] == [im_end]
    assert engine.prompt_texts(2)[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nd")
    assert [[m["content"] for m in c if m["role"] == "assistant"] for c in written] == [
        ["answer 1", "answer 2"],
        ["answer 1"],
        ["answer 1", "answer 2", "answer 3"],
    ]
    assert stats.turns_regenerated == 6


def test_conversations_without_an_assistant_turn_are_copied(tokenizer):
    engine, written, _ = run(tokenizer, [conversation("only a question")])
    assert engine.requests == [] and written == [conversation("only a question")]


# --- reasoning ----------------------------------------------------------------------------------------


def thinking_answer(prompt: str, request: int) -> str:
    return f"Step {request + 1}.\n</think>\n\nAnswer {request + 1}.<|im_end|>"


def test_thinking_keep_splits_the_reasoning_and_training_renders_what_was_generated(tokenizer):
    template = get_template("qwen3-thinking")
    engine, written, _ = run(tokenizer, [conversation("Q1", "x", "Q2", "x")], thinking_answer, "qwen3-thinking")

    first, second = written[0][1], written[0][3]
    assert first == {"role": "assistant", "content": "Answer 1.", "reasoning_content": "Step 1."}
    assert second == {"role": "assistant", "content": "Answer 2.", "reasoning_content": "Step 2."}
    prompt_1, prompt_2 = engine.prompt_texts(0)[0], engine.prompt_texts(1)[0]
    assert prompt_1 == "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert "<think>\nStep 1.\n</think>\n\nAnswer 1.<|im_end|>\n<|im_start|>user\nQ2" in prompt_2
    # The training render of the output continues each prompt with exactly the generated text.
    rendered = template.render(written[0]).text
    assert rendered.startswith(prompt_1 + thinking_answer("", 0))
    assert rendered.startswith(prompt_2 + thinking_answer("", 1))


def test_thinking_drop_keeps_only_the_answer_in_the_output_and_the_history(tokenizer):
    engine, written, _ = run(
        tokenizer, [conversation("Q1", "x", "Q2", "x")], thinking_answer, "qwen3-thinking", thinking="drop"
    )
    assert written[0][1] == {"role": "assistant", "content": "Answer 1."}
    assert "Step 1" not in engine.prompt_texts(1)[0]
    assert "<|im_start|>assistant\nAnswer 1.<|im_end|>\n<|im_start|>user\nQ2" in engine.prompt_texts(1)[0]


@pytest.mark.parametrize(
    "template, generated, expected",
    [
        ("qwen3-thinking", "Hmm.\n</think>\n\nYes.", ("Yes.", "Hmm.")),
        ("qwen3-thinking", "Hmm.</think>Yes.", ("Yes.", "Hmm.")),  # markers without the template's whitespace
        ("qwen3-thinking", "still thinking when cut", ("", "still thinking when cut")),
        ("qwen3-thinking", "\n</think>\n\nYes.", ("Yes.", None)),  # blank reasoning is none
        ("kimi-k2-thinking", "<think>plan</think>Result", ("Result", "plan")),
        ("kimi-k2-thinking", "<think></think>Result", ("Result", None)),
        ("kimi-k2-thinking", "Result without a think block", ("Result without a think block", None)),
        (
            "gpt-oss",
            "<|channel|>analysis<|message|>why<|end|><|start|>assistant<|channel|>final<|message|>Because.",
            ("Because.", "why"),
        ),
        ("gpt-oss", "<|channel|>final<|message|>Because.", ("Because.", None)),
        ("qwen", "<think>not a thinking template</think> text", ("<think>not a thinking template</think> text", None)),
    ],
)
def test_split_answer(template, generated, expected):
    assert split_answer(generated, get_template(template)) == expected
    assert split_answer(generated, get_template(template), thinking="drop") == (expected[0], None)


def test_gpt_oss_stops_at_return_not_at_the_end_that_closes_its_analysis(tokenizer):
    def answer(prompt, _):
        return "<|channel|>analysis<|message|>why<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>"

    engine, written, _ = run(tokenizer, [conversation("Q", "x")], answer, "gpt-oss")
    stops = set(engine.requests[0]["stop_token_ids"])
    (end,), (ret,) = (tokenizer.encode(t, add_special_tokens=False) for t in ("<|end|>", "<|return|>"))
    assert ret in stops and end not in stops
    assert written[0][1] == {"role": "assistant", "content": "Done.", "reasoning_content": "why"}


# --- what cannot be regenerated ---------------------------------------------------------------------


def test_prompts_over_the_limit_end_their_conversation_and_are_counted(tokenizer):
    template = get_template("qwen")
    fits = conversation("short", "x", "a second question that makes the prompt longer", "x")
    too_long = conversation("a first question far too long for the limit, " * 3, "x", "more", "x")
    limit = len(tokenizer.encode(turn_prompt(template, fits[:1]), add_special_tokens=False))
    assert len(tokenizer.encode(turn_prompt(template, too_long[:1]), add_special_tokens=False)) > limit

    engine, written, stats = run(tokenizer, [fits, too_long], max_prompt_tokens=limit)
    assert [len(r["prompts"]) for r in engine.requests] == [1]
    # The conversation ends on its last answer, not on the unanswered question; the other has none left.
    assert written == [conversation("short", "answer 1")]
    assert (stats.turns_regenerated, stats.turns_skipped, stats.written) == (1, 3, 1)


def test_an_empty_answer_ends_its_conversation(tokenizer):
    def answer(prompt, request):
        return "  \n<|im_end|>" if request == 1 else numbered_answer(prompt, request)

    engine, written, stats = run(
        tokenizer, [conversation("a", "x", "b", "x", "c", "x"), conversation("d", "x")], answer
    )
    assert written == [conversation("a", "answer 1"), conversation("d", "answer 1")]
    assert len(engine.requests) == 2  # nothing is asked after the empty answer
    assert (stats.empty_answers, stats.turns_regenerated) == (1, 2)


def test_answers_cut_at_max_new_tokens_are_kept_and_counted(tokenizer):
    def answer(prompt, request):
        return "one two three four five six seven<|im_end|>"

    _, written, stats = run(tokenizer, [conversation("a", "x")], answer, max_new_tokens=3)
    first_three = tokenizer.encode("one two three four", add_special_tokens=False)[:3]
    assert written[0][1]["content"] == tokenizer.decode(first_three)
    assert stats.cut_at_max_new_tokens == 1 and stats.tokens_generated == 3


# --- the command --------------------------------------------------------------------------------------


@pytest.fixture
def setup(tokenizer, tmp_path, monkeypatch):
    """A target folder holding just the tokenizer (the engine is fake), three conversations, and
    the engine start replaced by the fake engine (the last one started is `engines[-1]`)."""
    target = tmp_path / "target"
    tokenizer.save_pretrained(target)
    data = tmp_path / "conversations.jsonl"
    sources = [conversation("a", "x", "b", "x"), conversation("c", "x"), conversation("d", "x", system="Be brief.")]
    data.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in sources))
    engines: list[FakeEngine] = []
    options: dict = {"answer": numbered_answer, "fail_on_request": None}

    def start(target_path, **kwargs):
        engines.append(FakeEngine(tokenizer, options["answer"], options["fail_on_request"]))
        engines[-1].started_with = {"target": target_path, **kwargs}
        return engines[-1]

    monkeypatch.setattr(regenerate_module, "_start_engine", start)
    overrides = [f"model.target_model_path={target}", f"data.train_path={data}", f"data.cache_dir={tmp_path / 'cache'}"]
    return {"overrides": overrides, "engines": engines, "options": options, "target": target, "root": tmp_path}


def regenerate(capsys, *args):
    code = main(["regenerate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".partial")


def test_the_command_writes_a_dataset_the_trainer_reads_and_its_meta(setup, capsys, tokenizer):
    from torchspec.data import build_training_dataset, load_conversation_dataset

    out = setup["root"] / "new" / "regenerated.jsonl"  # the folder is created
    code, stdout, err = regenerate(
        capsys, "--output", str(out), *setup["overrides"], "--max-new-tokens", "16", "--seed", "5", "--limit", "2"
    )
    assert code == 0, err
    assert "2 conversations (2 written), 3 turns regenerated, 0 skipped" in stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [
        {"conversations": conversation("a", "answer 1", "b", "answer 2")},
        {"conversations": conversation("c", "answer 1")},
    ]
    assert len(load_conversation_dataset(str(out))) == 2
    dataset, stats = build_training_dataset(str(out), tokenizer, "qwen", 2048, cache_dir=setup["root"] / "cache")
    assert len(dataset) == 2 and stats.kept == 2

    meta = json.loads((out.parent / "regenerated.jsonl.meta.json").read_text())
    assert meta["target"] == str(setup["target"]) and meta["source"].endswith("conversations.jsonl")
    assert meta["sampling"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 5}
    assert meta["thinking"] == "keep" and meta["limit"] == 2 and meta["chat_template"] == "qwen"
    assert meta["stats"]["turns_regenerated"] == 3 and meta["engine"]["vllm_version"] == "fake"
    # The engine was sized for the longest prompt plus its answer, and stopped.
    engine = setup["engines"][-1]
    assert engine.closed and engine.started_with["max_model_len"] == 2048 + 64
    assert engine.started_with["dtype"] in ("float32", "bfloat16")
    assert leftovers(out.parent) == []


def test_missing_output_is_one_line(setup, capsys):
    code, _, err = regenerate(capsys, *setup["overrides"])
    assert_one_line_error(code, err, "--output is required")
    assert setup["engines"] == []


@pytest.mark.parametrize("name", ["regenerated.json", "regenerated.txt"])
def test_output_must_be_jsonl(setup, capsys, name):
    code, _, err = regenerate(capsys, "--output", str(setup["root"] / name), *setup["overrides"])
    assert_one_line_error(code, err, "must end in .jsonl")


def test_an_existing_output_is_kept_unless_overwrite(setup, capsys):
    out = setup["root"] / "out.jsonl"
    out.write_text("precious\n")
    code, _, err = regenerate(capsys, "--output", str(out), *setup["overrides"])
    assert_one_line_error(code, err, f"--output {out} exists", "--overwrite")
    assert out.read_text() == "precious\n" and setup["engines"] == []

    code, _, err = regenerate(capsys, "--output", str(out), "--overwrite", *setup["overrides"])
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 3


def test_no_vllm_is_one_line_and_writes_nothing(setup, capsys, monkeypatch):
    import torchspec.trainer.engine.launch as engine_target

    monkeypatch.setattr(regenerate_module, "_start_engine", _real_start_engine)
    monkeypatch.setattr(engine_target, "vllm_available", lambda: False)
    monkeypatch.delenv("TORCHSPEC_ENGINE_PYTHON", raising=False)
    out = setup["root"] / "out.jsonl"
    code, _, err = regenerate(capsys, "--output", str(out), *setup["overrides"])
    assert_one_line_error(code, err, "needs vLLM, which is not installed here", "pip install vllm")
    assert not out.exists() and setup["engines"] == []


def test_an_engine_failure_midway_keeps_the_finished_conversations_and_stops_the_engine(setup, capsys):
    setup["options"]["fail_on_request"] = 1  # the second turn's request
    out = setup["root"] / "out.jsonl"
    code, _, err = regenerate(capsys, "--output", str(out), *setup["overrides"])
    assert_one_line_error(code, err, "vLLM failed a request: RuntimeError: out of memory", "run the same command again")
    assert not out.exists() and not (setup["root"] / "out.jsonl.meta.json").exists()
    assert setup["engines"][-1].closed
    # c and d had their only turn in the first request: kept; a (two turns) was not finished.
    assert finished_in_progress(out) == {
        1: conversation("c", "answer 1"),
        2: conversation("d", "answer 1", system="Be brief."),
    }


EXPECTED = [
    {"conversations": conversation("a", "answer 1", "b", "answer 2")},
    {"conversations": conversation("c", "answer 1")},
    {"conversations": conversation("d", "answer 1", system="Be brief.")},
]


def finished_in_progress(out: Path) -> dict[int, list[dict] | None]:
    """What the partial file beside ``out`` holds: source index -> the conversation written."""
    partial = out.with_name(out.name + ".partial")
    assert partial.is_file(), sorted(p.name for p in out.parent.iterdir())
    lines = partial.read_text().splitlines()[1:]  # after the settings line
    return {record["index"]: record["conversation"] for record in map(json.loads, lines)}


def test_a_killed_run_keeps_what_it_finished_and_the_same_command_continues_it(setup, capsys, monkeypatch):
    """A multi-hour run killed (here: the engine failing on the third request) keeps every
    conversation finished so far, fsynced as it goes; the same command asks the engine only for
    the rest and writes what an uninterrupted run writes."""
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    setup["options"]["fail_on_request"] = 2  # chunks of 2: [a, c] turn 1, a turn 2, then d fails
    out = setup["root"] / "out.jsonl"
    args = ["--output", str(out), "--chunk-size", "2", *setup["overrides"]]
    code, _, err = regenerate(capsys, *args)
    assert code == 2, err
    assert [len(r["prompts"]) for r in setup["engines"][-1].requests] == [2, 1, 1]
    assert finished_in_progress(out) == {0: EXPECTED[0]["conversations"], 1: EXPECTED[1]["conversations"]}
    assert str(out) + ".partial" in synced  # on disk, not only in the page cache

    setup["options"]["fail_on_request"] = None
    code, stdout, err = regenerate(capsys, *args)
    assert code == 0, err
    assert [engine.prompt_texts(0) for engine in setup["engines"][-1:]] == [
        ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nd<|im_end|>\n<|im_start|>assistant\n"]
    ]  # only d was asked for
    assert [json.loads(line) for line in out.read_text().splitlines()] == EXPECTED
    meta = json.loads(out.with_name("out.jsonl.meta.json").read_text())
    assert meta["stats"]["written"] == 3 and meta["stats"]["turns_regenerated"] == 4
    assert meta["resumed_conversations"] == 2
    assert leftovers(out.parent) == []


def test_a_torn_last_line_of_the_partial_file_is_dropped(setup, capsys):
    setup["options"]["fail_on_request"] = 1
    out = setup["root"] / "out.jsonl"
    assert regenerate(capsys, "--output", str(out), *setup["overrides"])[0] == 2
    with open(str(out) + ".partial", "a") as partial:
        partial.write('{"index": 0, "conversation": [{"role": "us')  # killed in the middle of a write
    setup["options"]["fail_on_request"] = None
    code, _, err = regenerate(capsys, "--output", str(out), *setup["overrides"])
    assert code == 0, err
    assert [json.loads(line) for line in out.read_text().splitlines()] == EXPECTED


def test_a_rerun_with_other_settings_does_not_mix_into_the_partial_run(setup, capsys):
    setup["options"]["fail_on_request"] = 1
    out = setup["root"] / "out.jsonl"
    assert regenerate(capsys, "--output", str(out), *setup["overrides"])[0] == 2
    before = (setup["root"] / "out.jsonl.partial").read_text()
    code, _, err = regenerate(capsys, "--output", str(out), "--seed", "7", *setup["overrides"])
    assert_one_line_error(code, err, f"{out}.partial", "sampling", "run the same command", "delete")
    assert (setup["root"] / "out.jsonl.partial").read_text() == before


def test_the_data_file_is_in_place_before_the_meta_that_says_the_run_finished(setup, capsys, monkeypatch):
    import os

    renamed: list[str] = []
    real_replace = os.replace

    def recording(source, destination):
        renamed.append(os.path.basename(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recording)
    out = setup["root"] / "out.jsonl"
    code, _, err = regenerate(capsys, "--output", str(out), *setup["overrides"])
    assert code == 0, err
    assert renamed.index("out.jsonl") < renamed.index("out.jsonl.meta.json")


def test_the_hf_template_is_refused(setup, capsys):
    code, _, err = regenerate(
        capsys, "--output", str(setup["root"] / "o.jsonl"), *setup["overrides"], "data.chat_template=hf"
    )
    assert_one_line_error(code, err, "data.chat_template=hf", "registry template")


def test_a_template_the_tokenizer_lacks_is_one_line(setup, capsys):
    code, _, err = regenerate(
        capsys, "--output", str(setup["root"] / "o.jsonl"), *setup["overrides"], "data.chat_template=llama3"
    )
    assert_one_line_error(code, err, "no single token for", "llama3")
    assert setup["engines"] == []


def test_a_bad_override_is_one_line(setup, capsys):
    code, _, err = regenerate(capsys, "--output", str(setup["root"] / "o.jsonl"), "data.max_seq_lenght=5")
    assert_one_line_error(code, err, "data.max_seq_lenght", "did you mean data.max_seq_length")


def test_a_missing_dataset_names_the_key(setup, capsys):
    missing = setup["root"] / "nope.jsonl"
    code, _, err = regenerate(
        capsys, "--output", str(setup["root"] / "o.jsonl"), *setup["overrides"], f"data.train_path={missing}"
    )
    assert_one_line_error(code, err, "data.train_path", "no such file")


def test_a_run_killed_after_its_last_answer_finishes_without_an_engine(setup, capsys, monkeypatch):
    """Every conversation was saved, then the final write failed (here: the disk filled at the
    meta): the rerun starts no engine and writes the dataset from OUT.partial."""
    import errno

    real_write = regenerate_module.write_file_atomic

    def full_at_the_meta(path, data):
        if str(path).endswith(".meta.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(regenerate_module, "write_file_atomic", full_at_the_meta)
    out = setup["root"] / "out.jsonl"
    with pytest.raises(OSError):
        regenerate(capsys, "--output", str(out), "--overwrite", *setup["overrides"])
    assert sorted(finished_in_progress(out)) == [0, 1, 2]
    monkeypatch.setattr(regenerate_module, "write_file_atomic", real_write)
    code, _, err = regenerate(capsys, "--output", str(out), "--overwrite", *setup["overrides"])
    assert code == 0, err
    assert len(setup["engines"]) == 1  # only the first run started one
    assert [json.loads(line) for line in out.read_text().splitlines()] == EXPECTED
    assert json.loads((setup["root"] / "out.jsonl.meta.json").read_text())["resumed_conversations"] == 3
    assert leftovers(out.parent) == []
