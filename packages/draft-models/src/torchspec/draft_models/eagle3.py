"""``Eagle3Model``: test-time training (TTT) of a draft, unrolled ``length`` steps.

Alignment (EAGLE-3). The target saw tokens ``x_0 .. x_{T-1}``; its aux hidden states at position
``t`` summarise ``x_0 .. x_t`` and its distribution ``p_t`` predicts ``x_{t+1}``.

* Step 0, row ``t``: input the target's hidden states at ``t`` and the embedding of ``x_{t+1}``;
  trained toward ``p_{t+1}`` (which predicts ``x_{t+2}``).
* Step ``k``, row ``t``: input the draft's own hidden state of step ``k-1`` (pre-norm; the normed one
  under ``norm_output``, as the engines chain it) and ``x_{t+1+k}``;
  trained toward ``p_{t+1+k}``. Row ``t`` of every step is one drafted chain, so its RoPE position
  advances with the chain (``t + k``), as in a serving engine's draft.
* ``loss_mask`` is step-0 aligned (1 where row ``t`` counts at step 0, see
  :func:`step0_loss_mask`); at step ``k`` row ``t`` counts where ``loss_mask[t + k]`` does and the
  target position ``t + 1 + k`` is inside the sequence, not padding and valid.

Loss per step: the forward KL ``-sum p_target log q_draft`` summed over counted rows, divided by a
normaliser (the counted rows of this batch, or global counts under data parallelism). The training
objective ``Eagle3Output.loss`` is ``sum_k loss_decay**k * loss_k``; the model knows ``loss_decay``
because the fused loss (:mod:`torchspec.draft_models.loss`) forms the gradient in forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchspec.draft_models.draft_model import Eagle3DraftModel
from torchspec.draft_models.loss import (
    DEFAULT_CHUNK_ELEMENTS,
    DenseTargetProbs,
    TargetDistribution,
    TargetFromHead,
    fused_forward_kl,
)
from torchspec.draft_models.ttt_attention import ATTENTION_BACKENDS, TTTMask

__all__ = ["Eagle3Model", "Eagle3Output", "step0_loss_mask"]


def step0_loss_mask(token_loss_mask: torch.Tensor) -> torch.Tensor:
    """Align a per-token mask (1 on tokens the target generated) to TTT step 0.

    Row ``t`` of step 0 predicts token ``t + 2``, so it counts where ``token_loss_mask[t + 2]`` is 1.
    """
    aligned = torch.zeros_like(token_loss_mask)
    aligned[:, :-2] = token_loss_mask[:, 2:]
    return aligned


@dataclass
class Eagle3Output:
    loss: torch.Tensor  # sum_k loss_decay**k * losses[k], the training objective (differentiable)
    loss_decay: float
    loss_sums: torch.Tensor  # [length] summed forward-KL over counted rows (for metrics; no gradient)
    losses: torch.Tensor  # [length] loss_sums / normaliser (no gradient)
    accuracies: torch.Tensor  # [length] top-1 agreement with the target over counted rows
    counted: torch.Tensor  # [length] counted rows per step
    correct: torch.Tensor  # [length, B, T] bool: draft top-1 == target top-1 (False where not counted)
    counted_mask: torch.Tensor  # [length, B, T] bool

    def total_loss(self, decay: float | None = None) -> torch.Tensor:
        """The differentiable objective; ``decay``, if given, must be the model's ``loss_decay``
        (the fused loss builds its gradient with the decay in forward)."""
        if decay is not None and decay != self.loss_decay:
            raise ValueError(
                f"this output was computed with loss_decay={self.loss_decay}; build "
                f"Eagle3Model(..., loss_decay={decay}) to train with decay {decay}"
            )
        return self.loss


class Eagle3Model(nn.Module):
    def __init__(
        self,
        draft: Eagle3DraftModel,
        length: int = 7,
        attention_backend: str = "sdpa",
        loss_chunk_elements: int | None = None,
        loss_decay: float = 0.8,
    ):
        """The math of TTT only: what activations are kept for backward (activation checkpointing)
        and how the draft is sharded are applied from outside, by the trainer's ``parallelize``."""
        super().__init__()
        if length < 1:
            raise ValueError(f"TTT length must be >= 1, got {length}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.draft = draft
        self.length = length
        self.attention_backend = attention_backend
        self.loss_chunk_elements = loss_chunk_elements
        self.loss_decay = loss_decay

    # --- which rows count --------------------------------------------------------------------------

    def counted_positions(
        self,
        loss_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[length, B, T]`` bool: row ``t`` of step ``k`` is trained."""
        batch, seq_len = loss_mask.shape
        step0 = loss_mask.bool()
        present = torch.ones_like(step0) if attention_mask is None else attention_mask.bool()
        usable_target = present if target_valid is None else present & target_valid.bool()
        counted = torch.zeros(self.length, batch, seq_len, dtype=torch.bool, device=loss_mask.device)
        for k in range(min(self.length, seq_len - 1)):
            rows = seq_len - 1 - k
            counted[k, :, :rows] = step0[:, k : k + rows] & usable_target[:, k + 1 :] & present[:, :rows]
        return counted

    def count_positions(self, loss_mask, attention_mask=None, target_valid=None) -> torch.Tensor:
        """Counted rows per step, ``[length]``: all-reduce these for a global loss normaliser."""
        return self.counted_positions(loss_mask, attention_mask, target_valid).sum(dim=(1, 2))

    def target_in_draft_vocab(self, target_hidden: torch.Tensor, target_head_weight: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: the target's top-1 token is in the draft vocabulary (always, unpruned)."""
        return self._target(target_hidden, target_head_weight, None).valid()

    def _target(self, target_hidden, target_head_weight, target_probs, target_valid=None) -> TargetDistribution:
        if target_probs is not None:
            if target_hidden is not None or target_head_weight is not None:
                raise ValueError("pass either target_probs or target_hidden + target_head_weight, not both")
            if target_probs.shape[-1] != self.draft.config.draft_vocab_size:
                raise ValueError(
                    f"target_probs has {target_probs.shape[-1]} classes; the draft vocab has "
                    f"{self.draft.config.draft_vocab_size}"
                )
            return DenseTargetProbs(target_probs, target_valid)
        if target_hidden is None or target_head_weight is None:
            raise ValueError("the target needs target_hidden and target_head_weight, or target_probs")
        pruned = self.draft.d2t is not None
        return TargetFromHead(
            target_hidden,
            target_head_weight,
            draft_ids=self.draft.draft_to_target_ids() if pruned else None,
            t2d=self.draft.t2d if pruned else None,
            chunk_elements=self.loss_chunk_elements or DEFAULT_CHUNK_ELEMENTS,
        )

    # --- the unrolled draft ------------------------------------------------------------------------

    def unroll(
        self,
        input_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the ``length`` TTT steps; returns the normed hidden states ``[length, B, T, H]``."""
        batch, seq_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        mask = TTTMask(attention_mask, self.attention_backend)
        draft = self.draft
        embeds = draft.embed_input_ids(input_ids)
        # Row t of step k reads token t + 1 + k; rows past the end read zeros and are never counted.
        # Every step's input is a view of one tensor, so backward keeps one copy, not one per step.
        shifted_embeds = torch.cat([embeds[:, 1:], embeds.new_zeros(batch, self.length, embeds.shape[-1])], 1)
        hidden = draft.project_hidden_states(hidden_states.to(draft.fc.weight.dtype))
        cache_keys = cache_values = None
        normed = []
        for k in range(self.length):
            step_embeds = shifted_embeds[:, k : k + seq_len]
            hidden, cache_keys, cache_values = draft.backbone(
                step_embeds, hidden, mask, position_ids + k, cache_keys, cache_values, True
            )
            normed.append(draft.norm(hidden))
            hidden = draft.next_step_hidden(hidden, normed[-1])
        return torch.stack(normed)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        loss_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
        target_head_weight: torch.Tensor | None = None,
        target_probs: torch.Tensor | None = None,
        target_valid: torch.Tensor | None = None,
        loss_normalizer: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> Eagle3Output:
        batch, seq_len = input_ids.shape
        target = self._target(target_hidden, target_head_weight, target_probs, target_valid)
        if target_valid is None:
            target_valid = target.valid()
        counted_mask = self.counted_positions(loss_mask, attention_mask, target_valid)
        normed = self.unroll(input_ids, hidden_states, attention_mask, position_ids)

        counted = counted_mask.sum(dim=(1, 2))
        normalizer = counted.clamp(min=1).float() if loss_normalizer is None else loss_normalizer.float().clamp(min=1)
        step_weights = self.loss_decay ** torch.arange(self.length, device=normalizer.device) / normalizer
        positions, row_index, row_weight, row_counted = self._rows_by_target(counted_mask, step_weights)
        loss, loss_sums, row_correct = fused_forward_kl(
            normed,
            self.draft.lm_head.weight,
            target,
            positions,
            row_index,
            row_weight,
            row_counted,
            self.loss_chunk_elements,
        )
        correct = torch.zeros_like(counted_mask)
        correct.view(-1)[row_index[row_counted]] = row_correct[row_counted]
        return Eagle3Output(
            loss=loss,
            loss_decay=self.loss_decay,
            loss_sums=loss_sums,
            losses=loss_sums / normalizer,
            accuracies=correct.sum(dim=(1, 2)).float() / counted.clamp(min=1).float(),
            counted=counted,
            correct=correct,
            counted_mask=counted_mask,
        )

    @staticmethod
    def _rows_by_target(counted_mask: torch.Tensor, step_weights: torch.Tensor):
        """Group the counted rows of every step by the target position they are trained toward.

        Row ``t`` of step ``k`` is trained toward position ``t + 1 + k``. Returns the flat target
        positions ``[U]`` that any step trains toward and, per step, the flat row of ``normed``
        (``[length, B, T]`` flattened) trained toward each, its loss weight and whether it counts.
        """
        length, batch, seq_len = counted_mask.shape
        device = counted_mask.device
        steps = torch.arange(length, device=device)
        target_counted = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
        for k in range(min(length, seq_len - 1)):
            target_counted[:, k + 1 :] |= counted_mask[k, :, : seq_len - 1 - k]
        positions = target_counted.view(-1).nonzero().view(-1)
        sequence, target_pos = positions // seq_len, positions % seq_len
        row_pos = target_pos[None, :] - 1 - steps[:, None]  # [length, U]
        in_sequence = row_pos >= 0
        row_index = (steps[:, None] * batch + sequence[None, :]) * seq_len + row_pos.clamp(min=0)
        row_counted = in_sequence & counted_mask.view(-1)[row_index]
        row_weight = row_counted * step_weights[:, None]
        return positions, row_index, row_weight, row_counted
