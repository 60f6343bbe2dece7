"""Checks between config values that their types alone cannot express."""

from __future__ import annotations

import re
from typing import Any

from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.config.schema import ConfigError, TrainConfig

__all__ = ["judge_configured", "real_acceptance_off", "validate_config"]


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def judge_configured(config: TrainConfig) -> bool:
    """Whether a vLLM judge server measures real acceptance during training (``metrics.judge_url`` or
    ``metrics.start_judge``) instead of the in-process evaluator."""
    return config.metrics.judge_url is not None or config.metrics.start_judge


def real_acceptance_off(config: TrainConfig, prompts: str = "real_acceptance_prompts") -> str | None:
    """Why real speculative decoding of held-out prompts cannot run in the trainer (or is switched off
    by ``metrics.<prompts>`` being 0), or None when it runs. During training best.json then follows
    the simulated acceptance."""
    judged = judge_configured(config) and prompts == "real_acceptance_prompts"
    if config.target.backend != "transformers" and not judged:
        return (
            f"target.backend={config.target.backend}: the target is not in this process; a vLLM judge measures it "
            "during training (metrics.start_judge=true, or metrics.judge_url), `engine:verify` after export"
        )
    if config.training.shard_target and not judged:
        return "training.shard_target=true: speculative decoding needs the whole target on one rank"
    if config.data.eval_path is None and config.data.eval_split == 0:
        return "no held-out prompts (data.eval_path is null and data.eval_split is 0)"
    if getattr(config.metrics, prompts) == 0:
        return f"metrics.{prompts}=0"
    return None


def _check_early_stop(config: TrainConfig, where: str) -> None:
    """Early stop counts evaluations of the metric that picks best.json: there must be some before the end."""
    d, met = config.data, config.metrics
    if config.training.early_stop_patience is None:
        return
    prefix = f"training.early_stop_patience is set{where} but"
    if d.eval_path is None and d.eval_split == 0:
        raise ConfigError(f"{prefix} the run has no held-out split to evaluate; set data.eval_split or data.eval_path")
    if real_acceptance_off(config) is None:
        if met.real_acceptance_interval == 0:
            raise ConfigError(
                f"{prefix} metrics.real_acceptance_interval is 0 (real acceptance, which it counts, is measured "
                "only at the end); set metrics.real_acceptance_interval"
            )
    elif met.eval_interval == 0:
        raise ConfigError(
            f"{prefix} metrics.eval_interval is 0 (the simulated acceptance it counts, real acceptance being off, "
            "is measured only at the end); set metrics.eval_interval"
        )


def _check_judge(config: TrainConfig, where: str) -> None:
    met = config.metrics
    if met.judge_url is not None and met.start_judge:
        raise ConfigError(
            f"metrics.judge_url and metrics.start_judge are both set{where}: the judge is either a server you "
            "started (judge_url) or one the trainer starts (start_judge); unset one"
        )
    if met.judge_url is not None and not re.fullmatch(r"https?://[^/\s]+:\d+/?", met.judge_url):
        raise ConfigError(f"metrics.judge_url{where} is {met.judge_url!r}; give the server's http://HOST:PORT")
    if not 0 < met.judge_port < 65536:
        raise ConfigError(f"metrics.judge_port{where} must be a TCP port (1-65535), got {met.judge_port}")


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
    for name in ("eval_interval", "speculative_eval_prompts", "real_acceptance_prompts", "real_acceptance_interval"):
        positive("metrics", name, getattr(met, name), allow_zero=True)
    positive("metrics", "real_acceptance_max_new_tokens", met.real_acceptance_max_new_tokens)
    positive("training", "early_stop_patience", t.early_stop_patience)
    positive("data", "max_seq_length", d.max_seq_length)
    positive("target", "prefetch_batches", config.target.prefetch_batches, allow_zero=True)
    positive("target", "prefetch_gib", config.target.prefetch_gib)
    positive("target", "engine_timeout_s", config.target.engine_timeout_s)
    positive("target", "request_timeout_s", config.target.request_timeout_s)
    _check_started_servers(config, where)
    _check_judge(config, where)
    _check_transport(config, where)
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
    _check_early_stop(config, where)
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


# hs-connectors 0.9's MooncakeStoreConfig fields; local_hostname is each process's own address.
_MOONCAKE_KEYS = (
    "master_server_address",
    "metadata_server",
    "protocol",
    "device_name",
    "global_segment_size",
    "local_buffer_size",
    "num_writer_threads",
    "local_hostname",
)


def _check_transport(config: TrainConfig, where: str) -> None:
    t = config.target
    if t.transport == "mooncake" and t.backend != "fleet":
        raise ConfigError(f"target.transport=mooncake{where} applies to target.backend=fleet, not {t.backend}")
    unknown = sorted(set(t.mooncake) - set(_MOONCAKE_KEYS))
    if unknown:
        raise ConfigError(
            f"target.mooncake{where} has unknown keys {unknown}; the store takes {', '.join(_MOONCAKE_KEYS)}"
        )


def _check_started_servers(config: TrainConfig, where: str) -> None:
    t = config.target
    for name in ("start_servers", "max_engine_restarts"):
        value = getattr(t, name)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"target.{name}{where} must be a whole number >= 0, got {value}")
    if not t.start_servers:
        return
    if t.backend != "fleet":
        raise ConfigError(
            f"target.start_servers{where} applies to target.backend=fleet, not {t.backend}; set target.backend=fleet"
        )
    if t.servers:
        raise ConfigError(
            f"target.start_servers and target.servers are both set{where}: the trainer either starts its servers "
            "or uses yours; keep one"
        )
    if t.server_devices and len(t.server_devices) != t.start_servers:
        raise ConfigError(
            f"target.server_devices{where} lists {len(t.server_devices)} device groups for target.start_servers="
            f"{t.start_servers}; give one CUDA_VISIBLE_DEVICES value per server"
        )
    if not 0 < t.server_port <= 65536 - t.start_servers:
        raise ConfigError(f"target.server_port{where} must leave room for {t.start_servers} ports, got {t.server_port}")
