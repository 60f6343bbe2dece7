"""Reading a TorchSpec training checkpoint (a ``torch.distributed.checkpoint`` folder) tensor by tensor.

Layout written by torchspec-trainer, one folder per saved step::

    output_dir/
      latest                      text: name of the newest complete checkpoint, written last
      iter_0000200/
        .metadata, *.distcp       DCP: {"model": draft state dict, "optimizer": ..., ...}
        config.json               the draft config
        aux_layers.json           {"aux_layer_ids": [...], "num_target_layers": L}
        COMPLETE                  marker written once every rank finished, before the rename

Only folders with the marker (and DCP's ``.metadata``) are read; ``.tmp_*`` folders of interrupted
saves never are. The metadata and data go through ``torchspec.draft_models.safe_checkpoint``: a file
that would run code is refused (``UnsafeCheckpointError``, one line) before anything of it is built.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from torchspec.converter.errors import ConverterError
from torchspec.draft_models import AutoDraftModelConfig, DraftConfigError, Eagle3DraftConfig, load_dcp, read_dcp_metadata

__all__ = ["TrainingCheckpoint", "resolve_checkpoint"]

_ITER = re.compile(r"^iter_(\d+)$")
MODEL_PREFIX = "model."


COMPLETE_MARKER = "COMPLETE"


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (".metadata", "config.json", COMPLETE_MARKER))


def resolve_checkpoint(path: str | Path) -> Path:
    """An ``iter_*`` folder, or a training output folder meaning its latest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConverterError(f"checkpoint {path} does not exist; pass an iter_XXXXXXX folder or a training output_dir")
    if (path / ".metadata").exists():
        if not _is_complete(path):
            raise ConverterError(
                f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker or config.json); it was not fully written"
            )
        return path
    latest = path / "latest"
    if latest.is_file():
        candidate = path / latest.read_text().strip()
        if _is_complete(candidate):
            return candidate
    complete = sorted(
        (int(m.group(1)), child) for child in path.iterdir() if (m := _ITER.match(child.name)) and _is_complete(child)
    )
    if not complete:
        raise ConverterError(f"{path} holds no complete checkpoint (iter_XXXXXXX with {COMPLETE_MARKER}, .metadata, config.json)")
    return complete[-1][1]


@dataclass
class TrainingCheckpoint:
    path: Path
    config: Eagle3DraftConfig
    aux_layer_ids: list[int] | None
    num_target_layers: int | None

    @classmethod
    def open(cls, path: str | Path) -> TrainingCheckpoint:
        path = resolve_checkpoint(path)
        try:
            config = AutoDraftModelConfig.from_file(path / "config.json")
        except DraftConfigError as err:
            raise ConverterError(str(err)) from None
        aux = {}
        if (path / "aux_layers.json").is_file():
            aux = json.loads((path / "aux_layers.json").read_text())
        return cls(path, config, aux.get("aux_layer_ids"), aux.get("num_target_layers"))

    def _metadata(self):
        return read_dcp_metadata(self.path).state_dict_metadata

    def weight_names(self) -> list[str]:
        """Names of the draft's tensors (without the ``model.`` prefix), in checkpoint order."""
        return [k[len(MODEL_PREFIX) :] for k in self._metadata() if k.startswith(MODEL_PREFIX)]

    def tensor_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        meta = self._metadata().get(MODEL_PREFIX + name)
        if meta is None or not hasattr(meta, "size"):
            raise ConverterError(f"{self.path}: the checkpoint holds no tensor {name!r}")
        return tuple(meta.size), meta.properties.dtype

    def load_tensor(self, name: str) -> torch.Tensor:
        """One tensor, read alone (peak memory stays at one tensor beyond what the caller keeps)."""
        shape, dtype = self.tensor_info(name)
        tensor = torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            load_dcp({MODEL_PREFIX + name: tensor}, self.path)
        return tensor
