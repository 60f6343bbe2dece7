"""`engine:verify`'s verdict, decided from its report alone (no vLLM here; integration_tests/test_engine.py
runs the command against the engine).

Lossless greedy decoding gives the same output with and without a draft however badly the engine
reads the draft, so identical output alone says little. The counts are the check: equal rounds
and accepted tokens, and per draft position at most one count apart (float32 rounding may flip a
near-tie late in a chain), mean the engine computed the chains the evaluator did."""

from __future__ import annotations

import pytest

from torchspec.trainer.commands import verify
from torchspec.trainer.commands.verify import VerifyReport, first_differences, verdict


def _report(**changes) -> VerifyReport:
    values = dict(
        draft="draft",
        target="target",
        num_prompts=8,
        max_new_tokens=48,
        num_draft_tokens=4,
        engine_version="0.32.0",
        engine_acceptance_length=1.591,
        engine_position_acceptance=[0.37, 0.12, 0.07, 0.03],
        engine_num_drafts=237,
        engine_num_accepted_tokens=140,
        evaluator_acceptance_length=1.591,
        evaluator_position_acceptance=[0.37, 0.12, 0.07, 0.03],
        evaluator_num_rounds=237,
        evaluator_num_accepted_tokens=140,
        engine_output_identical_with_and_without_draft=True,
        engine_output_identical_to_evaluator=True,
        engine_accepted_per_position=[88, 29, 16, 7],
        evaluator_accepted_per_position=[88, 29, 16, 7],
    )
    return VerifyReport(**{**values, **changes})


def test_identical_outputs_and_equal_counts_pass():
    report = _report()
    assert report.counts_agree and verdict(report) == []


def test_one_count_apart_at_a_position_passes_as_the_documented_rounding_tolerance():
    # Seen once in ~150 rounds: vLLM [79, 38, 23, 15], evaluator [78, 38, 23, 16], same totals.
    report = _report(engine_accepted_per_position=[79, 38, 23, 15], evaluator_accepted_per_position=[78, 38, 23, 16])
    assert report.counts_agree and verdict(report) == []


@pytest.mark.parametrize(
    "changes, words",
    [
        # What a draft read with the wrong aux layers, norm flags or vocabulary mapping looks like:
        # identical output (greedy decoding is lossless), other counts.
        (
            {"engine_num_drafts": 301, "engine_num_accepted_tokens": 12},
            ["rounds with a draft: vLLM 301, evaluator 237", "accepted draft tokens: vLLM 12, evaluator 140"],
        ),
        (
            {"engine_accepted_per_position": [90, 27, 16, 7]},
            ["draft position 1: vLLM accepted 90, evaluator 88", "draft position 2: vLLM accepted 27, evaluator 29"],
        ),
        ({"engine_num_accepted_tokens": 141}, ["accepted draft tokens: vLLM 141, evaluator 140"]),
    ],
    ids=["totals", "positions", "one-token-total"],
)
def test_counts_that_disagree_fail_although_the_output_is_identical(changes, words):
    report = _report(**changes)
    problems = verdict(report)
    assert not report.counts_agree and problems
    text = " | ".join(problems)
    for word in words:
        assert word in text, text


def test_output_that_changes_with_the_draft_fails_naming_where():
    report = _report(engine_output_identical_with_and_without_draft=False, engine_output_differences=[[2, 17]])
    assert report.counts_agree
    assert verdict(report) == [
        "vLLM's output with the draft differs from its output without it: prompt 2 from token 17"
    ]


def test_first_differences_name_each_prompt_and_token_where_outputs_part():
    plain = [[1, 2, 3], [4, 5, 6], [7, 8], [9]]
    served = [[1, 2, 3], [4, 0, 6], [7, 8, 1], [9]]
    assert first_differences(served, plain) == [[1, 1], [2, 2]]


def test_the_exit_status_follows_the_verdict(monkeypatch, tmp_path, capsys):
    reports = iter([_report(), _report(engine_num_accepted_tokens=12)])
    monkeypatch.setattr(verify, "verify_draft", lambda *args, **kwargs: next(reports))
    argv = ["--draft", str(tmp_path), "--target", str(tmp_path), "--data", str(tmp_path)]
    argv += ["--output", str(tmp_path / "report.json")]
    assert verify.main(argv) == 0
    assert verify.main(argv) == 1  # before: 0, the outputs being identical
    out = capsys.readouterr().out
    assert "accepted draft tokens: vLLM 12, evaluator 140" in out


def test_without_the_evaluator_only_the_engine_is_judged_and_the_report_says_so():
    report = _report(evaluator_ran=False, evaluator_num_rounds=0, evaluator_num_accepted_tokens=0)
    assert report.counts_agree and verdict(report) == []
    assert "not compared (--no-evaluator)" in report.table()
    assert verdict(_report(evaluator_ran=False, engine_output_identical_with_and_without_draft=False))


def test_engine_arguments_reach_the_engine_and_bad_ones_are_one_line(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_verify(*args, **kwargs):
        seen.update(kwargs)
        return _report(evaluator_ran=not kwargs["evaluator"])

    monkeypatch.setattr(verify, "verify_draft", fake_verify)
    argv = ["--draft", str(tmp_path), "--target", str(tmp_path), "--data", str(tmp_path)]
    argv += ["--output", str(tmp_path / "report.json")]
    extra = [
        "--engine-args",
        '{"tensor_parallel_size": 8}',
        "--engine-python",
        "/envs/vllm/bin/python",
        "--no-evaluator",
    ]
    assert verify.main([*argv, *extra]) == 0
    assert seen == {
        "engine_args": {"tensor_parallel_size": 8},
        "engine_python": "/envs/vllm/bin/python",
        "evaluator": False,
        "server": None,
        "plain_server": None,
    }
    with pytest.raises(SystemExit) as exit_info:
        verify.main([*argv, "--engine-args", "[8]"])
    assert exit_info.value.code == 2 and "expected a JSON object of engine arguments" in capsys.readouterr().err
