"""Integration: short CPU runs of the whole online loop on a tiny target."""

import json

import pytest
import torch
import yaml

from torchspec.trainer.config import ConfigError, load_config
from torchspec.trainer.loop.checkpoint import find_latest, list_checkpoints
from torchspec.trainer.loop.run import train

from trainer_test_helpers import Interrupted, interrupt_at, read_metrics, small_overrides


def run(assets, output_dir, callback=None, **extra):
    return train(load_config(None, small_overrides(assets, output_dir, **extra)), step_callback=callback)


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    """8 uninterrupted steps, checkpoints every 2."""
    output_dir = tmp_path_factory.mktemp("reference")
    result = run(assets, output_dir, **{"checkpoint.save_interval": 2})
    return output_dir, result


def test_loss_falls_and_accuracy_rises(assets, tmp_path):
    result = run(assets, tmp_path, **{"training.max_steps": 24, "metrics.eval_interval": 12})
    losses = [r["loss"] for r in result.train_history]
    accuracy = [r["acc"] for r in result.train_history]
    assert sum(losses[-4:]) / 4 < 0.75 * sum(losses[:4]) / 4
    assert sum(accuracy[-4:]) / 4 > sum(accuracy[:4]) / 4 + 0.1
    evals = read_metrics(tmp_path, "eval")
    assert sorted(evals) == [12, 24] and evals[24]["loss"] < evals[12]["loss"]


def test_run_outputs(reference_run):
    output_dir, result = reference_run
    assert result.steps == 8 and result.checkpoint == output_dir / "iter_0000008" == find_latest(output_dir)
    assert [step for step, _ in list_checkpoints(output_dir)] == [2, 4, 6, 8]
    checkpoint = result.checkpoint
    for name in ("config.json", "aux_layers.json", "training_config.yaml", "trainer_state.json", "rng_state_rank0.pt"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "aux_layers.json").read_text()) == {
        "aux_layer_ids": [2, 3, 4],
        "num_target_layers": 7,
    }
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    resolved = yaml.safe_load((output_dir / "training_config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 8 and resolved["model"]["aux_layer_ids"] is None
    assert load_config(output_dir / "training_config.yaml") == load_config(checkpoint / "training_config.yaml")

    records = read_metrics(output_dir)
    assert sorted(records) == list(range(1, 9))
    first = records[1]
    for key in (
        "loss",
        "loss_per_position",
        "acc_per_position",
        "cond_acc_per_position",
        "acceptance_length",
        "tokens_per_s",
        "target_time_share",
        "lr",
        "grad_norm",
    ):
        assert key in first, key
    assert len(first["acc_per_position"]) == 3 and 0 < first["target_time_share"] < 1
    assert first["lr"] == pytest.approx(3e-3 * 1 / 1)  # warmup_ratio 0.1 of 8 steps rounds to 1 step
    best = json.loads((output_dir / "best.json").read_text())
    assert best["checkpoint"] in {"iter_0000004", "iter_0000008"}


def test_interrupted_and_resumed_run_repeats_the_losses_bitwise(assets, reference_run, tmp_path):
    reference_dir, _ = reference_run
    with pytest.raises(Interrupted):
        run(assets, tmp_path, interrupt_at(5), **{"checkpoint.save_interval": 2})
    assert find_latest(tmp_path).name == "iter_0000004"
    resumed = run(assets, tmp_path, **{"checkpoint.save_interval": 2, "checkpoint.resume": "auto"})
    assert [r["step"] for r in resumed.train_history] == [5, 6, 7, 8]

    expected, got = read_metrics(reference_dir), read_metrics(tmp_path)
    for step in range(1, 9):
        for key in ("loss", "loss_per_position", "acc_per_position", "grad_norm", "lr"):
            assert got[step][key] == expected[step][key], (step, key)
    # The final weights are the same bits too.
    from torchspec.draft_models.checkpoint_layout import TrainingCheckpoint

    a, b = TrainingCheckpoint.open(reference_dir / "iter_0000008"), TrainingCheckpoint.open(tmp_path / "iter_0000008")
    for name in a.weight_names():
        assert torch.equal(a.load_tensor(name), b.load_tensor(name)), name


def _as_written_by_0_3(checkpoint, total_steps: int) -> None:
    """Rewrite ``checkpoint``'s trainer_state.json and training_config.yaml as torchspec-trainer 0.3
    wrote them: the train state at the top level, the LR schedule's shape beside its position, and
    every moved key under `training`."""
    from torchspec.trainer.config import MOVED_KEYS

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    shape = {"total_steps": total_steps, "warmup_steps": 1, "kind": "cosine", "min_lr_ratio": 0.1, "decay_steps": 1}
    legacy = {
        "step": state["step"],
        "lr_scheduler": {**state["lr_scheduler"], "lr_lambdas": [shape]},
        "data": state["data"],
        **{key: state["train"][key] for key in ("best", "aux_layer_ids", "world_size")},
    }
    (checkpoint / "trainer_state.json").write_text(json.dumps(legacy))
    config = yaml.safe_load((checkpoint / "training_config.yaml").read_text())
    for old, new in MOVED_KEYS.items():
        section, key = new.split(".")
        config["training"][old.split(".")[1]] = config[section].pop(key)
    config = {section: values for section, values in config.items() if values}
    (checkpoint / "training_config.yaml").write_text(yaml.safe_dump(config))


def test_a_checkpoint_of_torchspec_trainer_0_3_resumes_bitwise(assets, reference_run, tmp_path, caplog):
    import shutil

    reference_dir, _ = reference_run
    shutil.copytree(reference_dir / "iter_0000004", tmp_path / "iter_0000004")
    _as_written_by_0_3(tmp_path / "iter_0000004", total_steps=8)
    resumed = run(assets, tmp_path, **{"checkpoint.save_interval": 2, "checkpoint.resume": "auto"})
    assert [r["step"] for r in resumed.train_history] == [5, 6, 7, 8]
    expected = read_metrics(reference_dir)
    for record in resumed.train_history:
        for key in ("loss", "grad_norm", "lr"):
            assert record[key] == expected[record["step"]][key], (record["step"], key)

    # A finished 0.3 run: the old layout of its saved config is read as the new one, so a changed
    # (moved) key is still pointed out.
    _as_written_by_0_3(tmp_path / "iter_0000008", total_steps=8)
    caplog.clear()
    with caplog.at_level("INFO", logger="torchspec.trainer"):
        result = run(
            assets, tmp_path, **{"checkpoint.save_interval": 2, "checkpoint.resume": "auto", "ttt.loss_decay": 0.5}
        )
    assert result.already_complete and result.steps == 8
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.endswith("(note: that run's config differs from this one in ttt.loss_decay)"), line


def test_a_full_disk_during_a_save_keeps_the_last_complete_checkpoint(assets, tmp_path, monkeypatch, capsys):
    """The disk fills while iter_0000004 is written: one error line naming the checkpoint that is
    still the latest complete one; resume and export take it, the partial save is never taken as
    complete, and the resumed run's metrics hold each step once (steps 3 and 4 had been logged)."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    from torchspec.draft_models.checkpoint_layout import resolve_checkpoint
    from torchspec.trainer.cli import main

    from crafted_checkpoints import FullDiskFile

    output_dir = tmp_path / "run"
    overrides = small_overrides(
        assets, output_dir, **{"checkpoint.save_interval": 2, "metrics.eval_interval": 0, "checkpoint.resume": "auto"}
    )
    real_create_stream = FileSystem.create_stream

    @contextlib.contextmanager
    def full_disk_at_step_4(self, path, mode):
        with real_create_stream(self, path, mode) as stream:
            yield FullDiskFile(stream, room=500) if ".tmp_iter_0000004" in str(path) else stream

    monkeypatch.setattr(FileSystem, "create_stream", full_disk_at_step_4)
    assert main(["train", *overrides]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith(
        f"error: training.output_dir {output_dir}: saving checkpoint iter_0000004 failed (No space left on device); "
    )
    assert f"{output_dir / 'iter_0000002'} is still the latest complete checkpoint" in line
    assert [step for step, _ in list_checkpoints(output_dir)] == [2]
    assert not list(output_dir.glob(".tmp_iter_*"))
    assert sorted(read_metrics(output_dir)) == [1, 2, 3, 4]  # logged before the failed save
    monkeypatch.undo()

    # the converter resolves an output_dir through the same layout module
    assert resolve_checkpoint(output_dir) == output_dir / "iter_0000002"
    with (output_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 5, "split": "tr')  # and a kill in the middle of a line
    monkeypatch.chdir(tmp_path)  # undo() also undid the autouse chdir; the CLI records its run in ./outputs
    assert main(["train", *overrides]) == 0
    assert [step for step, _ in list_checkpoints(output_dir)] == [2, 4, 6, 8]
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, 9))


def test_a_resumed_run_says_where_it_continues_from(assets, reference_run, tmp_path, caplog):
    """One line names the folder, the step and the setting, and how to start over instead."""
    import shutil

    reference_dir, _ = reference_run
    output_dir = tmp_path / "run"
    shutil.copytree(reference_dir, output_dir)
    with caplog.at_level("INFO", logger="torchspec.trainer"):
        result = run(
            assets, output_dir, **{"checkpoint.save_interval": 2, "checkpoint.resume": "auto", "training.max_steps": 10}
        )
    assert [r["step"] for r in result.train_history] == [9, 10] and not result.already_complete
    hints = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming ")]
    assert hints == [
        f"resuming {output_dir} from step 8 of 10 (checkpoint.resume=auto); "
        f"to start over instead, delete {output_dir} or set training.output_dir to another folder"
    ]


def test_rerunning_a_completed_run_says_so_and_trains_nothing(assets, reference_run, tmp_path, monkeypatch, caplog):
    """`hatch run trainer:train` twice: the second one (resume: auto) finds the finished run, says in
    one line that it is complete and how to start over, exits 0 and touches nothing."""
    import shutil

    from torchspec.trainer.cli import main

    reference_dir, _ = reference_run
    output_dir = tmp_path / "run"
    shutil.copytree(reference_dir, output_dir)
    before = {path.relative_to(output_dir): path.stat().st_mtime_ns for path in output_dir.rglob("*")}
    monkeypatch.chdir(tmp_path)  # the CLI records the run in ./outputs/.last_run
    overrides = small_overrides(assets, output_dir, **{"checkpoint.save_interval": 2, "checkpoint.resume": "auto"})
    with caplog.at_level("INFO"):
        code = main(["train", *overrides])
    assert code == 0
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("torchspec")]
    assert lines == [
        f"the run in {output_dir} is already complete at step 8 ({output_dir / 'iter_0000008'}, "
        f"checkpoint.resume=auto); to start over, delete {output_dir} or set training.output_dir to "
        f"another folder; to train longer, raise training.max_steps or training.num_epochs"
    ]
    assert {path.relative_to(output_dir): path.stat().st_mtime_ns for path in output_dir.rglob("*")} == before

    # Through the API: the result says so, and a changed config is pointed out on the same line.
    caplog.clear()
    with caplog.at_level("INFO", logger="torchspec.trainer"):
        result = run(
            assets,
            output_dir,
            **{"checkpoint.save_interval": 2, "checkpoint.resume": "auto", "model.draft_architecture": "mla"},
        )
    assert result.already_complete and result.steps == 8 and result.train_history == []
    assert result.checkpoint == output_dir / "iter_0000008"
    (line,) = [r.getMessage() for r in caplog.records]
    assert "already complete at step 8" in line and "differs from this one in model.draft_architecture" in line


def test_continual_training_takes_weights_only(assets, reference_run, tmp_path):
    reference_dir, _ = reference_run
    fresh = read_metrics(reference_dir)[1]
    result = run(assets, tmp_path, **{"checkpoint.continual_training": str(reference_dir), "metrics.eval_interval": 0})
    continued = result.train_history[0]
    assert continued["loss"] < 0.9 * fresh["loss"]  # starts from trained weights
    assert continued["lr"] == fresh["lr"]  # but the schedule starts over


def test_pruned_vocabulary_run_stores_its_mapping_with_the_draft(assets, tmp_path):
    from torchspec.data import VocabMapping
    from torchspec.draft_models import TrainingCheckpoint

    result = run(assets, tmp_path, **{"model.draft_vocab_size": 512, "training.max_steps": 2})
    mapping = VocabMapping.load(result.checkpoint / "vocab_mapping.safetensors")
    assert mapping.draft_vocab_size == 512
    assert all(len(r["counted_positions"]) == 3 for r in result.train_history)
    # what export reads (integration_tests export and serve such runs)
    checkpoint = TrainingCheckpoint.open(tmp_path)
    assert checkpoint.config.draft_vocab_size == 512 and checkpoint.tensor_info("lm_head.weight")[0][0] == 512
    assert torch.equal(checkpoint.load_tensor("d2t"), mapping.d2t)


def test_gradient_checkpointing_repeats_the_losses_bitwise(assets, reference_run, tmp_path):
    """ttt.gradient_checkpointing recomputes the whole draft layer instead of its MLP only (the
    default): memory policy, not math."""
    _, reference = reference_run
    result = run(assets, tmp_path, **{"checkpoint.save_interval": 2, "ttt.gradient_checkpointing": "true"})
    assert [r["loss"] for r in result.train_history] == [r["loss"] for r in reference.train_history]
    assert [r["grad_norm"] for r in result.train_history] == [r["grad_norm"] for r in reference.train_history]


def test_mla_draft_trains(assets, tmp_path):
    result = run(
        assets, tmp_path, **{"model.draft_architecture": "mla", "training.max_steps": 6, "metrics.eval_interval": 0}
    )
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Eagle3DeepseekV2ForCausalLM"]
    assert result.train_history[-1]["loss"] < result.train_history[0]["loss"]


def test_continuing_with_another_draft_shape_is_a_config_error(assets, reference_run, tmp_path):
    reference_dir, _ = reference_run
    with pytest.raises(ConfigError, match="the checkpoint's draft has architectures=.*LlamaForCausalLMEagle3"):
        run(
            assets, tmp_path, **{"checkpoint.continual_training": str(reference_dir), "model.draft_architecture": "mla"}
        )


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(assets, reference_run):
    reference_dir, _ = reference_run
    with pytest.raises(ConfigError, match="already holds checkpoints; set checkpoint.resume=auto"):
        run(assets, reference_dir)


@pytest.mark.parametrize("draft_vocab_size", [None, 300])
def test_speculative_evaluation_at_the_end_of_training(assets, tmp_path, draft_vocab_size):
    """The gathered draft decodes held-out prompts for real: output identical to the target's own
    greedy decoding, acceptance reported with the bonus token, a JSON record in output_dir."""
    extra = {"metrics.speculative_eval_prompts": 2, "training.max_steps": 2}
    if draft_vocab_size:
        extra["model.draft_vocab_size"] = draft_vocab_size
    result = run(assets, tmp_path, **extra)
    record = result.speculative_eval
    assert record is not None and record["num_prompts"] == 2
    assert record["identical_to_target"] is True
    assert 1.0 <= record["acceptance_length"] <= 1 + record["num_draft_tokens"]
    assert json.loads((tmp_path / "speculative_eval.json").read_text())["step"] == 2


def test_rolling_back_into_the_same_output_dir_is_refused_and_branching_works(assets, reference_run, tmp_path):
    """checkpoint.resume=<dir>/iter_0000004 into <dir>, which holds the abandoned run's iter_6..8:
    refused in one line before anything is written (keep_last=2 would otherwise delete the new
    run's checkpoints as they are saved, and resume: auto and export would pick the old iter_8);
    the branch the line suggests (a new output_dir, the same resume) continues bitwise."""
    import shutil

    reference_dir, _ = reference_run
    output_dir = tmp_path / "run"
    shutil.copytree(reference_dir, output_dir)
    before = {path.relative_to(output_dir): path.stat().st_mtime_ns for path in output_dir.rglob("*")}
    rollback = output_dir / "iter_0000004"
    extra = {"checkpoint.save_interval": 2, "checkpoint.keep_last": 2, "checkpoint.resume": str(rollback)}
    with pytest.raises(ConfigError) as raised:
        run(assets, output_dir, **extra)
    message = str(raised.value)
    assert "\n" not in message
    assert f"training.output_dir {output_dir} holds newer checkpoints than iter_0000004" in message
    assert f"set training.output_dir to a new folder and checkpoint.resume={rollback}" in message
    assert {path.relative_to(output_dir): path.stat().st_mtime_ns for path in output_dir.rglob("*")} == before

    branch = run(assets, tmp_path / "branch", **extra)
    assert [r["step"] for r in branch.train_history] == [5, 6, 7, 8]
    expected = read_metrics(reference_dir)
    assert [r["loss"] for r in branch.train_history] == [expected[s]["loss"] for s in (5, 6, 7, 8)]
    assert [step for step, _ in list_checkpoints(tmp_path / "branch")] == [6, 8]
    assert (tmp_path / "branch" / "latest").read_text().strip() == find_latest(tmp_path / "branch").name
