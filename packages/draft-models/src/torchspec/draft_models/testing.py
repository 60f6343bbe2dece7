"""Crafted checkpoints for the tests of every package that loads checkpoints.

Each package's tests prove that its loaders refuse files that would run code; they build the same
hostile files, so the recipes live here once. Nothing in the library imports this module.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CodeRunningPayload", "plant_pickled_tensor", "rewrite_dcp_metadata"]


class CodeRunningPayload:
    """Unpickling this creates ``marker`` (what an attacker's file would do instead)."""

    def __init__(self, marker: str | os.PathLike):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_dcp_metadata(checkpoint: str | os.PathLike, change: Callable[[object], None]) -> None:
    """Load a genuine DCP ``.metadata`` (written by the test itself), apply ``change``, write it back."""
    path = Path(checkpoint) / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def plant_pickled_tensor(checkpoint: str | os.PathLike, fqn: str, payload: object) -> None:
    """Append ``torch.save(payload)`` to the checkpoint's data file and point tensor ``fqn`` at it."""
    data_file = next(Path(checkpoint).glob("*.distcp"))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    offset = data_file.stat().st_size
    with open(data_file, "ab") as handle:
        handle.write(buffer.getvalue())

    def point_at_payload(metadata):
        for index, info in metadata.storage_data.items():
            if index.fqn == fqn:
                info.offset, info.length = offset, len(buffer.getvalue())

    rewrite_dcp_metadata(checkpoint, point_at_payload)
