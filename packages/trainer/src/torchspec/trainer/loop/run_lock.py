"""One run per output folder (a training run's ``output_dir``, a dump's ``target.dump_dir``).

Two runs writing the same folder would overwrite each other's checkpoints (or shards) and both exit
0. The main rank holds an exclusive ``flock`` for the whole run; the kernel releases it when the
process ends, also on ``kill -9``, so a stale lock never blocks a restart. Two locks are held:

* ``<folder>/.lock``, inside the folder: seen by every host that mounts it (a shared file system);
* ``<runtime dir>/<hash of the folder's resolved path>.lock``, outside it: deleting the folder of a
  live run (the hint to start over says "delete it") deletes the first lock file with it, and a
  second run would lock a fresh one; this one survives, so the second run on this host is refused.

Deleting the folder also leaves the first run writing into a folder nobody sees, so the holder
records the folder's identity (device, inode) and :meth:`OutputDirLock.check` stops it, in one
line, once the folder is gone or another folder took its name (the trainer checks before each
checkpoint). The lock files record who holds them, for the error the second run prints.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from torchspec.trainer.config import ConfigError

__all__ = ["LOCK_NAME", "OutputDirLock", "hold_on_main", "raise_if_lost"]

LOCK_NAME = ".lock"


def _runtime_dir() -> Path:
    """This user's folder for the locks that outlive the folders they guard: ``$XDG_RUNTIME_DIR``
    (per user, on a local tmpfs) where set, else the temporary folder."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "torchspec-locks"
    return Path(tempfile.gettempdir()) / f"torchspec-locks-{os.getuid()}"


class OutputDirLock:
    """``with OutputDirLock(output_dir): ...`` holds the folder for this process, or raises
    :class:`ConfigError` naming the process that holds it. ``key`` is the setting the folder came
    from and ``activity`` what holds it, for the messages."""

    def __init__(self, output_dir: str | os.PathLike, key: str = "training.output_dir", activity: str = "training run"):
        self.output_dir = Path(output_dir)
        self.key, self.activity = key, activity
        self._files: list[TextIO] = []
        self._identity: tuple[int, int] | None = None
        self._created: list[Path] = []  # the folders acquire made, innermost first

    def acquire(self) -> None:
        self._created = [p for p in (self.output_dir, *self.output_dir.parents) if not p.exists()]
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"{self.key} {self.output_dir} cannot be written ({err.strerror or err}); "
                "choose a folder this user can create and write"
            ) from None
        runtime = _runtime_dir()
        try:
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"{self.key} {self.output_dir}: the lock folder {runtime} cannot be created ({err.strerror or err}); "
                "set XDG_RUNTIME_DIR (or TMPDIR) to a folder this user can write"
            ) from None
        resolved = str(self.output_dir.resolve())
        outside = runtime / f"{hashlib.sha256(resolved.encode()).hexdigest()[:32]}.lock"
        try:
            # Outside first: after the folder was deleted, its inside lock is a fresh, free file.
            for path in (outside, self.output_dir / LOCK_NAME):
                self._files.append(self._lock(path))
            self._identity = _identity(self.output_dir)
        except BaseException:
            self.release()
            raise
        record = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "command": " ".join(sys.argv),
                "folder": resolved,
            }
        )
        for handle in self._files:
            handle.seek(0)
            handle.truncate()
            handle.write(record)
            handle.flush()

    def _lock(self, path: Path) -> TextIO:
        try:
            handle = open(path, "a+")
        except OSError as err:
            raise ConfigError(
                f"{self.key} {self.output_dir} cannot be written ({err.strerror or err}); "
                "choose a folder this user can create and write"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):  # held: the one answer meaning so
                handle.seek(0)
                holder = _describe(handle.read())
                handle.close()
                raise ConfigError(
                    f"{self.key} {self.output_dir} is in use by another {self.activity} ({holder}); "
                    f"wait for it to finish, stop it, or choose another {self.key.rsplit('.', 1)[-1]}"
                ) from None
            handle.close()
            raise ConfigError(
                f"{self.key} {self.output_dir}: cannot lock {path} ({err.strerror or err}), so a second run "
                f"could write the same folder; choose a {self.key.rsplit('.', 1)[-1]} on a file system that supports "
                "locks (a local disk, or a network file system with locking enabled)"
            ) from None
        return handle

    def lost(self) -> str | None:
        """Why this lock no longer guards the folder (it was deleted, or another took its name), or None."""
        if not self._files:
            return None
        try:
            same = _identity(self.output_dir) == self._identity
        except OSError:
            same = False
        if same:
            return None
        return (
            f"{self.key} {self.output_dir} was deleted or replaced while this run used it (pid {os.getpid()}); "
            "this run stops instead of writing into a folder another run may hold now; "
            f"stop a run before deleting its {self.key.rsplit('.', 1)[-1]}, then start it again"
        )

    def check(self) -> None:
        """Raise the :meth:`lost` message as a :class:`ConfigError`, if any."""
        message = self.lost()
        if message is not None:
            raise ConfigError(message)

    def release(self, failed: bool = False) -> None:
        """Drop the lock. ``failed``: the holder stopped on an error; a folder this lock created that
        holds nothing but the lock file is removed too, so a refused run leaves no empty folder behind."""
        if failed and self._files and self.lost() is None:
            self._remove_if_unused()
        for handle in reversed(self._files):
            handle.close()  # closing the descriptor drops the lock
        self._files = []

    def _remove_if_unused(self) -> None:
        if not self._created or self._created[0] != self.output_dir:
            return
        try:
            if [p.name for p in self.output_dir.iterdir()] != [LOCK_NAME]:
                return
            (self.output_dir / LOCK_NAME).unlink()  # still held through the open descriptor until release
            for folder in self._created:
                folder.rmdir()
        except OSError:  # written meanwhile, or not ours to remove: leave it
            pass

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.release(failed=exc_type is not None)


def hold_on_main(output_dir: str | os.PathLike, is_main: bool) -> OutputDirLock | None:
    """The main rank's lock on ``output_dir`` (None elsewhere). Every rank calls it: a refusal on the
    main rank is raised on every rank, instead of leaving the others waiting at their next collective."""
    import torch.distributed as dist

    lock, refusal = None, None
    if is_main:
        lock = OutputDirLock(output_dir)
        try:
            lock.acquire()
        except ConfigError as err:
            lock, refusal = None, str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise ConfigError(refusal)
    return lock


def raise_if_lost(lock: OutputDirLock | None) -> None:
    """Every rank calls it; the main rank's :meth:`OutputDirLock.lost` message (its ``lock``; None on the
    other ranks) is raised on every rank."""
    import torch.distributed as dist

    message = lock.lost() if lock is not None else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [message]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if message is not None:
        raise ConfigError(message)


def _identity(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _describe(recorded: str) -> str:
    try:
        holder = json.loads(recorded)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on {holder['host']}, started {started}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"
