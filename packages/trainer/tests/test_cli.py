"""The command line: one-line errors for user mistakes, the evaluate placeholder."""

import importlib.util
import json

import pytest

from torchspec.trainer.cli import main

from trainer_test_helpers import small_overrides


def run_cli(capsys, args):
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_evaluate_goes_to_the_speculative_evaluator(capsys, tmp_path):
    code = main(["evaluate", "--draft", str(tmp_path / "nope"), "--target", str(tmp_path), "--data", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --draft {tmp_path / 'nope'}: no config.json there"


def test_typo_in_an_override(capsys, tmp_path):
    code, err = run_cli(capsys, ["training.learnig_rate=1e-3"])
    assert_one_line_error(code, err, "unknown key training.learnig_rate", "did you mean training.learning_rate?")


def test_typo_in_a_config_file(capsys, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  aux_layer_id: [1, 2, 3]\n")
    code, err = run_cli(capsys, ["--config", str(path)])
    assert_one_line_error(code, err, f"unknown key model.aux_layer_id in {path}", "did you mean model.aux_layer_ids?")


def test_overrides_on_both_sides_of_config(capsys, tmp_path, monkeypatch):
    """`train a.b=1 --config x.yaml c.d=2`: both overrides apply, in command-line order, over the file."""
    import torchspec.trainer.trainer as trainer_module

    path = tmp_path / "x.yaml"
    path.write_text("training:\n  max_steps: 3\n  seed: 5\n")
    seen = []
    monkeypatch.setattr(trainer_module, "train", lambda config: seen.append(config))
    args = ["training.learning_rate=1e-3", "training.max_steps=4", "--config", str(path), "training.max_steps=6",
            "data.eval_split=0.2"]
    assert main(["train", *args]) == 0, capsys.readouterr().err
    (config,) = seen
    assert config.training.learning_rate == 1e-3 and config.training.seed == 5
    assert config.training.max_steps == 6 and config.data.eval_split == 0.2
    # A mistake after --config is reported as an override, an unknown option still as one.
    code, err = run_cli(capsys, ["--config", str(path), "training.learnig_rate=1"])
    assert_one_line_error(code, err, "unknown key training.learnig_rate")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "training.seed=1", "--cofig", str(path)])
    assert exit_info.value.code == 2 and "unrecognized arguments: --cofig" in capsys.readouterr().err


def with_assets(assets, tmp_path, **extra):
    return small_overrides(assets, tmp_path / "out", **extra)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ({"model.target_model_path": "/no/such/model"}, ["model.target_model_path /no/such/model", "no config.json"]),
        ({"model.aux_layer_ids": "[2, 3, 7]"}, ["outside the target's 7 layers", "use ids in [0, 6]"]),
        ({"data.train_path": "/no/such/data.jsonl"}, ["data.train_path: ", "/no/such/data.jsonl"]),
        ({"training.global_batch_size": 64, "training.micro_batch_size": 8}, ["fewer than one global batch (64)"]),
        ({"model.draft_vocab_size": 5000}, ["draft_vocab_size (5000) exceeds vocab_size (2048)"]),
        ({"training.resume": "/no/such/checkpoint"}, ["training.resume /no/such/checkpoint"]),
        ({"training.tensorboard": "true"}, ["pip install tensorboard, or set training.tensorboard=false"]),
    ],
)
def test_bad_inputs_are_one_line_errors(capsys, assets, tmp_path, extra, fragments):
    if "training.tensorboard" in extra and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    code, err = run_cli(capsys, with_assets(assets, tmp_path, **extra))
    assert_one_line_error(code, err, *fragments)


def test_unusable_data_is_a_data_error(capsys, assets, tmp_path):
    code, err = run_cli(capsys, with_assets(assets, tmp_path, **{"data.train_path": assets["broken"]}))
    assert_one_line_error(code, err, "no usable training sample")


def test_draft_config_that_does_not_fit_the_target(capsys, assets, tmp_path):
    from transformers import AutoConfig

    from torchspec.trainer.draft import draft_config_from_target

    values = draft_config_from_target(AutoConfig.from_pretrained(assets["target"]))
    values["target_hidden_size"] = 4096
    path = tmp_path / "draft.json"
    path.write_text(json.dumps(values))
    code, err = run_cli(capsys, with_assets(assets, tmp_path, **{"model.draft_config": str(path)}))
    assert_one_line_error(code, err, str(path), "target_hidden_size=4096 but the target's hidden_size is 64")


def test_tokenizer_larger_than_the_target_vocabulary(capsys, assets, tmp_path):
    from torchspec.data import build_local_tokenizer

    build_local_tokenizer(tmp_path / "tok", vocab_size=3000)
    code, err = run_cli(capsys, with_assets(assets, tmp_path, **{"model.tokenizer_path": str(tmp_path / "tok")}))
    assert_one_line_error(code, err, "the tokenizer has 3000 tokens but the target's vocabulary has 2048")
