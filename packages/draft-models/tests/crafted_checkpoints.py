"""Crafted checkpoints and failing disks for the tests of every package that reads or writes checkpoints.

Each package's tests prove that its loaders refuse files that would run code, and that a write
failing half-way leaves the previous result in place; they build the same hostile files and the same
full disk, so the recipes live here once. It holds a working ``os.system`` payload, so it lives beside
the tests and never in a wheel; the converter's and the trainer's ``conftest.py`` put this folder on
``sys.path``.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CodeRunningPayload", "FullDiskFile", "plant_pickled_tensor", "rewrite_dcp_metadata"]


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


class FullDiskFile:
    """Wraps a file opened for writing: it takes ``room`` more bytes (or characters), writes what
    fits of the next write and then fails with ``ENOSPC``, as a full disk does. Everything else goes
    to the wrapped file. Injected where a writer opens its files, it simulates a disk filling up."""

    def __init__(self, file, room: int = 4096):
        self._file, self._room = file, room

    def write(self, data):
        if len(data) > self._room:
            self._file.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
