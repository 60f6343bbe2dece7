"""Where a run starts: a fresh output folder, its own latest checkpoint (``checkpoint.resume: auto``),
a named checkpoint, or only the weights of another run (``checkpoint.continual_training``); and
whether there is anything left to train."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch.distributed as dist

from torchspec.draft_models import AutoDraftModelConfig, DraftConfigError
from torchspec.draft_models.checkpoint_layout import CheckpointNotFoundError, resolve_checkpoint
from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.loop.checkpoint import TRAINER_STATE, find_latest, list_checkpoints
from torchspec.trainer.loop.data_loader import steps_per_epoch

__all__ = [
    "check_same_draft",
    "complete_checkpoint",
    "completed_run",
    "refuse_rollback",
    "resume_hint",
    "resume_path",
]

logger = logging.getLogger("torchspec.trainer")


def complete_checkpoint(path: str, key: str) -> Path:
    try:
        return resolve_checkpoint(path, what=key)
    except CheckpointNotFoundError as err:
        raise ConfigError(str(err)) from None


def resume_path(resume: str | None, output_dir: Path) -> Path | None:
    if resume == "auto":
        latest = find_latest(output_dir)
        return latest  # None: nothing to resume yet, a fresh start
    if resume is not None:
        checkpoint = complete_checkpoint(resume, "checkpoint.resume")
        refuse_rollback(checkpoint, output_dir)
        return checkpoint
    if list_checkpoints(output_dir):
        raise ConfigError(
            f"training.output_dir {output_dir} already holds checkpoints; set checkpoint.resume=auto to continue "
            "that run, "
            "or choose another output_dir"
        )
    return None


def refuse_rollback(checkpoint: Path, output_dir: Path) -> None:
    """An explicit resume from an older checkpoint into a folder holding newer ones is refused.

    Continuing there would interleave two runs in one folder: every reader goes by step number
    (``resume: auto``, retention, the converter), so retention would delete the new run's saves as
    soon as they are written and ``auto`` and export would pick the abandoned run's newest. Nothing
    is moved or deleted; the user branches into a new folder instead.
    """
    step = int(checkpoint.name.removeprefix("iter_"))  # resolve_checkpoint only returns iter_<digits>
    newer = [path.name for found, path in list_checkpoints(output_dir) if found > step]
    if newer:
        held = newer[0] if len(newer) == 1 else f"{newer[0]}..{newer[-1]}"
        raise ConfigError(
            f"checkpoint.resume {checkpoint}: training.output_dir {output_dir} holds newer checkpoints than "
            f"{checkpoint.name} ({held}), which this run would mix with (resume: auto, retention and export go by "
            f"step); to branch from {checkpoint.name}, set training.output_dir to a new folder and "
            f"checkpoint.resume={checkpoint}; to continue the newest, set checkpoint.resume=auto"
        )


def resume_hint(resume: str, output_dir: Path, checkpoint: Path, step: int, total_steps: int) -> str:
    """The one line a resumed run starts with."""
    if resume == "auto":
        return (
            f"resuming {output_dir} from step {step} of {total_steps} (checkpoint.resume=auto); "
            f"to start over instead, delete {output_dir} or set training.output_dir to another folder"
        )
    return f"resuming from {checkpoint} at step {step} of {total_steps} (checkpoint.resume={resume})"


def completed_run(config: TrainConfig) -> tuple[Path, int] | None:
    """The checkpoint and step of a run that ``checkpoint.resume`` would continue but that has already
    reached this config's last step, or stopped early (``training.early_stop_patience`` evaluations
    without a new best, as many as this config allows or more), after logging one line saying so and
    how to start over (or train on); else None.

    Decided from the checkpoint's ``trainer_state.json`` alone (its step and the data size it was
    trained with), before the target, the data or a process group are touched; every rank decides
    the same. Anything unusual (a different global batch size, an unreadable state) is left to the
    full resume, which explains it.
    """
    t, resume = config.training, config.checkpoint.resume
    if resume is None:
        return None
    output_dir = Path(t.output_dir)
    checkpoint = resume_path(resume, output_dir)
    if checkpoint is None:
        return None
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        step, data = int(state["step"]), state.get("data") or {}  # the checkpointer's step, the data position
    except (OSError, ValueError, KeyError, TypeError):
        return None
    stale = (state.get("train") or {}).get("stale_evaluations") or 0
    if t.early_stop_patience is not None and isinstance(stale, int) and stale >= t.early_stop_patience:
        where = output_dir if resume == "auto" else checkpoint
        if _is_main_process():
            logger.info(
                f"the run in {where} stopped early at step {step} ({checkpoint}: {stale} evaluations without a new "
                f"best, training.early_stop_patience={t.early_stop_patience}); to train on, raise "
                f"training.early_stop_patience or set it to null; to start over, delete {output_dir} or set "
                "training.output_dir to another folder"
            )
        return checkpoint, step
    total = t.max_steps
    if total is None:
        if data.get("global_batch_size") != t.global_batch_size or not data.get("num_samples"):
            return None
        total = t.num_epochs * steps_per_epoch(int(data["num_samples"]), t.global_batch_size)
    if step < total:
        return None
    where = output_dir if resume == "auto" else checkpoint
    message = (
        f"the run in {where} is already complete at step {step} ({checkpoint}, checkpoint.resume={resume}); "
        f"to start over, delete {output_dir} or set training.output_dir to another folder; "
        f"to train longer, raise training.max_steps or training.num_epochs"
    )
    differing = config_differences(checkpoint / "training_config.yaml", config)
    if differing:
        message += (
            f" (note: that run's config differs from this one in {', '.join(differing[:3])}"
            + (", ..." if len(differing) > 3 else "")
            + ")"
        )
    if _is_main_process():
        logger.info(message)
    return checkpoint, step


def config_differences(saved_file: Path, config: TrainConfig) -> list[str]:
    """Key paths whose values differ between a checkpoint's resolved config and ``config``."""
    import yaml

    from torchspec.trainer.config import config_to_dict, upgrade_saved_config

    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(saved, dict) or not all(isinstance(v, dict) or v is None for v in saved.values()):
        return []
    saved = upgrade_saved_config(saved)  # a run saved by torchspec-trainer < 0.4.0 has the old layout
    current = config_to_dict(config)
    # How and where a run is launched (a run folder may be moved), not what it trains.
    ignored = {"checkpoint.resume", "metrics.progress_bar", "training.output_dir"}
    differing = []
    for section, values in current.items():
        saved_values = saved.get(section) or {}
        for key, value in values.items():
            path = f"{section}.{key}"
            if path not in ignored and key in saved_values and saved_values[key] != value:
                differing.append(path)
    return differing


def _is_main_process() -> bool:
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def check_same_draft(path: Path, draft_config, key: str) -> None:
    """The checkpoint's draft must have this run's shapes, or its weights cannot load."""
    saved_file = path / "config.json"
    if not saved_file.is_file():
        return
    saved, current = json.loads(saved_file.read_text()), draft_config.to_dict()
    try:  # fill the defaults of keys older versions did not write (the EAGLE-3.1 flags)
        saved = AutoDraftModelConfig.from_dict(saved).to_dict()
    except DraftConfigError:
        pass
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k != "torch_dtype")
    if differing:
        key_name = differing[0]
        raise ConfigError(
            f"{key} {path}: the checkpoint's draft has {key_name}={saved.get(key_name)!r}, this run's has "
            f"{current.get(key_name)!r}; use the draft config it was trained with (model.draft_config={saved_file})"
        )
