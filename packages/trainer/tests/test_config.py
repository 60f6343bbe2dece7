import textwrap
from pathlib import Path

import pytest
import yaml

from torchspec.trainer.config import (
    MOVED_KEYS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    dump_config,
    load_config,
    parse_yaml_scalar,
    upgrade_saved_config,
)

REPO = Path(__file__).resolve().parents[3]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_file_values_and_overrides_land_in_typed_fields(tmp_path):
    path = write(
        tmp_path,
        """
        model:
          target_model_path: /models/qwen
          aux_layer_ids: [1, 5, 9]
        training:
          max_steps: 50
        optimizer:
          learning_rate: 1e-4
          betas: [0.9, 0.99]
    """,
    )
    config = load_config(path, ["optimizer.learning_rate=5e-5", "lr_schedule.kind=wsd", "data.eval_path=null"])
    assert config.model.target_model_path == "/models/qwen"
    assert config.model.aux_layer_ids == [1, 5, 9]
    assert config.optimizer.learning_rate == 5e-5 and isinstance(config.optimizer.learning_rate, float)
    assert config.optimizer.betas == [0.9, 0.99]
    assert config.training.max_steps == 50
    assert config.lr_schedule.kind == "wsd"
    assert config.data.eval_path is None
    # Untouched keys keep their defaults.
    assert config.ttt.length == 7 and config.ttt.loss_decay == 0.8


@pytest.mark.parametrize(
    "text, value",
    [
        ("5e-5", 5e-5),
        ("1E3", 1000.0),
        ("3", 3),
        ("0.5", 0.5),
        ("true", True),
        ("null", None),
        ("abc", "abc"),
        ("[1, 2]", [1, 2]),
    ],
)
def test_scalars_follow_yaml_rules_with_exponent_floats(text, value):
    parsed = parse_yaml_scalar(text)
    assert parsed == value and type(parsed) is type(value)


def test_unknown_key_names_file_and_suggests_the_closest(tmp_path):
    path = write(tmp_path, "optimizer:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"unknown key optimizer.learnig_rate in {path}; did you mean optimizer.learning_rate?"


def test_key_in_wrong_place_points_to_its_section(tmp_path):
    path = write(tmp_path, "learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean optimizer.learning_rate"):
        load_config(path)
    path = write(tmp_path, "data:\n  ttt_length: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key data.ttt_length .*did you mean ttt.length"):
        load_config(path)


def test_unknown_override_key_is_reported_with_the_override():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lr_schedule.warmup_step=10"])
    assert "lr_schedule.warmup_step" in str(err.value) and "did you mean lr_schedule.warmup_steps" in str(err.value)
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["training.seed"])
    with pytest.raises(ConfigError, match="unknown key trainig.seed"):
        load_config(None, ["trainig.seed=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "training.micro_batch_size=four",
            "training.micro_batch_size in command-line override .* must be integer, got 'four'",
        ),
        ("training.micro_batch_size=2.5", "must be integer, got 2.5"),
        ("training.micro_batch_size=true", "must be integer, got True"),
        ("metrics.tensorboard=1", "metrics.tensorboard .* must be true/false, got 1"),
        ("lr_schedule.kind=linear", r"must be 'cosine' \| 'constant' \| 'wsd', got 'linear'"),
        ("model.aux_layer_ids=[1, x, 3]", "model.aux_layer_ids .* must be list of integer \\| null, got"),
        ("training.max_steps=[3]", "training.max_steps .* must be integer \\| null, got \\[3\\]"),
    ],
)
def test_wrong_types_fail_with_the_key_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_integers_are_accepted_for_floats():
    config = load_config(None, ["optimizer.learning_rate=1", "training.max_grad_norm=2"])
    assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="global_batch_size .* multiple of training.micro_batch_size"):
        load_config(None, ["training.global_batch_size=10", "training.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="model.aux_layer_ids .* 3 layer"):
        load_config(None, ["model.aux_layer_ids=[1, 2]"])
    # Checked before any target loads: the engines capture in layer order, training in list order.
    with pytest.raises(
        ConfigError, match=r"model.aux_layer_ids must be strictly ascending, got \[6, 3, 1\] .* order: \[1, 3, 6\]"
    ):
        load_config(None, ["model.aux_layer_ids=[6, 3, 1]"])
    with pytest.raises(ConfigError, match=r"model.aux_layer_ids repeats layer 3 in \[1, 3, 3\]"):
        load_config(None, ["model.aux_layer_ids=[1, 3, 3]"])
    with pytest.raises(ConfigError, match="optimizer.learning_rate must be a finite number > 0, got 0"):
        load_config(None, ["optimizer.learning_rate=0"])
    for bad in (".nan", ".inf", "-.inf"):  # YAML spellings; NaN used to pass and fail inside AdamW
        with pytest.raises(ConfigError, match="optimizer.learning_rate must be a finite number > 0"):
            load_config(None, [f"optimizer.learning_rate={bad}"])
    with pytest.raises(ConfigError, match="optimizer.weight_decay must be a finite number >= 0, got nan"):
        load_config(None, ["optimizer.weight_decay=.nan"])
    with pytest.raises(ConfigError, match="data.eval_split must be in"):
        load_config(None, ["data.eval_split=1.5"])
    with pytest.raises(ConfigError, match="target.prefetch_gib must be a finite number > 0, got 0"):
        load_config(None, ["target.prefetch_gib=0"])
    assert load_config(None, ["target.prefetch_gib=null"]).target.prefetch_gib is None


def test_warmup_steps_alone_replaces_the_default_ratio(tmp_path):
    """The README says to set one of warmup_steps/warmup_ratio: setting warmup_steps is enough (the
    default ratio 0.05 used to make it a "both set" error), and the steps are what the schedule uses."""
    from torchspec.trainer.loop.lr_schedule import warmup_steps_for

    lr_schedule = load_config(None, ["lr_schedule.warmup_steps=10"]).lr_schedule
    assert (lr_schedule.warmup_steps, lr_schedule.warmup_ratio) == (10, None)
    assert warmup_steps_for(1000, lr_schedule.warmup_steps, lr_schedule.warmup_ratio) == 10
    # The shipped configs spell out warmup_steps: null, warmup_ratio: 0.05; the command line still wins.
    lr_schedule = load_config(REPO / "configs" / "default_llama.yaml", ["lr_schedule.warmup_steps=10"]).lr_schedule
    assert (lr_schedule.warmup_steps, lr_schedule.warmup_ratio) == (10, None)
    # A file's choice replaces the defaults, a command-line one the file's.
    only_steps = write(tmp_path, "lr_schedule:\n  warmup_steps: 7\n")
    assert load_config(only_steps).lr_schedule.warmup_ratio is None
    lr_schedule = load_config(only_steps, ["lr_schedule.warmup_ratio=0.2"]).lr_schedule
    assert (lr_schedule.warmup_steps, lr_schedule.warmup_ratio) == (None, 0.2)
    # null for one key chooses nothing: the other keeps its value.
    assert load_config(None, ["lr_schedule.warmup_steps=null"]).lr_schedule.warmup_ratio == 0.05


def test_warmup_steps_and_ratio_set_in_one_place_is_an_error(tmp_path):
    with pytest.raises(
        ConfigError,
        match="lr_schedule.warmup_steps and lr_schedule.warmup_ratio are both set in the "
        "command-line overrides; keep one of them",
    ):
        load_config(None, ["lr_schedule.warmup_steps=10", "lr_schedule.warmup_ratio=0.1"])
    both = write(tmp_path, "lr_schedule:\n  warmup_steps: 10\n  warmup_ratio: 0.1\n")
    with pytest.raises(ConfigError, match=f"both set in {both}; keep one of them"):
        load_config(both)


def test_resume_auto_is_the_default_and_goes_with_continual_training():
    """A relaunched continual run resumes its own checkpoints; an explicit resume path still conflicts."""
    assert load_config(None).checkpoint.resume == "auto" and load_config(None).checkpoint.save_interval == 20
    assert load_config(None, ["checkpoint.continual_training=/ckpt"]).checkpoint.resume == "auto"
    with pytest.raises(ConfigError, match="checkpoint.resume and checkpoint.continual_training are both set"):
        load_config(None, ["checkpoint.continual_training=/ckpt", "checkpoint.resume=/other/iter_0000010"])


def test_bad_yaml_and_missing_file_are_one_line_errors(tmp_path):
    path = write(tmp_path, "training:\n  seed: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:") and "invalid YAML" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "training: 3\n"))


def test_dump_is_the_resolved_config_and_reloads_identically(tmp_path):
    config = load_config(None, ["optimizer.learning_rate=5e-5", "model.aux_layer_ids=[1, 2, 3]", "training.seed=7"])
    path = tmp_path / "resolved.yaml"
    dump_config(config, path)
    raw = yaml.safe_load(path.read_text())
    assert raw["optimizer"]["learning_rate"] == 5e-5 and raw["model"]["aux_layer_ids"] == [1, 2, 3]
    assert list(raw) == [
        "model",
        "target",
        "data",
        "training",
        "optimizer",
        "lr_schedule",
        "ttt",
        "checkpoint",
        "metrics",
    ]
    assert load_config(path) == config


def test_overrides_do_not_mutate_the_input_config():
    base = TrainConfig()
    changed = apply_overrides(base, ["training.seed=5", "optimizer.betas=[0.8, 0.9]"])
    assert base.training.seed == 0 and base.optimizer.betas == [0.9, 0.95]
    assert changed.training.seed == 5 and changed.optimizer.betas == [0.8, 0.9]


@pytest.mark.parametrize("old, new", sorted(MOVED_KEYS.items()))
def test_every_key_of_the_old_layout_names_its_new_place(tmp_path, old, new):
    """0.4.0 split `training`: an old key fails in one line naming the new key, on the command line and
    in a file (with the file), and the new key takes the same value."""
    value = {"training.lr_schedule": "wsd", "training.attention_backend": "flex_attention"}.get(old, "3")
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{old}={value}"])
    assert str(err.value) == (
        f"{old} in command-line override '{old}={value}' moved to {new} in torchspec-trainer 0.4.0"
    )
    section, key = old.split(".")
    path = write(tmp_path, f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{old} in {path} moved to {new} in torchspec-trainer 0.4.0"
    assert new in _known_key_paths()


def _known_key_paths() -> set[str]:
    import dataclasses

    config = TrainConfig()
    return {
        f"{s.name}.{f.name}" for s in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, s.name))
    }


def test_the_training_section_keeps_only_the_run():
    assert {p for p in _known_key_paths() if p.startswith("training.")} == {
        f"training.{key}"
        for key in (
            "output_dir",
            "seed",
            "device",
            "dtype",
            "micro_batch_size",
            "global_batch_size",
            "num_epochs",
            "max_steps",
            "early_stop_patience",  # the run's length too: when it ends
            "max_grad_norm",
            "shard_target",
        )
    }
    assert not set(MOVED_KEYS) & _known_key_paths()


def test_a_config_saved_in_the_old_layout_reads_as_the_new_one():
    """What a checkpoint of torchspec-trainer 0.3 holds in training_config.yaml."""
    new = config_to_dict(load_config(REPO / "configs" / "default_llama.yaml"))
    assert upgrade_saved_config(new) == new
    # Absent from an old file, their defaults apply: the target section, the keys of 0.8.0 and 0.10.0.
    new.pop("target")
    new["training"].pop("early_stop_patience")
    for key in ("real_acceptance_prompts", "real_acceptance_interval", "real_acceptance_max_new_tokens"):
        new["metrics"].pop(key)
    for key in ("judge_url", "start_judge", "judge_devices", "judge_port"):
        new["metrics"].pop(key)
    old = {"model": new["model"], "data": new["data"], "training": dict(new["training"])}
    for old_path, new_path in MOVED_KEYS.items():
        section, key = new_path.split(".")
        old["training"][old_path.split(".")[1]] = new[section][key]
    assert upgrade_saved_config(old) == new
