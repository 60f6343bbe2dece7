"""Forward-KL loss of the draft head against the target's next-token distribution.

The loss of one row (one position at one TTT step) is ``-sum_v p_target(v) * log q_draft(v)``.
Vocabularies are large (150k tokens) and TTT visits every position ``length`` times, so the loss
is computed by :func:`fused_forward_kl`, which

* walks chunks of target positions, computes each position's target distribution once and trains
  the rows of every TTT step that predict it against it (the rows of step ``k`` trained toward
  position ``u`` are one gather, so no ``[rows, vocab]`` copy of the target is made per step);
* never materialises more than one chunk of ``[rows, vocab]`` logits (one buffer, reused);
* computes the gradients in the forward pass (the gradient of a forward-KL row is closed-form once
  its softmax is known), so backward does not recompute the logits: three vocabulary-sized
  matmuls per row instead of four.

Targets come from a :class:`TargetDistribution`: the target's final hidden states and its
``lm_head`` weight (computed lazily, chunk by chunk), or dense probabilities already restricted to
the draft vocabulary.
"""

from __future__ import annotations

import torch

__all__ = [
    "DenseTargetProbs",
    "TargetDistribution",
    "TargetFromHead",
    "fused_forward_kl",
]

# Elements of one [rows, vocab] float32 buffer (64 MiB): the logits buffer and one chunk of target
# probabilities are alive at once, beside the lm_head's weight, gradient and AdamW state. A chunk
# never has fewer than MIN_CHUNK_ROWS rows by default, below which the vocabulary matmuls lose speed.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK_ROWS = 256
# On the CPU, half of each (262 rows at a 32k vocabulary, 128 at 151,936): with the blocked logits
# below, the CPU benchmark measured the same step time within run-to-run noise and 30-150 MB less
# peak RSS. Accelerators keep the larger chunks (fewer, larger kernels; not measured here).
_CPU_CHUNK_ELEMENTS = 1 << 23
_CPU_MIN_CHUNK_ROWS = 128

# CPU BLAS packs the whole [hidden, vocab] operand of a product with few rows before it multiplies;
# the logits are therefore computed this many vocabulary rows at a time, whose packed panel stays in
# cache (8-12% faster products at 128-512 rows, measured at 32k and 151,936-token vocabularies).
_CPU_LOGITS_BLOCK = 1024


def _logits_into(out: torch.Tensor, states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[:] = states @ weight.T`` in float32."""
    if weight.dtype != torch.float32 or states.dtype != torch.float32:
        return out.copy_(states @ weight.T)
    if out.device.type != "cpu":
        return torch.mm(states, weight.T, out=out)
    for start in range(0, weight.shape[0], _CPU_LOGITS_BLOCK):
        end = start + _CPU_LOGITS_BLOCK
        torch.mm(states, weight[start:end].T, out=out[:, start:end])
    return out


def _logits_times_weight(grad_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad_logits @ weight``, ``[rows, hidden]``."""
    if grad_logits.device.type != "cpu":
        return grad_logits @ weight
    # The same product as (weight^T @ grad_logits^T)^T: CPU BLAS runs that layout faster when there
    # are few rows (4-28% at 128-512 rows, measured at 32k and 151,936), and the transposed result is
    # only [rows, hidden].
    return (weight.T @ grad_logits.T).T


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
        states = self.hidden.index_select(0, positions)
        logits = _logits_into(
            torch.empty(positions.numel(), self.weight.shape[0], dtype=torch.float32, device=states.device),
            states,
            self.weight,
        )
        # Softmax in place: one [positions, vocab] buffer instead of two.
        logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        return logits.div_(logits.sum(-1, keepdim=True))

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


class _FusedForwardKL(torch.autograd.Function):
    """The weighted loss, its per-step sums and its gradients in one pass over the vocabulary.

    The gradient of a forward-KL row is known as soon as its logits are (``softmax(z) * sum(p) - p``),
    so forward computes it at once and keeps only ``[rows, hidden]`` and ``[vocab, hidden]``
    gradients for backward: three matmuls per row instead of four (no logits recomputed), and no
    ``[rows, vocab]`` tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, positions, row_index, row_weight, counted, chunk_rows, with_grads):
        steps = row_index.shape[0]
        flat_hidden = hidden.flatten(0, -2)
        loss_sums = torch.zeros(steps, dtype=torch.float64, device=hidden.device)
        correct = torch.zeros(counted.shape, dtype=torch.bool, device=hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_hidden = torch.zeros_like(flat_hidden) if with_grads and ctx.needs_input_grad[0] else None
        # Written by the first chunk's matmul, accumulated into by the rest (zero-filling an
        # lm_head-sized buffer first costs a pass over it).
        grad_weight = (
            torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            if with_grads and ctx.needs_input_grad[1]
            else None
        )
        grad_weight_written = False
        # One [chunk_rows, vocab] buffer for the logits of every chunk and step, reused in place.
        logits_buffer = torch.empty(
            min(chunk_rows, positions.numel()), weight.shape[0], dtype=torch.float32, device=hidden.device
        )
        for start in range(0, positions.numel(), chunk_rows):
            end = min(start + chunk_rows, positions.numel())
            # Counted rows are selected, not weighted by 0: a NaN or inf in what does not count
            # (padding, a position no step trains toward) must not reach the sums, and 0 * NaN is
            # NaN. Once per chunk, on [steps, rows] tables: positions no step counts are dropped
            # (their target is never computed); below, each step's uncounted rows read zeros
            # instead of their states. No vocabulary-sized tensor is added.
            kept = counted[:, start:end].any(0).nonzero().view(-1)
            if kept.numel() == 0:
                continue
            chunk_rows_index = row_index[:, start:end].index_select(1, kept)
            chunk_counted = counted[:, start:end].index_select(1, kept)
            chunk_weights = torch.where(chunk_counted, row_weight[:, start:end].index_select(1, kept), 0.0)
            chunk_correct = torch.zeros(chunk_counted.shape, dtype=torch.bool, device=hidden.device)
            target_probs = target.probs(positions[start:end].index_select(0, kept))
            target_mass = target_probs.sum(-1)
            target_top = target_probs.argmax(-1)
            for step in range(steps):
                rows, weights, is_counted = chunk_rows_index[step], chunk_weights[step], chunk_counted[step]
                states = flat_hidden.index_select(0, rows).masked_fill_(~is_counted.unsqueeze(1), 0)
                logits = _logits_into(logits_buffer[: kept.numel()], states, weight)
                chunk_correct[step] = (logits.argmax(-1) == target_top) & is_counted
                # -sum p log softmax(z) = -sum p (z - m) + sum(p) * log sum exp(z - m)
                logits.sub_(logits.amax(-1, keepdim=True))
                cross = torch.bmm(target_probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
                exp_sum = logits.exp_().sum(-1)
                row_loss = torch.where(is_counted, target_mass * exp_sum.log() - cross, 0.0).double()
                loss_sums[step] += row_loss.sum()
                total += (row_loss * weights.double()).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d/dz of -sum p log softmax(z) is softmax(z) * sum(p) - p; rows weighted by their share.
                grad_logits = logits.mul_((weights * target_mass / exp_sum).unsqueeze(1))
                grad_logits.addcmul_(target_probs, weights.unsqueeze(1), value=-1.0)
                if grad_hidden is not None:
                    grad_hidden.index_add_(
                        0, rows, _logits_times_weight(grad_logits.to(weight.dtype), weight).to(hidden.dtype)
                    )
                if grad_weight is not None:
                    if grad_weight_written:
                        grad_weight.addmm_(grad_logits.T, states.float())
                    else:
                        torch.mm(grad_logits.T, states.float(), out=grad_weight)
                        grad_weight_written = True
            correct[:, start:end].index_copy_(1, kept, chunk_correct)
            # Freed before the next chunk's are made: otherwise three [rows, vocab] buffers are
            # alive at once (the peak of the step at large vocabularies).
            del target_probs
        if grad_weight is not None and not grad_weight_written:
            grad_weight.zero_()  # no rows at all
        ctx.grads = (
            None if grad_hidden is None else grad_hidden.view_as(hidden),
            None if grad_weight is None else grad_weight.to(weight.dtype),
        )
        ctx.mark_non_differentiable(loss_sums, correct)
        return total.float(), loss_sums.float(), correct

    @staticmethod
    def backward(ctx, grad_total, _grad_loss_sums, _grad_correct):
        # Under torch.no_grad autograd records no node, so backward only runs where forward formed
        # the gradients; they are handed over once (keeping them would hold [rows, hidden] and
        # lm_head-sized buffers until the graph is freed).
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(
                "a second backward through the fused loss: its gradients are formed in forward and were "
                "used by the first backward (retain_graph cannot replay them); run the forward again"
            )
        grad_hidden, grad_weight = grads
        del ctx.grads
        # Scaled in place: these buffers belong to this node alone (an lm_head-sized copy otherwise).
        return (
            None if grad_hidden is None else grad_hidden.mul_(grad_total.to(grad_hidden.dtype)),
            None if grad_weight is None else grad_weight.mul_(grad_total.to(grad_weight.dtype)),
        ) + (None,) * 7


def fused_forward_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: TargetDistribution,
    positions: torch.Tensor,
    row_index: torch.Tensor,
    row_weight: torch.Tensor,
    counted: torch.Tensor,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward-KL of ``hidden @ weight.T`` against ``target``, rows grouped by target position.

    ``hidden`` holds the draft's normed hidden states ``[..., H]`` (any leading shape, read as flat
    rows). ``positions`` ``[U]`` are the flat target positions trained toward; for each of ``S``
    steps, ``row_index[s, u]`` is the row of ``hidden`` trained toward ``positions[u]``,
    ``row_weight[s, u]`` its weight in the returned loss and ``counted[s, u]`` whether it counts at
    all. Rows that do not count are never read (their weight is ignored, their index may point
    anywhere, at states holding anything, NaN included), nor are the targets of positions that no
    step counts.

    Returns ``(loss, loss_sums, correct)``: the differentiable ``sum(row_weight * row_loss)``, the
    unweighted loss of the counted rows per step ``[S]``, and top-1 agreement with the target
    ``[S, U]`` (False where not counted). Gradients are computed in the forward pass when grad mode
    is on, so a second backward through the same output is not possible.
    """
    if not (row_index.shape == row_weight.shape == counted.shape) or row_index.shape[-1] != positions.numel():
        raise ValueError(
            f"row_index {tuple(row_index.shape)}, row_weight {tuple(row_weight.shape)} and counted "
            f"{tuple(counted.shape)} must all be [steps, {positions.numel()}]"
        )
    if chunk_elements is not None:
        chunk_rows = max(1, chunk_elements // weight.shape[0])
    elif hidden.device.type == "cpu":
        chunk_rows = max(_CPU_MIN_CHUNK_ROWS, _CPU_CHUNK_ELEMENTS // weight.shape[0])
    else:
        chunk_rows = max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // weight.shape[0])
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedForwardKL.apply(
        hidden, weight, target, positions, row_index, row_weight.float(), counted.bool(), chunk_rows, with_grads
    )
