"""The training-checkpoint layout: the one contract between the trainer that writes checkpoints and
everything that reads them (resume, continual training, the converter).

One folder per saved step::

    output_dir/
      latest                        text: the name of the newest complete checkpoint, for people and
                                    scripts (readers here go by step number, which a half-written
                                    ``latest`` cannot mislead)
      best.json                     the best checkpoint so far: {"checkpoint": "iter_...", "step",
                                    "metric": what picked it (real_acceptance_length, by speculative
                                    decoding; acceptance_length, the simulated one), "value"}; before
                                    trainer 0.8.0 {"checkpoint", "step", "acceptance_length"} (simulated)
      iter_0000200/
        .metadata, *.distcp         DCP: {"model": draft state dict, "optimizer": AdamW state, ...}
        config.json                 the draft config
        aux_layers.json             {"aux_layer_ids": [...], "num_target_layers": L}
        vocab_mapping.safetensors   d2t/t2d, when the draft vocabulary is pruned
        training_config.yaml        the fully resolved training config
        trainer_state.json          step, LR scheduler position, data position, train state (step, best,
                                    aux layers, world size; top-level keys before trainer 0.4.0)
        rng_state_rank{r}.pt        each rank's RNG states
        COMPLETE                    marker, written after every rank finished, before the rename

A checkpoint is *complete* when its folder is named ``iter_`` + at least 7 digits and holds the
``COMPLETE`` marker and DCP's ``.metadata``; anything else (``.tmp_*`` staging folders of an
interrupted save, ``.deleting_*`` folders of retention) is never read. Tensors are read one by one
through :mod:`torchspec.draft_models.safe_checkpoint`, so nothing in the files can run code.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.config import AutoDraftModelConfig, Eagle3DraftConfig
from torchspec.draft_models.errors import UserInputError
from torchspec.draft_models.safe_checkpoint import load_dcp, read_dcp_metadata

__all__ = [
    "BEST_FILE",
    "COMPLETE_MARKER",
    "LATEST_FILE",
    "BestCheckpoint",
    "CheckpointNotFoundError",
    "TrainingCheckpoint",
    "checkpoint_name",
    "find_latest",
    "is_complete",
    "list_checkpoints",
    "read_best",
    "resolve_checkpoint",
]

BEST_FILE = "best.json"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
MODEL_PREFIX = "model."  # the draft's tensors in the DCP state
_NAME = re.compile(r"^iter_(\d{7,})$")


class CheckpointNotFoundError(UserInputError):
    """No complete checkpoint where one was asked for; the message names the path and what to pass."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def is_complete(path: str | os.PathLike) -> bool:
    path = Path(path)
    return bool(_NAME.match(path.name)) and (path / COMPLETE_MARKER).is_file() and (path / ".metadata").is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, by step ascending."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _NAME.match(child.name)
        if match and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (by step) in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


@dataclass(frozen=True)
class BestCheckpoint:
    """What ``best.json`` says: the checkpoint's folder name, its step, the metric that picked it and
    its value."""

    name: str
    step: int | None
    metric: str
    value: float

    @classmethod
    def from_record(cls, record: dict) -> BestCheckpoint:
        """From best.json's record, also as written before torchspec-trainer 0.8.0 (the simulated
        acceptance, no metric named). Raises ``KeyError``, ``TypeError`` or ``ValueError`` on others."""
        metric = str(record.get("metric", "acceptance_length"))
        value = record["value"] if "value" in record else record["acceptance_length"]
        step = record.get("step")
        return cls(str(record["checkpoint"]), None if step is None else int(step), metric, float(value))


def read_best(output_dir: str | os.PathLike) -> BestCheckpoint | None:
    """``output_dir``'s best.json, or None when there is none or it cannot be read (the checkpoint it
    names may since be gone: check ``is_complete(output_dir / best.name)``)."""
    path = Path(output_dir) / BEST_FILE
    try:
        return BestCheckpoint.from_record(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def resolve_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """A complete ``iter_*`` folder as given, or a training output folder meaning its newest one.
    ``what`` starts the error message (the option the path came from)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(
            f"{what} {path} does not exist; pass an iter_XXXXXXX folder or a training output_dir"
        )
    if (path / ".metadata").exists() or _NAME.match(path.name):
        if not is_complete(path):
            raise CheckpointNotFoundError(
                f"{what} {path} is incomplete (no {COMPLETE_MARKER} marker or .metadata); it was not fully written"
            )
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointNotFoundError(
            f"{what} {path} holds no complete checkpoint (iter_XXXXXXX with {COMPLETE_MARKER} and .metadata)"
        )
    return latest


@dataclass
class TrainingCheckpoint:
    """A complete checkpoint read tensor by tensor: the draft config, its aux layers and its weights."""

    path: Path
    config: Eagle3DraftConfig
    aux_layer_ids: list[int] | None = None
    num_target_layers: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, what: str = "checkpoint") -> TrainingCheckpoint:
        path = resolve_checkpoint(path, what)
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"{what} {path} is incomplete: no config.json (the trainer writes one with every checkpoint); "
                "copy the draft config.json of that run there"
            )
        config = AutoDraftModelConfig.from_file(path / "config.json")
        aux = {}
        if (path / "aux_layers.json").is_file():
            aux = json.loads((path / "aux_layers.json").read_text())
        ids, num_layers = aux.get("aux_layer_ids"), aux.get("num_target_layers")
        if ids is not None:  # export writes them into config.json as they are
            ids = validate_aux_layer_ids(ids, num_layers, source=f"{path / 'aux_layers.json'} aux_layer_ids")
        return cls(path, config, ids, num_layers)

    def _metadata(self):
        return read_dcp_metadata(self.path).state_dict_metadata

    def weight_names(self) -> list[str]:
        """Names of the draft's tensors (without the ``model.`` prefix), in checkpoint order."""
        return [k[len(MODEL_PREFIX) :] for k in self._metadata() if k.startswith(MODEL_PREFIX)]

    def tensor_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        meta = self._metadata().get(MODEL_PREFIX + name)
        if meta is None or not hasattr(meta, "size"):
            raise CheckpointNotFoundError(f"{self.path}: the checkpoint holds no tensor {name!r}")
        return tuple(meta.size), meta.properties.dtype

    def load_tensor(self, name: str) -> torch.Tensor:
        """One tensor, read alone (peak memory stays at one tensor beyond what the caller keeps)."""
        shape, dtype = self.tensor_info(name)
        tensor = torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            load_dcp({MODEL_PREFIX + name: tensor}, self.path)
        return tensor
