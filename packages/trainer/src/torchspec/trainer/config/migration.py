"""Keys that moved between versions of the config layout, and reading configs saved by older versions."""

from __future__ import annotations

__all__ = ["LAYOUT_VERSION", "MOVED_KEYS", "upgrade_saved_config"]

LAYOUT_VERSION = "0.4.0"


MOVED_KEYS = {
    "training.learning_rate": "optimizer.learning_rate",
    "training.weight_decay": "optimizer.weight_decay",
    "training.betas": "optimizer.betas",
    "training.lr_schedule": "lr_schedule.kind",
    "training.warmup_steps": "lr_schedule.warmup_steps",
    "training.warmup_ratio": "lr_schedule.warmup_ratio",
    "training.decay_ratio": "lr_schedule.decay_ratio",
    "training.min_lr_ratio": "lr_schedule.min_lr_ratio",
    "training.ttt_length": "ttt.length",
    "training.loss_decay": "ttt.loss_decay",
    "training.attention_backend": "ttt.attention_backend",
    "training.gradient_checkpointing": "ttt.gradient_checkpointing",
    "training.save_interval": "checkpoint.save_interval",
    "training.keep_last": "checkpoint.keep_last",
    "training.resume": "checkpoint.resume",
    "training.continual_training": "checkpoint.continual_training",
    "training.log_interval": "metrics.log_interval",
    "training.eval_interval": "metrics.eval_interval",
    "training.speculative_eval_prompts": "metrics.speculative_eval_prompts",
    "training.tensorboard": "metrics.tensorboard",
    "training.progress_bar": "metrics.progress_bar",
}


def upgrade_saved_config(values: dict) -> dict:
    """A config as an older version saved it (``training_config.yaml`` in a checkpoint or output
    folder), in this version's layout; a config already in it comes back equal."""
    upgraded = {section: dict(keys or {}) for section, keys in values.items()}
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        if old_key in upgraded.get(old_section, {}):
            new_section, new_key = new.split(".")
            upgraded.setdefault(new_section, {})[new_key] = upgraded[old_section].pop(old_key)
    return upgraded
