"""The command line: dispatch to evaluate, overrides around --config. The one-line errors for user
mistakes are the rows of test_bad_inputs.py."""

import pytest

from torchspec.trainer.cli import main

from trainer_test_helpers import assert_one_line_error


def run_cli(capsys, args):
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.err


def test_evaluate_goes_to_the_speculative_evaluator(capsys, tmp_path):
    code = main(["evaluate", "--draft", str(tmp_path / "nope"), "--target", str(tmp_path), "--data", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --draft {tmp_path / 'nope'}: no config.json there"


def test_verify_goes_to_the_engine_check_with_the_same_error_policy(capsys, tmp_path):
    """The folder check comes before any engine starts, so this needs no vLLM."""
    code = main(["verify", "--draft", str(tmp_path / "nope"), "--target", str(tmp_path), "--data", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --draft {tmp_path / 'nope'}: no config.json there"


def test_overrides_on_both_sides_of_config(capsys, tmp_path, monkeypatch):
    """`train a.b=1 --config x.yaml c.d=2`: both overrides apply, in command-line order, over the file."""
    import torchspec.trainer.loop.run as trainer_module

    path = tmp_path / "x.yaml"
    path.write_text("training:\n  max_steps: 3\n  seed: 5\n")
    seen = []
    monkeypatch.setattr(trainer_module, "train", lambda config: seen.append(config))
    args = [
        "optimizer.learning_rate=1e-3",
        "training.max_steps=4",
        "--config",
        str(path),
        "training.max_steps=6",
        "data.eval_split=0.2",
    ]
    assert main(["train", *args]) == 0, capsys.readouterr().err
    (config,) = seen
    assert config.optimizer.learning_rate == 1e-3 and config.training.seed == 5
    assert config.training.max_steps == 6 and config.data.eval_split == 0.2
    # A mistake after --config is reported as an override, an unknown option still as one.
    code, err = run_cli(capsys, ["--config", str(path), "optimizer.learnig_rate=1"])
    assert_one_line_error(code, err, "unknown key optimizer.learnig_rate")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "training.seed=1", "--cofig", str(path)])
    assert exit_info.value.code == 2 and "unrecognized arguments: --cofig" in capsys.readouterr().err
