"""A training run: ``train(config)`` checks there is something left to train, joins the process
group, then builds a ``Trainer`` (which holds the output folder's lock until closed), resumes and
fits it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from torchspec.trainer.config import TrainConfig
from torchspec.trainer.distributed.host_memory import pin_malloc_mmap_threshold
from torchspec.trainer.distributed.process_group import init_distributed
from torchspec.trainer.loop.metrics import summary_writer_class
from torchspec.trainer.loop.result import TrainResult
from torchspec.trainer.loop.resume import completed_run
from torchspec.trainer.loop.trainer import Trainer

__all__ = ["train"]


def train(config: TrainConfig, step_callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run training as configured. ``step_callback(step, record)`` is called after every step.

    A run resumed (``checkpoint.resume``) from a checkpoint that already reached this config's last
    step trains nothing: one line says so and how to start over, and the result has
    ``already_complete=True``.
    """
    completed = completed_run(config)
    if completed is not None:
        checkpoint, step = completed
        return TrainResult(Path(config.training.output_dir), checkpoint, step, already_complete=True)
    if config.metrics.tensorboard:
        summary_writer_class()  # a missing package stops the run before anything loads or is written
    created_group = not dist.is_initialized()
    ctx = init_distributed(config.training.device)
    if ctx.device.type == "cpu":
        pin_malloc_mmap_threshold()  # glibc only: give freed activations back to the OS (host_memory)
    try:
        # The Trainer takes the output folder's lock before the target loads: a second run on this
        # folder, or one that cannot be written, stops there.
        trainer = Trainer(config, ctx)
        try:
            trainer.restore()
            return trainer.fit(step_callback)
        finally:
            trainer.close()
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()
