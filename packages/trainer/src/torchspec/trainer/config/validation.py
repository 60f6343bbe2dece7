"""Checks between config values that their types alone cannot express."""

from __future__ import annotations

from typing import Any

from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.config.schema import ConfigError, TrainConfig

__all__ = ["validate_config"]


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def validate_config(config: TrainConfig, source: str | None = None) -> None:
    """Checks between values that types alone cannot express."""
    where = _where(source)
    t, d, m = config.training, config.data, config.model
    opt, sched, ttt, ckpt, met = config.optimizer, config.lr_schedule, config.ttt, config.checkpoint, config.metrics

    def positive(section: str, name: str, value: Any, allow_zero: bool = False) -> None:
        # `not value >= 0` also catches NaN, which every comparison calls False (it would reach AdamW).
        if value is not None and (not value >= 0 or value == float("inf") or (value == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{section}.{name}{where} must be a finite number {bound}, got {value}")

    for name in ("micro_batch_size", "global_batch_size", "num_epochs", "max_steps", "max_grad_norm"):
        positive("training", name, getattr(t, name))
    positive("optimizer", "learning_rate", opt.learning_rate)
    positive("optimizer", "weight_decay", opt.weight_decay, allow_zero=True)
    positive("lr_schedule", "warmup_steps", sched.warmup_steps, allow_zero=True)
    positive("ttt", "length", ttt.length)
    positive("checkpoint", "keep_last", ckpt.keep_last)
    positive("checkpoint", "save_interval", ckpt.save_interval, allow_zero=True)
    positive("metrics", "log_interval", met.log_interval)
    for name in ("eval_interval", "speculative_eval_prompts"):
        positive("metrics", name, getattr(met, name), allow_zero=True)
    positive("data", "max_seq_length", d.max_seq_length)
    positive("target", "prefetch_batches", config.target.prefetch_batches, allow_zero=True)
    positive("target", "engine_timeout_s", config.target.engine_timeout_s)
    positive("target", "request_timeout_s", config.target.request_timeout_s)
    if config.target.backend == "dump" and config.target.dump_dir is None:
        raise ConfigError(
            f"target.backend is dump but target.dump_dir is not set{where}; set it to the folder "
            "`hatch run trainer:dump-states` wrote"
        )
    positive("data", "num_proc", d.num_proc)
    positive("model", "draft_vocab_size", m.draft_vocab_size)
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"training.global_batch_size ({t.global_batch_size}){where} must be a multiple of "
            f"training.micro_batch_size ({t.micro_batch_size})"
        )
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"optimizer.betas{where} must be two numbers in [0, 1), got {opt.betas}")
    for section, name in (
        ("lr_schedule", "warmup_ratio"),
        ("lr_schedule", "decay_ratio"),
        ("lr_schedule", "min_lr_ratio"),
        ("ttt", "loss_decay"),
    ):
        value = getattr(getattr(config, section), name)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"{section}.{name}{where} must be in [0, 1], got {value}")
    if sched.warmup_steps is not None and sched.warmup_ratio is not None:
        raise ConfigError(
            f"lr_schedule.warmup_steps and lr_schedule.warmup_ratio are both set{where}; set one and the other to null"
        )
    if not 0 <= d.eval_split < 1:
        raise ConfigError(f"data.eval_split{where} must be in [0, 1), got {d.eval_split}")
    if m.aux_layer_ids is not None:  # the count and order here, the range once the target is read
        try:
            validate_aux_layer_ids(m.aux_layer_ids, None, source=f"model.aux_layer_ids{where}")
        except UserInputError as err:
            raise ConfigError(str(err)) from None
    # resume: auto goes with continual_training (the default is auto): the first launch starts from
    # continual_training's weights, a relaunch resumes its own checkpoints. An explicit resume path does not.
    if ckpt.resume not in (None, "auto") and ckpt.continual_training is not None:
        raise ConfigError(
            f"checkpoint.resume and checkpoint.continual_training are both set{where}; resume continues a run, "
            "continual_training starts a new one from its weights: keep one"
        )
