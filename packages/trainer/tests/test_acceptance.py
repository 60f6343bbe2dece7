"""Real acceptance during training (loop/acceptance.py): measured at its intervals on held-out
prompts, logged beside the simulated one, picking best.json, and stopping a run early."""

import dataclasses
import json

import pytest

from torchspec.trainer.config import ConfigError, load_config
from torchspec.trainer.loop import acceptance
from torchspec.trainer.loop.checkpoint import list_checkpoints
from torchspec.trainer.loop.run import train
from torchspec.trainer.loop.states import TrainState

from trainer_test_helpers import Interrupted, interrupt_at, read_metrics, small_overrides

REAL = {"metrics.real_acceptance_prompts": 3, "metrics.real_acceptance_max_new_tokens": 6}


def run(assets, output_dir, callback=None, **extra):
    return train(load_config(None, small_overrides(assets, output_dir, **extra)), step_callback=callback)


def scripted(monkeypatch, values):
    """The evaluator runs as it is, then reports ``values`` one per measurement (shared across runs)."""
    script, real = iter(values), acceptance.evaluate_prompts

    def fake(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), acceptance_length=next(script))

    monkeypatch.setattr(acceptance, "evaluate_prompts", fake)


def test_real_acceptance_is_logged_beside_the_simulated(assets, tmp_path, caplog):
    with caplog.at_level("INFO", logger="torchspec.trainer"):
        run(assets, tmp_path, **REAL, **{"training.max_steps": 4, "metrics.real_acceptance_interval": 2})
    real, simulated = read_metrics(tmp_path, "acceptance"), read_metrics(tmp_path, "eval")
    assert sorted(real) == [2, 4] and sorted(simulated) == [4]
    record = real[4]
    assert 1 <= record["real_acceptance_length"] <= 5 and record["num_prompts"] == 3
    assert record["real_acceptance_low"] <= record["real_acceptance_length"] <= record["real_acceptance_high"]
    assert len(record["real_position_acceptance"]) == record["num_draft_tokens"] == 4
    assert record["simulated_acceptance_length"] == simulated[4]["acceptance_length"]
    assert "simulated_acceptance_length" not in real[2]  # no simulated evaluation at step 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("acceptance step 4")]
    assert len(lines) == 1 and "real " in lines[0] and "95% CI" in lines[0] and "simulated " in lines[0]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["metric"] == "real_acceptance_length" and best["value"] == real[best["step"]]["real_acceptance_length"]


def test_best_json_follows_real_acceptance_and_survives_retention(assets, tmp_path, monkeypatch):
    # Real acceptance peaks at step 2 while the simulated one rises with training.
    scripted(monkeypatch, [2.5, 1.5, 1.2, 1.1])
    overrides = {
        **REAL,
        "metrics.real_acceptance_interval": 2,
        "metrics.eval_interval": 2,
        "checkpoint.save_interval": 2,
        "checkpoint.keep_last": 1,
    }
    run(assets, tmp_path, **overrides)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["checkpoint"] == "iter_0000002" and best["step"] == 2
    assert best["metric"] == "real_acceptance_length" and best["value"] == 2.5
    simulated = read_metrics(tmp_path, "eval")
    assert max(simulated, key=lambda step: simulated[step]["acceptance_length"]) != 2  # the two disagree
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 8]  # keep_last 1, and the best


def test_early_stop_after_k_evaluations_without_improvement(assets, tmp_path, monkeypatch, caplog):
    scripted(monkeypatch, [2.0, 1.9, 1.8, 1.7, 1.6])
    overrides = {**REAL, "metrics.real_acceptance_interval": 2, "training.early_stop_patience": 2}
    with caplog.at_level("INFO", logger="torchspec.trainer"):
        result = run(assets, tmp_path, **{**overrides, "training.max_steps": 12})
    assert result.steps == 6 and result.checkpoint == tmp_path / "iter_0000006"
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 6]
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "iter_0000002"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("early stop")]
    assert "step 6" in line and "2 evaluations" in line and "real_acceptance_length" in line
    # Started again, the stopped run is complete; a larger patience trains on.
    caplog.clear()
    with caplog.at_level("INFO", logger="torchspec.trainer"):
        again = run(assets, tmp_path, **{**overrides, "training.max_steps": 12, "checkpoint.resume": "auto"})
    assert again.already_complete and again.steps == 6
    assert "stopped early at step 6" in caplog.records[0].getMessage()


def test_a_resumed_run_keeps_counting_evaluations_without_improvement(assets, tmp_path, monkeypatch):
    scripted(monkeypatch, [2.0, 1.9, 1.8, 1.7, 1.6, 1.5])
    overrides = {
        **REAL,
        "metrics.real_acceptance_interval": 2,
        "training.early_stop_patience": 3,
        "training.max_steps": 12,
        "checkpoint.save_interval": 2,
    }
    with pytest.raises(Interrupted):
        run(assets, tmp_path, interrupt_at(5), **overrides)
    resumed = run(assets, tmp_path, **{**overrides, "checkpoint.resume": "auto"})
    assert resumed.steps == 8  # evaluations at 2 (best), 4, 6, 8: three without improvement


def test_a_target_outside_the_process_falls_back_to_simulated(assets, tmp_path, caplog):
    config = load_config(None, small_overrides(assets, tmp_path, **REAL, **{"target.backend": "vllm"}))
    assert "target.backend=vllm" in acceptance.real_acceptance_off(config)
    assert acceptance.real_acceptance_off(load_config(None, small_overrides(assets, tmp_path, **REAL))) is None
    config = load_config(None, small_overrides(assets, tmp_path))  # real_acceptance_prompts 0
    assert "metrics.real_acceptance_prompts=0" in acceptance.real_acceptance_off(config)


def test_train_state_best_and_counter():
    state = TrainState([1, 2, 3])
    state.step = 2
    assert state.offer_best(2.0, "iter_0000002", "acceptance_length")
    state.step = 4
    assert not state.offer_best(1.5, "iter_0000004", "acceptance_length") and state.stale_evaluations == 1
    # Another metric (real acceptance switched on at a resume) starts a new best.
    state.step = 6
    assert state.offer_best(1.2, "iter_0000006", "real_acceptance_length") and state.stale_evaluations == 0
    assert state.best == {"step": 6, "metric": "real_acceptance_length", "value": 1.2, "checkpoint": "iter_0000006"}
    state.offer_best(1.0, "iter_0000008", "real_acceptance_length")
    restored = TrainState([1, 2, 3])
    restored.load_state_dict(state.state_dict())
    assert restored.stale_evaluations == 1 and restored.best == state.best
    # Saved before 0.8: a best of the simulated acceptance, no counter.
    restored.load_state_dict({"step": 4, "best": {"step": 2, "acceptance_length": 2.0, "checkpoint": "iter_0000002"}})
    assert restored.stale_evaluations == 0
    assert not restored.offer_best(1.9, "iter_0000004", "acceptance_length")


def test_config_values_are_checked():
    for override, message in (
        ("metrics.real_acceptance_interval=-1", "metrics.real_acceptance_interval must be a finite number >= 0"),
        ("metrics.real_acceptance_prompts=-2", "metrics.real_acceptance_prompts must be a finite number >= 0"),
        ("metrics.real_acceptance_max_new_tokens=0", "metrics.real_acceptance_max_new_tokens must be a finite"),
        ("training.early_stop_patience=0", "training.early_stop_patience must be a finite number > 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    # Early stop needs evaluations to count before the end.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.early_stop_patience=2", "data.eval_split=0"])
    assert "training.early_stop_patience" in str(err.value) and "held-out" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="metrics.real_acceptance_interval is 0"):
        load_config(None, ["training.early_stop_patience=2", "metrics.real_acceptance_interval=0"])
    with pytest.raises(ConfigError, match="metrics.eval_interval is 0"):
        load_config(
            None,
            ["training.early_stop_patience=2", "metrics.real_acceptance_prompts=0", "metrics.eval_interval=0"],
        )
    load_config(None, ["training.early_stop_patience=2"])
