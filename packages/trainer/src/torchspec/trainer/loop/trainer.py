"""The Trainer composes the components of a run in the order they depend on each other; ``fit`` runs
the loop: a step (``loop.step``), its metrics, held-out evaluation (``loop.acceptance``: simulated
and real acceptance, the best checkpoint, early stop) and checkpoints at their intervals, and the
real speculative decoding of held-out prompts at the end. Each component is its own module with
one job (config, target factory, data order, draft, step, checkpoints and resume, metrics, LR
schedule, parallelism); ``loop.run.train`` is the entry point that builds one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch.distributed.checkpoint.stateful import Stateful

from torchspec.draft_models import Eagle3Model
from torchspec.draft_models.errors import UserInputError
from torchspec.draft_models.run_pointer import serving_folder
from torchspec.trainer.config import ConfigError, TrainConfig, dump_config
from torchspec.trainer.distributed.host_memory import loaded_allocator
from torchspec.trainer.distributed.parallelize import (
    apply_activation_checkpointing,
    parallelize_draft,
    parallelize_target,
)
from torchspec.trainer.distributed.process_group import (
    DistributedContext,
    mixed_precision_policy,
)
from torchspec.trainer.loop.acceptance import HeldOutEvaluation, RealAcceptance
from torchspec.trainer.loop.checkpoint import Checkpointer, find_latest
from torchspec.trainer.loop.data_loader import DistributedBatchLoader, pad_token_id
from torchspec.trainer.loop.draft import build_draft, check_draft_against_target, count_trainable, resolve_draft_config
from torchspec.trainer.loop.lr_schedule import WarmupDecaySchedule, build_lr_scheduler, warmup_steps_for
from torchspec.trainer.loop.metrics import (
    LoopClock,
    MetricsSink,
    ProgressBar,
    format_metrics,
)
from torchspec.trainer.loop.optimizer import build_optimizer
from torchspec.trainer.loop.prefetch import PrefetchingLoader
from torchspec.trainer.loop.result import TrainResult
from torchspec.trainer.loop.resume import check_same_draft, complete_checkpoint, resume_hint, resume_path
from torchspec.trainer.loop.run_lock import hold_on_main, raise_if_lost
from torchspec.trainer.loop.speculative_eval import evaluate_trained_draft
from torchspec.trainer.loop.states import LRScheduleState, ModelState, OptimizerState, RNGState, TrainState
from torchspec.trainer.loop.step import DraftStep
from torchspec.trainer.loop.training_data import VOCAB_MAPPING_FILE, load_training_data, run_vocab_mapping
from torchspec.trainer.targets.contract import ServedTarget
from torchspec.trainer.targets.factory import backend_name, build_target
from torchspec.trainer.targets.in_process import TargetModel
from torchspec.trainer.targets.resolve import load_tokenizer, resolve_dtype, resolve_target_path

__all__ = ["TrainResult", "Trainer"]

logger = logging.getLogger("torchspec.trainer")


class Trainer:
    """Builds the components in the order they depend on each other; ``fit`` runs the loop. Holds the
    output folder (``loop.run_lock``, main rank) from construction until :meth:`close`."""

    def __init__(self, config: TrainConfig, ctx: DistributedContext):
        self.config, self.ctx = config, ctx
        t, m, ckpt = config.training, config.model, config.checkpoint
        self.output_dir = Path(t.output_dir)
        # Held before anything reads the folder, by the public API (Trainer(...).fit()) as by train().
        self.closed, self.lock = False, hold_on_main(self.output_dir, ctx.is_main)
        try:
            self.resume_from = resume_path(ckpt.resume, self.output_dir)
            lost = self.lock.lost if self.lock is not None else None
            self.checkpointer = Checkpointer(self.output_dir, ckpt.keep_last, guard=lost)
            self.checkpointer.clean_stale()

            # The target, its tokenizer, the data.
            target_path = resolve_target_path(m.target_model_path)
            self.target = build_target(config, target_path, ctx)
            self._build(config, ctx, target_path)
        except BaseException:
            self.close(failed=True)
            raise

    def _build(self, config: TrainConfig, ctx: DistributedContext, target_path: Path) -> None:
        t, m, ckpt = config.training, config.model, config.checkpoint
        tokenizer = load_tokenizer(m.tokenizer_path or target_path, m.trust_remote_code)
        data = load_training_data(config.data, tokenizer, t.seed, ctx.is_main)
        _log(ctx, f"data: {data.summary}")
        if isinstance(self.target, ServedTarget):
            self.target.check_covers(data.train, data.eval, max_seq_length=config.data.max_seq_length)
        self.eval_dataset, self.eos_token_id = data.eval, tokenizer.eos_token_id

        # The draft, checked against the target, wrapped for TTT and sharded.
        self.draft_config = resolve_draft_config(m, self.target.config)
        check_draft_against_target(
            self.draft_config, self.target, tokenizer, m.draft_config or "the generated draft config"
        )
        self.vocab_mapping = run_vocab_mapping(self.draft_config, ckpt.continual_training, data.train)
        torch.manual_seed(t.seed)  # the same initial draft on every rank
        self.draft = build_draft(self.draft_config, self.target, self.vocab_mapping).to(ctx.device)
        ttt = config.ttt
        self.model = Eagle3Model(self.draft, ttt.length, ttt.attention_backend, loss_decay=ttt.loss_decay)
        apply_activation_checkpointing(self.model, "layer" if ttt.gradient_checkpointing else "mlp")
        parallelize_draft(self.model, ctx.mesh, mixed_precision_policy(resolve_dtype(t.dtype, ctx.device)))
        if isinstance(self.target, TargetModel) and t.shard_target:
            parallelize_target(self.target, ctx.mesh, ctx.device)
        _log(
            ctx,
            f"target: {target_path} ({self.target.num_layers} layers, aux layers {self.target.aux_layer_ids}"
            f"{', sharded' if t.shard_target else ''}; hidden states from {backend_name(config)}); "
            f"draft: {self.draft_config.architectures[0]}, "
            f"{count_trainable(self.draft):,} trainable parameters, vocab {self.draft_config.draft_vocab_size}/"
            f"{self.draft_config.vocab_size}; world size {ctx.world_size} on {ctx.device}"
            + (f" (host allocator: {loaded_allocator()})" if ctx.device.type == "cpu" else ""),
        )

        # Optimizer, schedule, data order.
        opt = config.optimizer
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(trainable, opt.learning_rate, (opt.betas[0], opt.betas[1]), opt.weight_decay)
        pad_id = pad_token_id(tokenizer)
        try:
            self.loader: DistributedBatchLoader | PrefetchingLoader = DistributedBatchLoader(
                data.train,
                t.global_batch_size,
                t.micro_batch_size,
                pad_id,
                ctx.rank,
                ctx.world_size,
                t.seed,
                config.data.max_seq_length,
            )
        except UserInputError as err:
            raise ConfigError(f"training.global_batch_size: {err}") from None
        if isinstance(self.target, ServedTarget) and self.target.prefetches:  # computed while the draft trains
            gib = config.target.prefetch_gib
            self.loader = PrefetchingLoader(
                self.loader, self.target, config.target.prefetch_batches, None if gib is None else gib * 2**30
            )
        self.total_steps = t.max_steps or t.num_epochs * self.loader.steps_per_epoch
        sched = config.lr_schedule
        warmup = warmup_steps_for(self.total_steps, sched.warmup_steps, sched.warmup_ratio)
        self.scheduler = build_lr_scheduler(
            self.optimizer,
            WarmupDecaySchedule(self.total_steps, warmup, sched.kind, sched.min_lr_ratio, sched.decay_ratio),
        )
        self.step_fn = DraftStep(
            config, ctx, self.model, self.target, self.draft_config, self.optimizer, self.scheduler
        )
        self.train_state = TrainState(self.target.aux_layer_ids, ctx.world_size)
        real = RealAcceptance.build(config, ctx, self.draft, self.target, data.eval, self.eos_token_id)
        self.held_out = HeldOutEvaluation(config, ctx, self.step_fn, self.train_state, real, data.eval, pad_id)
        # What a checkpoint holds, each component Stateful (torchspec.trainer.loop.states).
        self.states: dict[str, Stateful] = {
            "model": ModelState(self.draft),
            "optimizer": OptimizerState(self.draft, self.optimizer),
            "lr_scheduler": LRScheduleState(self.scheduler),
            "data": self.loader,
            "train": self.train_state,
            "rng": RNGState(),
        }

    def close(self, failed: bool = False) -> None:
        """Stop the judge server and the target's engine or dump files; hand the output folder back
        (``failed``: see release)."""
        try:
            held_out = getattr(self, "held_out", None)  # None: the build stopped before it
            if held_out is not None:
                held_out.close()
            target = getattr(self, "target", None)  # None: the build stopped before the target
            if isinstance(target, ServedTarget):
                target.close()
        finally:
            if self.lock is not None:
                self.lock.release(failed=failed)
            self.lock, self.closed = None, True

    def restore(self) -> None:
        """Resume everything from ``checkpoint.resume``, or take only the weights of ``continual_training``."""
        ckpt = self.config.checkpoint
        if self.resume_from is not None:
            check_same_draft(self.resume_from, self.draft_config, "checkpoint.resume")
            self.checkpointer.load(self.resume_from, self.states, source="checkpoint.resume")
            _log(
                self.ctx,
                resume_hint(
                    cast(str, ckpt.resume), self.output_dir, self.resume_from, self.train_state.step, self.total_steps
                ),
            )
        elif ckpt.continual_training is not None:
            source = complete_checkpoint(ckpt.continual_training, "checkpoint.continual_training")
            check_same_draft(source, self.draft_config, "checkpoint.continual_training")
            self.checkpointer.load(source, {"model": self.states["model"]}, source="checkpoint.continual_training")
            _log(self.ctx, f"draft weights from {source}; optimizer, schedule and data start fresh")

    def save(self) -> Path:
        target = self.target
        files = {
            "config.json": lambda path: self.draft_config.save_pretrained(path.parent),
            "aux_layers.json": lambda path: path.write_text(
                json.dumps({"aux_layer_ids": target.aux_layer_ids, "num_target_layers": target.num_layers}) + "\n"
            ),
            "training_config.yaml": lambda path: dump_config(self.config, path),
        }
        if self.vocab_mapping is not None:
            files[VOCAB_MAPPING_FILE] = self.vocab_mapping.save
        return self.checkpointer.save(self.train_state.step, self.states, files)

    def fit(self, step_callback: Callable[[int, dict], None] | None = None) -> TrainResult:
        t, ctx = self.config.metrics, self.ctx
        if self.closed:
            raise UserInputError("this Trainer was closed (its output folder handed back); build a new one to train")
        raise_if_lost(self.lock)  # the folder deleted since the Trainer was built: stop before writing it
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.config, self.output_dir / "training_config.yaml")
        resumed = self.resume_from is not None
        sink = (
            MetricsSink(
                self.output_dir,
                t.tensorboard,
                append=resumed,
                keep_through_step=self.train_state.step if resumed else None,
            )
            if ctx.is_main
            else None
        )
        _log(
            ctx,
            f"training {self.total_steps} steps ({self.loader.steps_per_epoch} per epoch, "
            f"{self.loader.accumulation_steps} micro-batches of {self.config.training.micro_batch_size} per rank "
            "per step); "
            f"metrics: {self.output_dir / 'metrics.jsonl'} (acceptance_length = 1 + sum_k prod_{{i<=k}} cond_acc_i)",
        )
        # A tqdm bar on a terminal (main rank, metrics.progress_bar); log lines are printed above it.
        progress = ProgressBar(self.total_steps, enabled=t.progress_bar and ctx.is_main, initial=self.train_state.step)
        try:
            with progress.redirect_logging():
                history, eval_metrics, checkpoint = self._loop(progress, sink, step_callback)
        finally:
            progress.close()
            if sink is not None:
                sink.close()
        checkpoint = checkpoint or find_latest(self.output_dir)
        speculative = evaluate_trained_draft(self) if t.speculative_eval_prompts else None
        _log(ctx, f"checkpoint: {checkpoint}")
        _log(ctx, f"next: hatch run converter:export  (exports this run to {serving_folder(self.output_dir)})")
        result = TrainResult(self.output_dir, checkpoint, self.train_state.step, history, eval_metrics, speculative)
        result.stopped_early = self.held_out.stopped
        return result

    def _loop(
        self, progress: ProgressBar, sink: MetricsSink | None, step_callback: Callable[[int, dict], None] | None
    ) -> tuple[list[dict], dict | None, Path | None]:
        t, ctx, state = self.config.metrics, self.ctx, self.train_state
        history, eval_metrics, checkpoint = [], None, self.resume_from
        clock = LoopClock()
        while state.step < self.total_steps:
            with clock.measure("data"):
                batches = [batch.to(ctx.device) for batch in self.loader.next_batches()]
            record = self.step_fn.train(batches)
            clock.add("target", record["target_seconds"])
            clock.add("draft", record["step_seconds"] - record["target_seconds"])
            state.step += 1
            record = {"step": state.step, "split": "train", "epoch": self.loader.epoch, **record}
            history.append(record)
            if sink is not None:
                sink.write(record)
            progress.update(state.step, f"loss {record['loss']:.3f} acc {record['acc']:.3f}{self.held_out.postfix}")
            last = state.step == self.total_steps
            if state.step % t.log_interval == 0 or last:
                _log(ctx, format_metrics(record))
            outcome = self.held_out.after_step(state.step, last, sink, clock)
            eval_metrics = outcome.eval_metrics or eval_metrics
            # A new best is always saved, so that best.json points at a checkpoint; so is an early stop.
            save_interval = self.config.checkpoint.save_interval
            if (save_interval and state.step % save_interval == 0) or last or outcome.new_best or outcome.stop:
                with clock.measure("checkpoint"):
                    checkpoint = self.save()
                if outcome.best_record is not None:
                    self.checkpointer.mark_best(checkpoint, outcome.best_record)
            if step_callback is not None:
                step_callback(state.step, record)
            if outcome.stop is not None:
                _log(ctx, outcome.stop)
                break
        _log(ctx, f"where the time went: {clock.summary()}")
        return history, eval_metrics, checkpoint


def _log(ctx: DistributedContext, message: str) -> None:
    if ctx.is_main:
        logger.info(message)
