"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, resumable, reshardable.

The layout (folder names, what a complete checkpoint holds, the newest one) is
``torchspec.draft_models.checkpoint_layout``, shared with every reader; this module writes it.

A save goes to ``.tmp_iter_XXXXXXX``; after a barrier, rank 0 fsyncs every file of it, writes
``COMPLETE`` and renames the folder into place, then rewrites ``latest`` (every write through
``torchspec.draft_models.atomic``: temporary file, fsync, rename, folder fsync). A process killed at
any moment therefore leaves either no ``iter_*`` folder or a complete one: ``find_latest`` only
returns ``iter_*`` folders with the marker and never looks at ``.tmp_*``. Removing old checkpoints
(retention) renames them to ``.deleting_*`` before deleting, for the same reason.

A write that fails on any rank (a full disk, a quota, a file system gone read-only) fails the save
on every rank alike, instead of leaving the others waiting at a barrier: the staging folder is
removed and a ``ConfigError`` names the output folder, the reason, and the checkpoint that is still
the latest complete one (the one ``checkpoint.resume=auto`` and the converter pick).

What is saved is one ``states`` mapping of ``Stateful`` components (``torchspec.trainer.loop.states``:
model, optimizer, LR schedule, data position, train state, RNG); :meth:`Checkpointer.save` writes
each where the layout keeps it and :meth:`Checkpointer.load` restores exactly the components it is
given (all of them to resume, the model alone for ``continual_training``):

* ``model`` and ``optimizer`` (:data:`SHARDED_STATES`): one DCP save. DCP stores each tensor by name
  with its global shape, so a checkpoint written by N ranks loads on M ranks (each reads the slices
  of its own shards); ``get_model_state_dict``/``get_optimizer_state_dict`` handle FSDP2's sharded
  DTensors and plain modules alike; without a process group DCP saves and loads in-process.
* ``rng`` (:data:`PER_RANK_STATES`): ``rng_state_rank{r}.pt`` from every rank; a rank with no file
  (a resume on more ranks) keeps its generators.
* every other component: one entry of ``trainer_state.json`` (rank 0; the same on every rank),
  beside ``step``.

Loading never runs code from the files (they may come from another team): DCP metadata and data go
through ``torchspec.draft_models.load_dcp`` (an allow-list unpickler for ``.metadata``, weights-only
for every pickled item) and the RNG files through ``load_torch`` (``weights_only=True``); anything
else raises ``UnsafeCheckpointError`` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from torchspec.draft_models.atomic import fsync_tree, publish_dir, recover_replaced_dir, write_file_atomic
from torchspec.draft_models.checkpoint_layout import (
    BEST_FILE,
    COMPLETE_MARKER,
    LATEST_FILE,
    checkpoint_name,
    find_latest,
    is_complete,
    list_checkpoints,
    read_best,
)
from torchspec.draft_models.errors import UserInputError
from torchspec.draft_models.safe_checkpoint import load_dcp, load_torch
from torchspec.trainer.config import ConfigError
from torchspec.trainer.distributed.process_group import barrier
from torchspec.trainer.loop.states import rng_state, set_rng_state

__all__ = [
    "COMPLETE_MARKER",
    "PER_RANK_STATES",
    "SHARDED_STATES",
    "TRAINER_STATE",
    "Checkpointer",
    "checkpoint_name",
    "find_latest",
    "is_complete",
    "list_checkpoints",
    "rng_state",
    "set_rng_state",
]

TRAINER_STATE = "trainer_state.json"
SHARDED_STATES = ("model", "optimizer")  # tensors, in DCP
PER_RANK_STATES = ("rng",)  # <key>_state_rank{r}.pt, read weights-only
# Before torchspec-trainer 0.4.0 the train state's entries were top-level keys of trainer_state.json.
_LEGACY_TRAIN_KEYS = ("step", "best", "aux_layer_ids", "world_size")


def _per_rank_file(checkpoint: Path, key: str, rank: int) -> Path:
    return checkpoint / f"{key}_state_rank{rank}.pt"


def _write_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write: ``err`` itself, or one inside DCP's
    ``CheckpointException`` (per rank), where torch's zip writer may have replaced it by a
    ``RuntimeError`` that keeps it as its context."""
    pending: list[BaseException | None] = [err]
    for failure in getattr(err, "failures", {}).values():
        pending.append(failure[0] if isinstance(failure, tuple) else failure)
    seen = set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        pending += [current.__cause__, current.__context__]
    return None


def _on_every_rank(write: Callable[[], None]) -> str | None:
    """Run ``write`` on this rank; the first rank's write failure (its ``OSError`` reason), the same
    on every rank, or None. Other errors propagate. Every rank must call it (it synchronises)."""
    failure = None
    try:
        write()
    except (OSError, CheckpointException) as err:
        cause = _write_error(err)
        if cause is None:
            raise
        failure = cause.strerror or str(cause)
    return _shared(failure)


def _shared(message: str | None) -> str | None:
    """The first rank's ``message`` (None where no rank has one), the same on every rank, so that
    every rank raises together instead of some waiting at the next collective. Every rank calls it."""
    if not dist.is_initialized():
        return message
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet_dcp():
    # Without a process group DCP warns that it assumes a single process, which is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        yield


class Checkpointer:
    """Saves and restores training state under ``output_dir``; every rank calls every method."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        keep_last: int | None = None,
        guard: Callable[[], str | None] | None = None,
    ):
        """``guard`` (rank 0): why nothing may be saved any more (the run lost its output folder), or None."""
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        self.guard = guard
        self.rank = _rank()

    # --- save -----------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        states: Mapping[str, Stateful],
        files: dict[str, Callable[[Path], None]] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` of ``states`` (see the module docstring for where each goes).
        ``files`` (name -> writer called with the path to write) are written by rank 0."""
        name = checkpoint_name(step)
        final = self.output_dir / name
        staging = self.output_dir / f".tmp_{name}"
        refusal = _shared(self._refusal(step) if self.rank == 0 else None)
        if refusal is not None:
            raise ConfigError(refusal)

        def prepare() -> None:
            if self.rank == 0:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                if staging.exists():  # left by a run killed during this very save
                    shutil.rmtree(staging)
                staging.mkdir()

        def write() -> None:
            sharded = {key: state for key, state in states.items() if key in SHARDED_STATES}
            if sharded:
                with _quiet_dcp():
                    dcp.save(sharded, checkpoint_id=str(staging))  # DCP calls each one's state_dict()
            for key in PER_RANK_STATES:
                if key in states:
                    file = _per_rank_file(staging, key, self.rank)
                    torch.save(states[key].state_dict(), file)
                    _fsync_file(file)  # by its writer: on a shared file system rank 0 may be on another host
            if self.rank == 0:
                small = {key: state.state_dict() for key, state in states.items() if key not in _FILED_APART}
                (staging / TRAINER_STATE).write_text(json.dumps({"step": step, **small}, indent=2) + "\n")
                for file_name, write_file in (files or {}).items():
                    write_file(staging / file_name)

        def publish() -> None:
            if self.rank == 0:
                world_size = dist.get_world_size() if dist.is_initialized() else 1
                # Every file durable before the marker that declares them complete (a crash after the
                # marker must not leave an empty trainer_state.json or config.json behind it).
                fsync_tree(staging)
                write_file_atomic(
                    staging / COMPLETE_MARKER, json.dumps({"step": step, "world_size": world_size}) + "\n"
                )
                publish_dir(staging, final)  # replaces an older save of the same step only now
                # What find_latest picks, not this save's name, so that the two cannot disagree; written
                # before retention, so a kill in between never leaves `latest` naming a deleted folder.
                write_file_atomic(self.output_dir / LATEST_FILE, cast(Path, find_latest(self.output_dir)).name + "\n")
                self._apply_retention(keep=name)

        # Each phase ends with every rank knowing whether any rank failed (it doubles as the barrier).
        for phase in (prepare, write, publish):
            failure = _on_every_rank(phase)
            if failure is not None:
                raise self._save_failed(name, staging, failure)
        return final

    def _save_failed(self, name: str, staging: Path, reason: str) -> ConfigError:
        """Remove what the failed save left (rank 0) and say which checkpoint is still the latest."""
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        latest = find_latest(self.output_dir)
        still = (
            f"{latest} is still the latest complete checkpoint and checkpoint.resume=auto continues from it"
            if latest is not None
            else "no complete checkpoint was saved yet"
        )
        return ConfigError(
            f"training.output_dir {self.output_dir}: saving checkpoint {name} failed ({reason}); {still}; "
            "free space there (or set training.output_dir to another folder) and run the same command again"
        )

    def _refusal(self, step: int) -> str | None:
        """Why checkpoint ``step`` must not be saved here: the guard's reason, or the folder holds a
        newer one. Retention and every reader go by step, so the new save would be deleted at once (or
        lost behind the newer one) while `latest` named it; refused before anything is written, nothing
        deleted."""
        lost = self.guard() if self.guard is not None else None
        if lost is not None:
            return lost
        newest = find_latest(self.output_dir)
        if newest is None or int(newest.name.removeprefix("iter_")) <= step:
            return None
        return (
            f"training.output_dir {self.output_dir} holds {newest.name}, newer than {checkpoint_name(step)} "
            "which this run would save (it resumed from an older checkpoint of that folder); nothing was deleted; "
            "set training.output_dir to a new folder and checkpoint.resume=<the checkpoint to branch from>"
        )

    def _protected(self) -> set[str]:
        best = read_best(self.output_dir)
        return {best.name} if best is not None else set()

    def _apply_retention(self, keep: str) -> None:
        """Delete all but the newest ``keep_last`` checkpoints, never the best one nor ``keep`` (the one
        just saved)."""
        if self.keep_last is None:
            return
        found = list_checkpoints(self.output_dir)
        protected = self._protected() | {keep}
        for _, path in found[: max(len(found) - self.keep_last, 0)]:
            if path.name in protected:
                continue
            aside = path.with_name(f".deleting_{path.name}")
            os.replace(path, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def mark_best(self, checkpoint: Path, metrics: dict[str, Any]) -> None:
        """Point ``best.json`` at ``checkpoint`` (rank 0 writes)."""
        if self.rank == 0:
            record = {"checkpoint": Path(checkpoint).name, **metrics}
            write_file_atomic(self.output_dir / BEST_FILE, json.dumps(record, indent=2) + "\n")

    def clean_stale(self) -> None:
        """Delete leftovers of interrupted saves and deletions (rank 0), after putting back a checkpoint
        that a save of the same step had moved aside when it was killed. Called while this run holds the
        folder, so no other process is writing there."""
        if self.rank == 0 and self.output_dir.is_dir():
            for child in sorted(self.output_dir.iterdir()):
                if child.name.startswith(".iter_"):  # a checkpoint moved aside by publish_dir
                    recover_replaced_dir(self.output_dir / child.name[1:].split(".", 1)[0])
            for child in self.output_dir.iterdir():
                if child.name.startswith((".tmp_iter_", ".deleting_iter_", ".iter_")):
                    shutil.rmtree(child, ignore_errors=True)
        barrier()

    # --- load -----------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike, states: Mapping[str, Stateful], source: str = "checkpoint") -> None:
        """Restore ``states`` (only those given) from checkpoint ``path``. A component that refuses
        its saved state (a different data order or aux layers) is a ``ConfigError`` naming
        ``source`` (the key the path came from) and ``path``."""
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker or DCP metadata)"
            )
        sharded = {key: state for key, state in states.items() if key in SHARDED_STATES}
        if sharded:
            with _quiet_dcp():
                load_dcp(sharded, path)  # DCP fills each one's state_dict() and calls its load_state_dict
        small = {key: state for key, state in states.items() if key not in _FILED_APART}
        saved = _read_trainer_state(path) if small else {}
        for key, state in small.items():
            if key not in saved:
                raise ConfigError(f"{source} {path}: {TRAINER_STATE} has no {key!r} state to restore")
            _restore(state, saved[key], f"{source} {path}")
        for key in PER_RANK_STATES:
            file = _per_rank_file(path, key, self.rank)
            if key in states and file.is_file():
                _restore(states[key], load_torch(file), f"{source} {path}")


def _restore(state: Stateful, saved: Any, where: str) -> None:
    """``state.load_state_dict(saved)``; a refusal (the saved state does not fit this run) names ``where``."""
    try:
        state.load_state_dict(saved)
    except UserInputError as err:  # its message says what differs and the fix
        raise ConfigError(f"{where}: {err}") from None


_FILED_APART = SHARDED_STATES + PER_RANK_STATES


def _read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` by component key, also as written before torchspec-trainer 0.4.0."""
    saved = json.loads((path / TRAINER_STATE).read_text())
    if "train" not in saved:
        saved["train"] = {key: saved[key] for key in _LEGACY_TRAIN_KEYS if key in saved}
    return saved
