"""Learning-rate schedules: linear warmup, then cosine, constant or WSD (warmup-stable-decay).

A schedule maps the optimizer step ``s`` (0-based: the step about to be taken) to a multiplier of
the base learning rate, so it plugs into ``torch.optim.lr_scheduler.LambdaLR``:

* warmup, ``s < W``: ``(s + 1) / W`` (the first step already learns; step ``W - 1`` reaches 1);
* cosine: ``m + (1 - m) * (1 + cos(pi * p)) / 2`` with ``p = (s - W) / (N - 1 - W)``, reaching ``m`` at the last step;
* constant: 1;
* wsd: 1 until the last ``D = round(decay_ratio * N)`` steps, then linear from 1 down to ``m``.

``N`` is the total number of optimizer steps and ``m`` the ``min_lr_ratio``. The schedule's shape
comes from the config and is not checkpointed: a checkpoint keeps the scheduler's position only
(``states.LRScheduleState``), so a resumed run that trains longer follows the longer schedule.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULES", "WarmupDecaySchedule", "build_lr_scheduler", "warmup_steps_for"]

SCHEDULES = ("cosine", "constant", "wsd")


class WarmupDecaySchedule:
    def __init__(
        self,
        total_steps: int,
        warmup_steps: int = 0,
        kind: str = "cosine",
        min_lr_ratio: float = 0.0,
        decay_ratio: float = 0.1,
    ):
        if kind not in SCHEDULES:
            raise ValueError(f"lr_schedule={kind!r}; choose one of {', '.join(SCHEDULES)}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = min(int(warmup_steps), self.total_steps)
        self.kind = kind
        self.min_lr_ratio = float(min_lr_ratio)
        self.decay_steps = min(round(decay_ratio * self.total_steps), self.total_steps - self.warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        floor = self.min_lr_ratio
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = self.total_steps - 1 - self.warmup_steps
            progress = 0.0 if span <= 0 else min((step - self.warmup_steps) / span, 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start or self.decay_steps == 0:
            return 1.0
        # Linear from 1 at the first decay step down to the floor at the last step.
        progress = 1.0 if self.decay_steps == 1 else min((step - decay_start) / (self.decay_steps - 1), 1.0)
        return 1.0 - (1.0 - floor) * progress


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    if warmup_steps is not None:
        return int(warmup_steps)
    return round((warmup_ratio or 0.0) * total_steps)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: WarmupDecaySchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
