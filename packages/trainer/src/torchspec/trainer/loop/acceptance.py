"""Held-out evaluation during training, and what it decides: the simulated acceptance of the eval
split (``DraftStep.evaluate``, every ``metrics.eval_interval`` steps) and the real acceptance of
speculative decoding on fixed held-out prompts (:class:`RealAcceptance`, every
``metrics.real_acceptance_interval`` steps), both at the last step too; which of them picks
``best.json`` (the real one, the simulated one only where real decoding is off or cannot run); and
early stop after ``training.early_stop_patience`` evaluations of that metric without a new best.

Real acceptance is the in-process evaluator (``loop.speculative_eval.evaluate_prompts``): greedy,
chains of :data:`NUM_DRAFT_TOKENS` draft tokens, ``metrics.real_acceptance_max_new_tokens`` tokens
per prompt, the first ``metrics.real_acceptance_prompts`` prompts of the eval split (each sample up to
its first supervised token), the same prompts at every measurement. The draft's full weights are
gathered from every rank (FSDP2), the main rank decodes, and the result is broadcast, so that every
rank takes the same best-checkpoint and early-stop decisions. Its 95% interval is a percentile
bootstrap over prompts (``loop.acceptance_stats.ratio_interval``).

Where a vLLM judge is configured (``metrics.judge_url``, ``metrics.start_judge``: the way runs whose
target is on an engine measure it), :class:`~torchspec.trainer.loop.served_acceptance.ServedRealAcceptance`
measures the same protocol with the engine instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import torch.distributed as dist

from torchspec.draft_models.checkpoint_layout import BestCheckpoint, checkpoint_name
from torchspec.trainer.config import TrainConfig, judge_configured, real_acceptance_off
from torchspec.trainer.distributed.process_group import DistributedContext
from torchspec.trainer.loop.acceptance_stats import ratio_interval
from torchspec.trainer.loop.data_loader import EvalBatches
from torchspec.trainer.loop.metrics import LoopClock, MetricsSink, format_metrics
from torchspec.trainer.loop.served_acceptance import ServedRealAcceptance
from torchspec.trainer.loop.speculative_eval import evaluate_prompts, gather_draft, prompts_from_tokenized
from torchspec.trainer.loop.states import TrainState, rng_state, set_rng_state
from torchspec.trainer.targets.in_process import TargetModel

__all__ = [
    "NUM_DRAFT_TOKENS",
    "REAL",
    "SIMULATED",
    "Evaluated",
    "HeldOutEvaluation",
    "RealAcceptance",
    "evaluate_prompts",
    "real_acceptance_off",
]

logger = logging.getLogger("torchspec.trainer")

REAL, SIMULATED = "real_acceptance_length", "acceptance_length"  # the metrics that can pick best.json
NUM_DRAFT_TOKENS = 4  # as `trainer:evaluate` by default


class RealAcceptance:
    """Speculative decoding of fixed held-out prompts with the draft as trained so far."""

    def __init__(self, draft, target: TargetModel, prompts, eos_token_id, config: TrainConfig, ctx):
        self.draft, self.draft_config, self.target, self.prompts = draft, draft.config, target, prompts
        self.eos_token_id, self.ctx = eos_token_id, ctx
        self.max_new_tokens = config.metrics.real_acceptance_max_new_tokens
        self.copy = None  # the main rank's plain copy of the draft, refilled at every measurement

    @classmethod
    def build(
        cls, config: TrainConfig, ctx: DistributedContext, draft, target, eval_dataset, eos
    ) -> RealAcceptance | ServedRealAcceptance | None:
        """The measurement (in-process, or by a vLLM judge where one is configured), or None (said
        once, with why, and which metric then picks best.json)."""
        off = real_acceptance_off(config)
        prompts = prompts_from_tokenized(eval_dataset, config.metrics.real_acceptance_prompts) if off is None else []
        if off is None and not prompts:
            off = "the eval split has no sample with a prompt before its first supervised token"
        if off is None and judge_configured(config):
            return ServedRealAcceptance(draft, target, prompts, config, ctx, NUM_DRAFT_TOKENS)
        if off is None and isinstance(target, TargetModel):
            return cls(draft, target, prompts, eos, config, ctx)
        if ctx.is_main:
            logger.info(f"real acceptance during training is off ({off}); best.json follows the simulated acceptance")
        return None

    def measure(self) -> dict[str, Any]:
        """The real acceptance now; every rank calls it and gets the main rank's result."""
        started = time.perf_counter()
        self.copy = gather_draft(self.draft, self.draft_config, self.ctx.is_main, self.target.model, self.copy)
        record: dict[str, Any] | None = None
        if self.copy is not None:
            saved = rng_state()  # decoding leaves the training's random streams where they were
            try:
                result = evaluate_prompts(
                    self.copy, self.target.model, self.prompts, self.max_new_tokens, NUM_DRAFT_TOKENS, self.eos_token_id
                )
            finally:
                set_rng_state(saved)
            rounds = result.per_prompt_rounds  # the interval of the same ratio of sums (tokens / rounds)
            interval = ratio_interval([a * n for a, n in zip(result.per_prompt_acceptance, rounds)], rounds)
            low, high = interval.low, interval.high
            record = {
                REAL: result.acceptance_length,
                "real_acceptance_low": low,
                "real_acceptance_high": high,
                "real_position_acceptance": result.position_acceptance,
                "num_prompts": result.num_prompts,
                "num_draft_tokens": result.num_draft_tokens,
                "max_new_tokens": self.max_new_tokens,
                "generated_tokens": result.generated_tokens,
                "identical_to_target": result.identical_to_target,
                "seconds": time.perf_counter() - started,
            }
        if dist.is_initialized():
            box = [record]
            dist.broadcast_object_list(box, src=0)
            record = box[0]
        return dict(record or {})


@dataclass
class Evaluated:
    """What the held-out evaluation of one step decided."""

    eval_metrics: dict[str, Any] | None  # the simulated evaluation, when it ran at this step
    new_best: bool = False
    best_record: dict[str, Any] | None = None  # what best.json then holds besides the checkpoint
    stop: str | None = None  # why the run stops early here


class HeldOutEvaluation:
    """Runs the evaluations due at a step, logs them (metrics file, TensorBoard, log lines) and offers
    the result to the :class:`TrainState`, which keeps the best and counts evaluations without one."""

    def __init__(
        self,
        config: TrainConfig,
        ctx,
        step_fn,
        state: TrainState,
        real: RealAcceptance | ServedRealAcceptance | None,
        eval_dataset,
        pad_id,
    ):
        self.metrics, self.ctx, self.step_fn = config.metrics, ctx, step_fn
        self.eval_batches = None
        if eval_dataset is not None and len(eval_dataset) > 0:
            t = config.training
            self.eval_batches = EvalBatches(
                eval_dataset, t.micro_batch_size, pad_id, ctx.rank, ctx.world_size, config.data.max_seq_length
            )
        self.state, self.real, self.patience = state, real, config.training.early_stop_patience
        self.metric = REAL if real is not None else SIMULATED
        self.latest_real: float | None = None
        self.stopped: str | None = None

    @property
    def postfix(self) -> str:
        """For the progress bar: the latest real acceptance."""
        return f" real {self.latest_real:.2f}" if self.latest_real is not None else ""

    def after_step(self, step: int, last: bool, sink: MetricsSink | None, clock: LoopClock) -> Evaluated:
        def due(interval: int) -> bool:
            return bool(interval and step % interval == 0) or last

        eval_metrics = real = None
        if self.eval_batches is not None and due(self.metrics.eval_interval):
            with clock.measure("eval"):
                eval_metrics = {"step": step, "split": "eval", **self.step_fn.evaluate(self.eval_batches)}
            self._report(sink, eval_metrics, "eval " + format_metrics(eval_metrics))
        if self.real is not None and due(self.metrics.real_acceptance_interval):
            with clock.measure("acceptance"):
                measurement = self.real.measure()  # empty: a judge's measurement failed (said why)
            if measurement:
                real = {"step": step, "split": "acceptance", **measurement}
                if eval_metrics is not None:
                    real["simulated_acceptance_length"] = eval_metrics[SIMULATED]
                self.latest_real = real[REAL]
                self._report(sink, real, _acceptance_line(real))
        measured = real if self.real is not None else eval_metrics
        if measured is None:
            return Evaluated(eval_metrics)
        new_best = self.state.offer_best(measured[self.metric], checkpoint_name(step), self.metric)
        best = {k: v for k, v in (self.state.best or {}).items() if k != "checkpoint"}
        if real is not None:
            best.update({k: real[k] for k in ("real_acceptance_low", "real_acceptance_high", "num_prompts")})
        if eval_metrics is not None:
            best["simulated_acceptance_length"] = eval_metrics[SIMULATED]
        stale = self.state.stale_evaluations
        if self.patience is not None and stale >= self.patience and not last:
            kept = BestCheckpoint.from_record(cast(dict, self.state.best))  # offered above: there is one
            self.stopped = (
                f"early stop at step {step}: {self.metric} has not improved for {stale} evaluations (best "
                f"{kept.value:.3f} at step {kept.step}, {kept.name}; training.early_stop_patience={self.patience})"
            )
        return Evaluated(eval_metrics, new_best, best if new_best else None, self.stopped)

    def close(self) -> None:
        """Stop the judge server the trainer started, if any."""
        if isinstance(self.real, ServedRealAcceptance):
            self.real.close()

    def _report(self, sink: MetricsSink | None, record: dict[str, Any], line: str) -> None:
        if sink is not None:
            sink.write(record)
        if self.ctx.is_main:
            logger.info(line)


def _acceptance_line(record: dict[str, Any]) -> str:
    judge = f"; {record['judge']}" if "judge" in record else ""
    parts = [
        f"acceptance step {record['step']}",
        f"real {record[REAL]:.3f} (95% CI {record['real_acceptance_low']:.2f}-{record['real_acceptance_high']:.2f}; "
        f"{record['num_prompts']} prompts x {record['max_new_tokens']} tokens, K={record['num_draft_tokens']}{judge})",
    ]
    if "simulated_acceptance_length" in record:
        parts.append(f"simulated {record['simulated_acceptance_length']:.3f}")
    parts.append("position " + " ".join(f"{a:.2f}" for a in record["real_position_acceptance"]))
    parts.append(f"{record['seconds']:.1f} s")
    return " | ".join(parts)
