"""`trainer:evaluate` without --data measures on the last run's eval split (the samples the run held
out, reproduced from its training_config.yaml), never on its training prompts, and says so."""

import json
from pathlib import Path

from torchspec.draft_models.run_pointer import record_last_run
from torchspec.trainer.cli import main
from torchspec.trainer.commands.evaluate import eval_split_prompts
from torchspec.trainer.config import dump_config, load_config
from torchspec.trainer.loop.speculative_eval import prompts_from_tokenized
from torchspec.trainer.loop.training_data import load_training_data
from torchspec.trainer.targets.resolve import load_tokenizer

from trainer_test_helpers import assert_one_line_error, save_small_llama_draft, small_overrides


def _recorded_run(assets, tmp_path, **extra):
    run_dir = tmp_path / "outputs" / "run"
    config = load_config(None, small_overrides(assets, run_dir, **extra))
    run_dir.mkdir(parents=True)
    dump_config(config, run_dir / "training_config.yaml")
    record_last_run(run_dir)
    return run_dir, config


def test_evaluate_defaults_to_the_runs_eval_split(assets, tmp_path, capsys):
    from transformers import AutoConfig

    run_dir, config = _recorded_run(assets, tmp_path)
    held_out = load_training_data(config.data, load_tokenizer(assets["target"], False), 0, True).eval
    prompts, source = eval_split_prompts(Path("outputs/run"), 3)  # as last_run() names it
    assert prompts == prompts_from_tokenized(held_out, 3) and len(prompts) == 3
    train_path = assets["train_path"]
    assert source == f"the eval split of outputs/run (data.eval_split 0.15 of {train_path}, seed 0)"

    vocab = AutoConfig.from_pretrained(assets["target"]).vocab_size
    save_small_llama_draft(tmp_path / "outputs" / "run_hf", vocab, 32, 64, seed=1, include_embeddings=True)
    code = main(["evaluate", "--num-prompts", "2", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"prompts               2 from the eval split of outputs/run (data.eval_split 0.15 of {train_path}" in out
    record = json.loads((tmp_path / "outputs" / "run_hf" / "speculative_eval.json").read_text())
    assert record["prompt_source"].startswith("the eval split of outputs/run")


def test_a_run_without_an_eval_split_needs_data(assets, tmp_path, capsys):
    _recorded_run(assets, tmp_path, **{"data.eval_split": 0})
    code = main(["evaluate"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "outputs/run holds out no eval split", "--data")


def test_bench_defaults_to_the_runs_eval_split_too(assets, tmp_path, capsys):
    from transformers import AutoConfig

    run_dir, config = _recorded_run(assets, tmp_path)
    vocab = AutoConfig.from_pretrained(assets["target"]).vocab_size
    save_small_llama_draft(tmp_path / "outputs" / "run_hf", vocab, 32, 64, seed=1, include_embeddings=True)
    code = main(["bench", "--judge", "evaluator", "--num-prompts", "2", "--max-new-tokens", "3", "--resamples", "50"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "prompts   eval split: 2 prompts (conversations; the eval split of outputs/run (data.eval_split 0.15" in out
    record = json.loads((tmp_path / "outputs" / "run_hf" / "bench.json").read_text())
    (measured,) = record["results"][0]["sets"]
    assert measured["name"] == "eval split" and measured["num_prompts"] == 2
    held_out = load_training_data(config.data, load_tokenizer(assets["target"], False), 0, True).eval
    assert measured["path"].startswith("the eval split of outputs/run") and len(held_out) >= 2
