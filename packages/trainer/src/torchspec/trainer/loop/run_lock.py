"""One training run per output folder.

Two runs writing the same ``output_dir`` would overwrite each other's checkpoints and metrics and
both exit 0. The main rank holds an exclusive ``flock`` on ``<output_dir>/.lock`` for the whole run;
the kernel releases it when the process ends, also on ``kill -9``, so a stale lock never blocks a
restart. The file records who holds it, for the error the second run prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

from torchspec.trainer.config import ConfigError

__all__ = ["OutputDirLock"]

_LOCK_NAME = ".lock"


class OutputDirLock:
    """``with OutputDirLock(output_dir): ...`` holds the folder for this process, or raises
    :class:`ConfigError` naming the process that holds it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self._file: TextIO | None = None

    def acquire(self) -> None:
        path = self.output_dir / _LOCK_NAME
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as err:
            raise ConfigError(
                f"training.output_dir {self.output_dir} cannot be written ({err.strerror or err}); "
                "choose a folder this user can create and write"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise ConfigError(
                f"training.output_dir {self.output_dir} is in use by another training run ({holder}); "
                "wait for it to finish, stop it, or choose another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.time(),
                    "command": " ".join(sys.argv),
                }
            )
        )
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the lock
            self._file = None

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(recorded: str) -> str:
    try:
        holder = json.loads(recorded)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on {holder['host']}, started {started}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"
