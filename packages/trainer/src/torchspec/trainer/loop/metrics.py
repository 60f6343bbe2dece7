"""Per-step TTT metrics, and where they go (JSON lines, TensorBoard, a tqdm progress bar).

Counts first, ratios last: every metric is a ratio of sums over counted positions, so counts from
several micro-batches and ranks are added (``TTTCounts.add``, one all-reduce of ``as_tensor()``)
before any division, and the global metrics do not depend on how the batch was split.

Definitions, for TTT steps ``k = 0 .. K-1`` (step ``k`` of row ``t`` is the ``k+1``-th drafted token
of the chain that row starts):

* ``loss_k``: summed forward KL at step ``k`` / positions counted at step ``k``.
* ``acc_k`` (per-position accuracy): share of counted positions at step ``k`` whose draft top-1
  equals the target top-1.
* ``cond_acc_k`` (conditional accuracy): the same share among positions whose steps ``0 .. k-1``
  were all counted and correct, i.e. the chance that position ``k`` is accepted once the chain
  reached it. ``cond_acc_0 = acc_0``.
* ``acceptance_length`` (simulated): ``1 + sum_k prod_{i<=k} cond_acc_i``. The product is the chance
  that the chain survives through step ``k`` (every draft token up to ``k`` accepted), so the sum is the
  expected number of accepted draft tokens for a chain of ``K`` drafts under greedy verification,
  and the ``1`` is the token the target adds itself each round (the serving engines' convention).
* ``loss``: ``sum_k decay**k * loss_k``, the trained objective.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = [
    "JsonlWriter",
    "LoopClock",
    "MetricsSink",
    "ProgressBar",
    "TTTCounts",
    "TensorBoardWriter",
    "acceptance_length",
    "format_metrics",
    "summarize",
    "summary_writer_class",
    "ttt_counts",
]


@dataclass
class TTTCounts:
    """Sums over counted positions, one entry per TTT step (float64 so sums stay exact)."""

    loss_sums: torch.Tensor
    counted: torch.Tensor
    correct: torch.Tensor
    chain_counted: torch.Tensor  # counted at k, and counted and correct at every earlier step
    chain_correct: torch.Tensor  # ... and correct at k

    _FIELDS = ("loss_sums", "counted", "correct", "chain_counted", "chain_correct")

    @classmethod
    def zeros(cls, length: int, device: torch.device | str = "cpu") -> TTTCounts:
        return cls(*(torch.zeros(length, dtype=torch.float64, device=device) for _ in cls._FIELDS))

    def add(self, other: TTTCounts) -> TTTCounts:
        return TTTCounts(*(getattr(self, f) + getattr(other, f).to(getattr(self, f)) for f in self._FIELDS))

    def as_tensor(self) -> torch.Tensor:
        """``[5, length]``: all-reduce this, then ``from_tensor``."""
        return torch.stack([getattr(self, f) for f in self._FIELDS])

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> TTTCounts:
        return cls(*tensor.unbind(0))


def ttt_counts(correct: torch.Tensor, counted_mask: torch.Tensor, loss_sums: torch.Tensor) -> TTTCounts:
    """Counts of one batch from ``Eagle3Output``: ``correct``/``counted_mask`` ``[K, B, T]`` bool and
    ``loss_sums`` ``[K]``."""
    counted_mask = counted_mask.bool()
    hit = correct.bool() & counted_mask
    # prefix_ok[k]: every step before k was counted and correct (True at k = 0).
    survived = torch.cumprod(hit.to(torch.int8), dim=0).bool()
    prefix_ok = torch.cat([torch.ones_like(survived[:1]), survived[:-1]], dim=0)
    chain_counted = counted_mask & prefix_ok
    return TTTCounts(
        loss_sums=loss_sums.detach().to(torch.float64),
        counted=_per_step(counted_mask),
        correct=_per_step(hit),
        chain_counted=_per_step(chain_counted),
        chain_correct=_per_step(chain_counted & hit),
    )


def _per_step(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(dim=(1, 2)).to(torch.float64)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> list[float]:
    return [float(n / d) if d > 0 else 0.0 for n, d in zip(numerator.tolist(), denominator.tolist())]


def acceptance_length(conditional_accuracies: list[float]) -> float:
    """``1 + sum_k prod_{i<=k} cond_acc_i`` (see the module docstring)."""
    total, survival = 1.0, 1.0
    for accuracy in conditional_accuracies:
        survival *= accuracy
        total += survival
    return total


def summarize(counts: TTTCounts, loss_decay: float) -> dict[str, Any]:
    """The metrics of the module docstring from (global) counts."""
    losses = _ratio(counts.loss_sums, counts.counted)
    accuracies = _ratio(counts.correct, counts.counted)
    conditional = _ratio(counts.chain_correct, counts.chain_counted)
    return {
        "loss": sum(loss_decay**k * loss for k, loss in enumerate(losses)),
        "loss_per_position": losses,
        "acc": accuracies[0],
        "acc_per_position": accuracies,
        "cond_acc_per_position": conditional,
        "acceptance_length": acceptance_length(conditional),
        "counted_positions": [int(c) for c in counts.counted.tolist()],
    }


# --- sinks ------------------------------------------------------------------------------------------


class JsonlWriter:
    """One JSON object per line, flushed per record so a killed run keeps what it logged.

    ``append`` with ``keep_through_step=S`` (a run resumed from step ``S``) first drops the records
    of steps after ``S``: a killed run logged them after its last checkpoint, and the resumed run
    logs those steps again. A line cut short by the kill is dropped too."""

    def __init__(self, path: str | os.PathLike, append: bool = False, keep_through_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and keep_through_step is not None and self.path.is_file():
            _keep_records_through(self.path, keep_through_step)
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=False, default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _keep_records_through(path: Path, step: int) -> None:
    """Rewrite the JSON-lines file ``path`` without records after ``step`` and without torn lines
    (temporary file + ``os.replace``: a kill during the rewrite leaves the old file)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _whole_record_through(line, step)]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _whole_record_through(line: str, step: int) -> bool:
    if not line.endswith("\n"):  # the last line of a run killed while writing it
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return not (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; a ``ConfigError`` when tensorboard is not installed
    (``train`` asks before anything loads, so the run stops before it writes anything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # chained: a broken install raises ImportError too
        from torchspec.trainer.config import ConfigError

        raise ConfigError(
            "metrics.tensorboard is true but the tensorboard package is not installed; "
            "pip install tensorboard, or set metrics.tensorboard=false"
        ) from err
    return SummaryWriter


class TensorBoardWriter:
    """Scalars (lists become one scalar per position) via ``torch.utils.tensorboard``."""

    def __init__(self, log_dir: str | os.PathLike):
        self._writer = summary_writer_class()(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step, split = record["step"], record.get("split", "train")
        for key, value in record.items():
            if key in ("step", "split"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{split}/{key}", value, step)
            elif isinstance(value, list):
                for position, item in enumerate(value):
                    self._writer.add_scalar(f"{split}/{key}/{position}", item, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsSink:
    """Fan-out of metric records to JSONL and, optionally, TensorBoard (rank 0 only)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        tensorboard: bool = False,
        append: bool = False,
        keep_through_step: int | None = None,
    ):
        self.writers: list[Any] = [JsonlWriter(Path(output_dir) / "metrics.jsonl", append, keep_through_step)]
        if tensorboard:
            self.writers.append(TensorBoardWriter(Path(output_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.write(record)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def format_metrics(record: dict[str, Any], positions: int = 3) -> str:
    """A one-line human summary of a metrics record."""
    parts = [f"step {record['step']}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "acc_per_position" in record:
        accs = " ".join(f"{a:.3f}" for a in record["acc_per_position"][:positions])
        parts.append(f"acc[0:{positions}] {accs}")
    if "acceptance_length" in record:
        parts.append(f"accept_len {record['acceptance_length']:.3f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "grad_norm" in record:
        parts.append(f"gnorm {record['grad_norm']:.3f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    if "target_time_share" in record:
        parts.append(f"target {record['target_time_share']:.0%}")
    return " | ".join(parts)


class ProgressBar:
    """The training loop's progress: a tqdm bar on ``stream`` (stderr), with its own rate and ETA.

    Nothing at all is drawn when ``enabled`` is false (``metrics.progress_bar: false``, or not the
    main rank) or when ``stream`` is not a terminal, so logs and CI output stay as they were. While
    ``redirect_logging()`` is active, console log lines go through ``tqdm.write`` and are printed
    above the bar instead of through it.
    """

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        initial: int = 0,
        desc: str = "train",
        unit: str = "step",
    ):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.enabled = bool(enabled) and _is_terminal(self.stream)
        self._bar = tqdm(
            total=max(int(total), 1),
            initial=initial,
            desc=desc,
            unit=unit,
            file=self.stream,
            disable=not self.enabled,
            dynamic_ncols=True,
            leave=True,
        )

    def update(self, step: int, message: str = "") -> None:
        """Move the bar to ``step`` (absolute), showing ``message`` after the rate and ETA."""
        if not self.enabled:
            return
        if message:
            self._bar.set_postfix_str(message, refresh=False)
        self._bar.update(step - self._bar.n)

    def clear(self) -> None:
        """Erase the bar (it is redrawn by the next ``update``); ``tqdm.write`` does this by itself."""
        if self.enabled:
            self._bar.clear()

    def redirect_logging(self):
        """A context manager sending console log lines through ``tqdm.write`` while the bar is shown."""
        if not self.enabled:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def close(self) -> None:
        self._bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LoopClock:
    """Where the training loop's wall time goes, summed over the run on this process: ``data``
    (drawing and moving batches), ``target`` (the target's pass, or waiting for the engine's states),
    ``draft`` (forward, backward, optimizer), ``eval`` (the simulated acceptance of the eval split),
    ``acceptance`` (real speculative decoding of held-out prompts), ``checkpoint``; the rest is
    ``other`` (metrics, logging)."""

    PARTS = ("data", "target", "draft", "eval", "acceptance", "checkpoint")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self._started = time.perf_counter()

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    @contextlib.contextmanager
    def measure(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - started)

    def summary(self) -> str:
        total = max(time.perf_counter() - self._started, 1e-9)
        parts = {**self.seconds, "other": max(total - sum(self.seconds.values()), 0.0)}
        return ", ".join(f"{part} {seconds:.1f} s ({100 * seconds / total:.0f}%)" for part, seconds in parts.items())
