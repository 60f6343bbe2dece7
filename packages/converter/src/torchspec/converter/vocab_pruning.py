"""Pruning a trained draft head to a smaller vocabulary after training.

Row ``i`` of the pruned head is the row of the old head that scored target token ``i + d2t[i]``:
the pruned draft's logit for a kept token equals the full draft's logit for that token.
"""

from __future__ import annotations

import torch

from torchspec.converter.errors import ConverterError

__all__ = ["head_rows_for", "restrict_counts_to_draft_vocab"]


def head_rows_for(new_target_ids: torch.Tensor, vocab_size: int, old_d2t: torch.Tensor | None) -> torch.Tensor:
    """Indices into the old ``lm_head`` rows for each new draft token (given by its target id)."""
    if old_d2t is None:
        return new_target_ids.long()
    old_target_ids = torch.arange(old_d2t.numel()) + old_d2t.long()
    old_row = torch.full((vocab_size,), -1, dtype=torch.long)
    old_row[old_target_ids] = torch.arange(old_d2t.numel())
    rows = old_row[new_target_ids.long()]
    outside = new_target_ids[rows < 0]
    if outside.numel():
        raise ConverterError(
            f"the new draft vocabulary has {outside.numel()} tokens (e.g. target id {int(outside[0])}) that the "
            "trained head never scored; re-pruning only keeps a subset of the trained draft vocabulary, so choose a "
            "smaller --draft-vocab-size"
        )
    return rows


def restrict_counts_to_draft_vocab(counts: torch.Tensor, old_d2t: torch.Tensor | None) -> torch.Tensor:
    """Zero the frequency of tokens a pruned head cannot score, so the most frequent kept ones win."""
    if old_d2t is None:
        return counts
    allowed = torch.zeros_like(counts, dtype=torch.bool)
    allowed[torch.arange(old_d2t.numel()) + old_d2t.long()] = True
    return torch.where(allowed, counts, torch.zeros_like(counts))
