"""One optimizer step of the draft, and the held-out evaluation that shares its passes.

1. the target runs on every micro-batch of this rank's share of the global batch, yielding the aux
   hidden states and its final hidden state;
2. the counted positions per TTT step are summed over micro-batches and all-reduced, so every
   loss is divided by the *global* count: the gradient is that of the mean over the global batch
   however it is split over ranks and accumulation steps (FSDP sums, not averages, the gradients);
3. the draft runs forward and backward on each micro-batch, gradients synchronised on the last;
4. gradient clipping, AdamW, the LR schedule; the metrics counts are all-reduced.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

import torch

from torchspec.draft_models import Eagle3Model, step0_loss_mask
from torchspec.trainer.config import TrainConfig
from torchspec.trainer.distributed.process_group import DistributedContext, all_reduce_sum
from torchspec.trainer.loop.data_loader import MicroBatch
from torchspec.trainer.loop.metrics import TTTCounts, summarize, ttt_counts

__all__ = ["DraftStep"]


class DraftStep:
    """The draft's training step and evaluation against ``target`` (any ``targets.contract`` target)."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: DistributedContext,
        model: Eagle3Model,
        target: Any,
        draft_config: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ):
        self.config, self.ctx, self.model, self.target = config, ctx, model, target
        self.draft_config, self.optimizer, self.scheduler = draft_config, optimizer, scheduler
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def _target_pass(self, batch: MicroBatch):
        """The target's outputs for ``batch``, the step-0 loss mask, and (pruned vocab) which
        positions the draft vocabulary can learn."""
        out = self.target(batch.input_ids, batch.attention_mask)
        valid = None
        if self.draft_config.is_vocab_pruned:
            valid = self.model.target_in_draft_vocab(out.final_hidden, self.target.lm_head_weight)
        return out, step0_loss_mask(batch.loss_mask), valid

    def _draft_pass(self, batch: MicroBatch, out, loss_mask, valid, loss_normalizer=None):
        """The unrolled draft and its losses on one micro-batch, against the target's pass ``out``."""
        return self.model(
            batch.input_ids,
            out.aux_hidden_states,
            loss_mask,
            batch.attention_mask,
            target_hidden=out.final_hidden,
            target_head_weight=self.target.lm_head_weight,
            target_valid=valid,
            loss_normalizer=loss_normalizer,
        )

    def train(self, micro_batches: list[MicroBatch]) -> dict[str, Any]:
        t, ctx, model = self.config.training, self.ctx, self.model
        started = time.perf_counter()
        # 1. The target on every micro-batch, and the positions each TTT step counts, over all ranks.
        targets = [self._target_pass(batch) for batch in micro_batches]
        local_counts: torch.Tensor = sum(  # type: ignore[assignment]  # of tensors (micro_batches is not empty)
            model.count_positions(mask, batch.attention_mask, valid).double()
            for batch, (_, mask, valid) in zip(micro_batches, targets)
        )
        _synchronize(ctx.device)
        target_seconds = time.perf_counter() - started
        global_counts = all_reduce_sum(local_counts.clone())

        # 2. Draft forward/backward per micro-batch, each loss divided by the global counts, so the
        # accumulated (and rank-summed) gradient is that of the global-batch mean.
        counts = TTTCounts.zeros(self.config.ttt.length, ctx.device)
        for index, (batch, (out, loss_mask, valid)) in enumerate(zip(micro_batches, targets)):
            cast(Any, model).set_requires_gradient_sync(index == len(micro_batches) - 1)
            result = self._draft_pass(batch, out, loss_mask, valid, loss_normalizer=global_counts)
            result.total_loss(self.config.ttt.loss_decay).backward()
            counts = counts.add(ttt_counts(result.correct, result.counted_mask, result.loss_sums))

        # 3. Clip, step, schedule.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, t.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        _synchronize(ctx.device)
        seconds = time.perf_counter() - started

        # 4. Global metrics: one all-reduce of the counts, tokens and timings.
        tokens = sum(batch.num_tokens for batch in micro_batches)
        extras = torch.tensor([tokens, target_seconds, seconds], dtype=torch.float64, device=ctx.device)
        totals = all_reduce_sum(torch.cat([counts.as_tensor().flatten(), extras]))
        global_tokens, target_seconds_sum, seconds_sum = totals[-3:].tolist()
        return {
            **summarize(
                TTTCounts.from_tensor(totals[:-3].view(-1, self.config.ttt.length)), self.config.ttt.loss_decay
            ),
            "lr": learning_rate,
            "grad_norm": float(grad_norm),
            "tokens": int(global_tokens),
            "tokens_per_s": global_tokens / seconds,
            "target_time_share": target_seconds_sum / seconds_sum,
            "target_seconds": target_seconds,
            "step_seconds": seconds,
        }

    @torch.no_grad()
    def evaluate(self, eval_batches: Iterable[MicroBatch]) -> dict[str, Any]:
        """The training metrics over the whole held-out set (losses normalised by its total counts)."""
        t = self.config.ttt
        counts = TTTCounts.zeros(t.length, self.ctx.device)
        for batch in eval_batches:
            batch = batch.to(self.ctx.device)
            result = self._draft_pass(batch, *self._target_pass(batch))
            counts = counts.add(ttt_counts(result.correct, result.counted_mask, result.loss_sums))
        cast(Any, self.model).reshard()  # no backward follows, so FSDP would otherwise keep the root gathered
        totals = all_reduce_sum(counts.as_tensor().clone())
        return summarize(TTTCounts.from_tensor(totals), t.loss_decay)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
