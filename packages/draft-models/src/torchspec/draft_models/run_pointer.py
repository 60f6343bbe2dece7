"""How the commands after a training run find it when they are given no path.

``hatch run trainer:train`` records its output folder in ``outputs/.last_run`` (relative to the
working directory, like the default ``output_dir``). Then, with no path on the command line,
``converter:export`` exports that run to its serving folder ``<output_dir>_hf``, and
``trainer:evaluate``, ``converter:check`` and ``engine:verify`` read that serving folder. Without a
record the default run's folders are used (``outputs/default_llama`` and ``outputs/default_llama_hf``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_RUN", "last_run", "record_last_run", "serving_folder"]

DEFAULT_RUN = Path("outputs") / "default_llama"
_RECORD = Path("outputs") / ".last_run"


def record_last_run(output_dir: str | os.PathLike) -> None:
    """Remember ``output_dir`` as the run later commands use by default (written atomically)."""
    _RECORD.parent.mkdir(parents=True, exist_ok=True)
    staging = _RECORD.with_name(f"{_RECORD.name}.{os.getpid()}")
    staging.write_text(str(Path(output_dir).resolve()) + "\n")
    os.replace(staging, _RECORD)


def last_run() -> Path:
    """The output folder of the last training run started from this directory, else the default run's."""
    if _RECORD.is_file():
        recorded = _RECORD.read_text().strip()
        if recorded:
            return _relative_if_below_cwd(Path(recorded))
    return DEFAULT_RUN


def serving_folder(run_dir: str | os.PathLike) -> Path:
    """Where a run's export goes by default: ``<run_dir>_hf`` beside it."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + "_hf")


def _relative_if_below_cwd(path: Path) -> Path:
    # Messages then name `outputs/default_mla`, as the user typed it, rather than an absolute path.
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
