"""The training state a checkpoint holds, one ``Stateful`` component each (``state_dict()`` /
``load_state_dict(state)``, torch.distributed.checkpoint's protocol), in the style of torchtitan's
``components/checkpoint.py``. The trainer puts them in one ``states`` mapping that the
:class:`~torchspec.trainer.loop.checkpoint.Checkpointer` saves and loads:

=================  =========================  ==================================================
key                component                  stored in
=================  =========================  ==================================================
``model``          :class:`ModelState`        DCP (sharded tensors; any world size on load)
``optimizer``      :class:`OptimizerState`    DCP
``lr_scheduler``   :class:`LRScheduleState`   ``trainer_state.json``
``data``           ``DistributedBatchLoader`` ``trainer_state.json``
``train``          :class:`TrainState`        ``trainer_state.json``
``rng``            :class:`RNGState`          ``rng_state_rank{r}.pt`` (one per rank)
=================  =========================  ==================================================

Each component's ``state_dict`` is exactly what its ``load_state_dict`` restores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchspec.draft_models.checkpoint_layout import BestCheckpoint
from torchspec.draft_models.errors import UserInputError

__all__ = [
    "LRScheduleState",
    "ModelState",
    "OptimizerState",
    "RNGState",
    "TrainState",
    "rng_state",
    "set_rng_state",
]


class ModelState:
    """The model's weights (FSDP2 DTensors or plain tensors), by parameter name."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)


class OptimizerState:
    """The optimizer's state (AdamW moments, step counts, hyperparameters), keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state)


class LRScheduleState:
    """Where the LR scheduler is (its step count, base and last rates). The shape of the schedule
    (total steps, warmup, kind) is not state: it comes from the config, so a resumed run whose
    config trains longer follows the longer schedule."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints before torchspec-trainer 0.4.0 also recorded the schedule's shape (LambdaLR's
        # "lr_lambdas"), which was never restored. The base class's load sets the position only.
        position = {k: v for k, v in state.items() if k != "lr_lambdas"}
        torch.optim.lr_scheduler.LRScheduler.load_state_dict(self.scheduler, position)


def rng_state() -> dict[str, Any]:
    # Tensors, ints and tuples only: the file is read back with weights_only=True.
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGState:
    """This rank's random number generators (Python, torch CPU, CUDA)."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


@dataclass
class TrainState:
    """The loop's own state: optimizer steps taken, the best evaluation so far (by the metric that
    picks ``best.json``) and how many evaluations since it brought no improvement (early stop), with
    what the run was trained on (aux layers, checked on resume) and its world size (for the record: a
    run may resume on another world size)."""

    aux_layer_ids: list[int]
    world_size: int = 1
    step: int = 0
    best: dict[str, Any] | None = field(default=None)
    stale_evaluations: int = 0

    def offer_best(self, value: float, checkpoint: str, metric: str) -> bool:
        """Record an evaluation of ``metric`` at the current step; whether it is the best so far. A best
        of another metric (real acceptance switched on or off between resumes) is replaced."""
        best = BestCheckpoint.from_record(self.best) if self.best is not None else None
        if best is not None and best.metric == metric and value <= best.value:
            self.stale_evaluations += 1
            return False
        self.best = {"step": self.step, "metric": metric, "value": value, "checkpoint": checkpoint}
        self.stale_evaluations = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best": self.best,
            "stale_evaluations": self.stale_evaluations,
            "aux_layer_ids": list(self.aux_layer_ids),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("aux_layer_ids")
        if saved is not None and list(saved) != list(self.aux_layer_ids):
            raise UserInputError(
                f"the checkpoint was trained on aux layers {list(saved)}, this run uses {list(self.aux_layer_ids)}; "
                f"set model.aux_layer_ids={list(saved)}"
            )
        self.step, self.best = int(state["step"]), state.get("best")
        self.stale_evaluations = int(state.get("stale_evaluations", 0))  # saved since torchspec-trainer 0.8.0
