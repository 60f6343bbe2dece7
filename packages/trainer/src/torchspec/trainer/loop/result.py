"""What a training run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainResult"]


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path | None
    steps: int
    train_history: list[dict[str, Any]] = field(default_factory=list)  # this process's step records
    eval_metrics: dict[str, Any] | None = None
    speculative_eval: dict[str, Any] | None = None  # real decoding of held-out prompts (main rank)
    stopped_early: str | None = None  # why the run stopped before its last step (training.early_stop_patience)
    already_complete: bool = False  # resumed a run with nothing left to train: nothing was done
