"""Pruned draft vocabulary: which target tokens the draft's LM head predicts, and the id maps.

The draft keeps the ``draft_vocab_size`` target tokens seen most often as *supervised* tokens (the ones
the draft learns to predict), ordered by count, ties to the lower id. Kept ids are stored ascending:

- ``d2t`` (int64, ``[draft_vocab_size]``): draft id ``i`` is target id ``i + d2t[i]``
- ``t2d`` (bool, ``[vocab_size]``): ``t2d[j]`` is True when target token ``j`` has a draft id

When fewer distinct tokens were seen than the draft size, the lowest unseen ids fill the rest (that is
what the tie rule gives for zero counts).

File format (``VocabMapping.save``): safetensors with tensors ``d2t`` (I64) and ``t2d`` (BOOL) and string
metadata ``format="torchspec-vocab-mapping"``, ``format_version="1"``, ``vocab_size``, ``draft_vocab_size``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torchspec.data.errors import DataError

__all__ = ["VocabMapping", "build_vocab_mapping", "count_supervised_tokens", "coverage_report"]

_FORMAT = "torchspec-vocab-mapping"
_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class VocabMapping:
    d2t: torch.Tensor  # int64 [draft_vocab_size]: target id = draft id + d2t[draft id]
    t2d: torch.Tensor  # bool [vocab_size]: target token is in the draft vocab
    draft_vocab_size: int
    vocab_size: int

    def __post_init__(self):
        if self.d2t.dtype != torch.long or self.d2t.shape != (self.draft_vocab_size,):
            raise DataError(
                f"d2t must be int64 of shape ({self.draft_vocab_size},), got {self.d2t.dtype} {tuple(self.d2t.shape)}"
            )
        if self.t2d.dtype != torch.bool or self.t2d.shape != (self.vocab_size,):
            raise DataError(
                f"t2d must be bool of shape ({self.vocab_size},), got {self.t2d.dtype} {tuple(self.t2d.shape)}"
            )
        target_ids = self.draft_to_target_ids()
        ascending = bool((target_ids[1:] > target_ids[:-1]).all())
        in_range = bool(((target_ids >= 0) & (target_ids < self.vocab_size)).all())
        if not (ascending and in_range) or not torch.equal(self.t2d.nonzero().flatten(), target_ids):
            raise DataError("inconsistent vocab mapping: t2d must mark exactly the ascending target ids arange + d2t")

    @classmethod
    def from_target_ids(cls, target_ids: torch.Tensor, vocab_size: int) -> VocabMapping:
        """The mapping that keeps ``target_ids`` (any order, no duplicates)."""
        kept = torch.as_tensor(target_ids, dtype=torch.long).sort().values
        t2d = torch.zeros(vocab_size, dtype=torch.bool)
        t2d[kept] = True
        return cls(kept - torch.arange(len(kept)), t2d, len(kept), vocab_size)

    def draft_to_target_ids(self) -> torch.Tensor:
        """Target id of every draft id, ``arange(draft_vocab_size) + d2t``."""
        return torch.arange(self.draft_vocab_size) + self.d2t

    def save(self, path: str | os.PathLike) -> None:
        metadata = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "vocab_size": str(self.vocab_size),
            "draft_vocab_size": str(self.draft_vocab_size),
        }
        save_file({"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VocabMapping:
        if not os.path.isfile(path):
            raise DataError(f"vocab mapping file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise DataError(f"{path}: not a safetensors vocab mapping ({error})") from error
        if metadata.get("format") != _FORMAT or not {"d2t", "t2d"} <= tensors.keys():
            raise DataError(f"{path}: not a vocab mapping file (needs format={_FORMAT!r} metadata and d2t/t2d tensors)")
        if metadata.get("format_version") != _FORMAT_VERSION:
            raise DataError(
                f"{path}: vocab mapping format_version {metadata.get('format_version')!r}; "
                f"this reader knows {_FORMAT_VERSION!r}"
            )
        return cls(tensors["d2t"], tensors["t2d"], int(metadata["draft_vocab_size"]), int(metadata["vocab_size"]))


def count_supervised_tokens(dataset: Iterable[dict], vocab_size: int, batch_size: int = 1024) -> torch.Tensor:
    """How often each target id appears where ``loss_mask`` is 1; int64 ``[vocab_size]``.

    ``dataset``: a ``datasets.Dataset`` with ``input_ids``/``loss_mask`` columns, or any iterable of
    samples with those keys.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for input_ids, loss_mask in _batches(dataset, batch_size):
        if input_ids.numel() != loss_mask.numel():
            raise DataError("input_ids and loss_mask differ in length; rebuild the dataset")
        supervised = input_ids[loss_mask.bool()]
        if supervised.numel() and (supervised.min() < 0 or supervised.max() >= vocab_size):
            raise DataError(
                f"token id {int(supervised.max())} is outside vocab_size={vocab_size}; "
                "pass the target model's vocab size"
            )
        counts += torch.bincount(supervised, minlength=vocab_size)
    return counts


def build_vocab_mapping(
    token_counts: torch.Tensor | Iterable[dict], vocab_size: int, draft_vocab_size: int
) -> VocabMapping:
    """Keep the ``draft_vocab_size`` most frequent supervised tokens (see module docstring for the rules).

    ``token_counts``: counts from ``count_supervised_tokens``, or a dataset to count.
    """
    _check_sizes(vocab_size, draft_vocab_size)
    if isinstance(token_counts, torch.Tensor):
        counts = token_counts.long()
        if counts.shape != (vocab_size,):
            raise DataError(f"token_counts has shape {tuple(counts.shape)}, expected ({vocab_size},)")
    else:
        counts = count_supervised_tokens(token_counts, vocab_size)
    # A stable sort on descending counts keeps equal counts in ascending id order.
    order = torch.argsort(-counts, stable=True)
    return VocabMapping.from_target_ids(order[:draft_vocab_size], vocab_size)


def coverage_report(counts: torch.Tensor, candidate_sizes: Sequence[int]) -> list[tuple[int, float]]:
    """For each draft size, the share of supervised tokens the best draft vocab of that size covers."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    total = int(counts.sum())
    if total == 0:
        raise DataError("no supervised tokens were counted, so coverage is undefined; check the dataset's loss_mask")
    cumulative = counts.sort(descending=True).values.cumsum(0)
    report = []
    for size in candidate_sizes:
        _check_sizes(len(counts), size)
        report.append((int(size), int(cumulative[size - 1]) / total))
    return report


def _check_sizes(vocab_size: int, draft_vocab_size: int) -> None:
    if draft_vocab_size <= 0:
        raise DataError(f"draft_vocab_size must be positive, got {draft_vocab_size}")
    if draft_vocab_size > vocab_size:
        raise DataError(f"draft_vocab_size={draft_vocab_size} exceeds the target vocab_size={vocab_size}")


def _batches(dataset: Iterable[dict], batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(dataset, "with_format") and hasattr(dataset, "column_names"):  # datasets.Dataset
        import pyarrow.compute as pc

        columns = cast(Any, dataset).select_columns(["input_ids", "loss_mask"]).with_format("arrow")
        for table in columns.iter(batch_size=batch_size):  # Arrow tables: flatten without Python loops
            # astype copies into writable int64/bool arrays (Arrow buffers are read-only).
            yield (
                torch.from_numpy(pc.list_flatten(table["input_ids"]).to_numpy().astype("int64")),
                torch.from_numpy(pc.list_flatten(table["loss_mask"]).to_numpy().astype("bool")),
            )
        return
    for sample in dataset:
        yield torch.as_tensor(sample["input_ids"], dtype=torch.long), torch.as_tensor(sample["loss_mask"])
