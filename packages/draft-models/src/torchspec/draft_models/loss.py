"""Forward-KL loss of the draft head against the target's next-token distribution.

The loss of one row (one position at one TTT step) is ``-sum_v p_target(v) * log q_draft(v)``.
Vocabularies are large (150k tokens) and TTT visits every position ``length`` times, so the loss
is computed by :func:`chunked_forward_kl`, which

* never materialises the ``[rows, vocab]`` logits of all rows at once: it walks chunks of rows and
  recomputes each chunk's logits in backward instead of keeping them alive;
* computes the target distribution of each target position once per pass, however many TTT steps
  read it: rows are sorted by the target position they are trained toward, so the rows of all
  steps that share a target position fall in the same chunk.

Targets come from a :class:`TargetDistribution`: the target's final hidden states and its
``lm_head`` weight (computed lazily, chunk by chunk), or dense probabilities already restricted to
the draft vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "DenseTargetProbs",
    "TargetDistribution",
    "TargetFromHead",
    "chunked_forward_kl",
]

# Elements of one [rows, vocab] float32 buffer per chunk (16 MiB); a handful are alive at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


class TargetDistribution:
    """The target's next-token distribution over the draft vocabulary, by flat position ``b * T + t``."""

    def probs(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(positions), draft_vocab]``."""
        raise NotImplementedError

    def valid(self) -> torch.Tensor:
        """``[B, T]`` bool: positions whose target can train the draft."""
        raise NotImplementedError


class TargetFromHead(TargetDistribution):
    """Target probabilities from its final normed hidden states and ``lm_head`` weight.

    With a pruned draft vocabulary (``draft_ids`` given) the distribution is the softmax over the
    draft tokens' logits only, and a position is valid only if the target's full-vocabulary argmax
    is a draft token (otherwise no draft prediction could ever be accepted there).
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        head_weight: torch.Tensor,
        draft_ids: torch.Tensor | None = None,
        t2d: torch.Tensor | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        if hidden.shape[-1] != head_weight.shape[-1]:
            raise ValueError(
                f"target hidden size {hidden.shape[-1]} does not match the target lm_head weight "
                f"{tuple(head_weight.shape)}"
            )
        self.shape = hidden.shape[:2]
        self.hidden = hidden.detach().flatten(0, 1)
        self.full_weight = head_weight.detach()
        self.weight = self.full_weight if draft_ids is None else self.full_weight.index_select(0, draft_ids)
        self.t2d = t2d
        self.chunk_elements = chunk_elements

    def probs(self, positions: torch.Tensor) -> torch.Tensor:
        logits = self.hidden.index_select(0, positions) @ self.weight.T
        return torch.softmax(logits.float(), dim=-1)

    def valid(self) -> torch.Tensor:
        if self.t2d is None:
            return torch.ones(self.shape, dtype=torch.bool, device=self.hidden.device)
        rows = max(1, self.chunk_elements // self.full_weight.shape[0])
        argmax = torch.cat([(chunk @ self.full_weight.T).argmax(-1) for chunk in self.hidden.split(rows)])
        return self.t2d[argmax].view(self.shape)


class DenseTargetProbs(TargetDistribution):
    """Precomputed target probabilities ``[B, T, draft_vocab]`` (already over the draft vocab)."""

    def __init__(self, probs: torch.Tensor, valid: torch.Tensor | None = None):
        self.shape = probs.shape[:2]
        self.flat = probs.detach().flatten(0, 1)
        self._valid = valid

    def probs(self, positions: torch.Tensor) -> torch.Tensor:
        return self.flat.index_select(0, positions).float()

    def valid(self) -> torch.Tensor:
        if self._valid is not None:
            return self._valid.bool()
        return torch.ones(self.shape, dtype=torch.bool, device=self.flat.device)


def _chunks(row_positions: torch.Tensor, rows_per_chunk: int) -> list[tuple[int, int, int, int]]:
    """Split rows (sorted by target position) into chunks that never split a target position.

    Returns ``(row_start, row_end, unique_start, unique_end)`` tuples.
    """
    _, counts = torch.unique_consecutive(row_positions, return_counts=True)
    chunks, row_start, unique_start, rows = [], 0, 0, 0
    for index, count in enumerate(counts.tolist()):
        if rows and rows + count > rows_per_chunk:
            chunks.append((row_start, row_start + rows, unique_start, index))
            row_start, unique_start, rows = row_start + rows, index, 0
        rows += count
    if rows:
        chunks.append((row_start, row_start + rows, unique_start, len(counts)))
    return chunks


class _ChunkedForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, row_positions, chunk_elements):
        unique_positions, local_index = torch.unique_consecutive(row_positions, return_inverse=True)
        chunks = _chunks(row_positions, max(1, chunk_elements // weight.shape[0]))
        losses = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        correct = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        for row_start, row_end, unique_start, unique_end in chunks:
            target_probs = target.probs(unique_positions[unique_start:unique_end])
            target_rows = target_probs.index_select(0, local_index[row_start:row_end] - unique_start)
            logits = (hidden[row_start:row_end] @ weight.T).float()
            losses[row_start:row_end] = -(target_rows * F.log_softmax(logits, dim=-1)).sum(-1)
            correct[row_start:row_end] = logits.argmax(-1) == target_rows.argmax(-1)
        ctx.save_for_backward(hidden, weight, unique_positions, local_index)
        ctx.target, ctx.chunks = target, chunks
        ctx.mark_non_differentiable(correct)
        return losses, correct

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):
        hidden, weight, unique_positions, local_index = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for row_start, row_end, unique_start, unique_end in ctx.chunks:
            target_probs = ctx.target.probs(unique_positions[unique_start:unique_end])
            target_rows = target_probs.index_select(0, local_index[row_start:row_end] - unique_start)
            rows = hidden[row_start:row_end]
            logits = (rows @ weight.T).float()
            # d/dz of -sum p log softmax(z) is softmax(z) * sum(p) - p.
            grad_logits = torch.softmax(logits, dim=-1) * target_rows.sum(-1, keepdim=True) - target_rows
            grad_logits = grad_logits * grad_losses[row_start:row_end, None]
            if grad_hidden is not None:
                grad_hidden[row_start:row_end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_weight.addmm_(grad_logits.T, rows.float())
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def chunked_forward_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: TargetDistribution,
    row_positions: torch.Tensor,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row forward-KL loss and top-1 agreement of ``hidden @ weight.T`` against ``target``.

    ``hidden`` is ``[rows, hidden]`` (the draft's normed hidden states), ``row_positions`` the flat
    target position of each row, sorted ascending. Returns ``(loss [rows] float32, correct [rows])``.
    """
    if row_positions.numel() and not bool((row_positions[1:] >= row_positions[:-1]).all()):
        raise ValueError("row_positions must be sorted ascending")
    return _ChunkedForwardKL.apply(hidden, weight, target, row_positions, chunk_elements)
