"""The online training loop: the frozen target feeds the draft, batch by batch, in the same processes.

One optimizer step:

1. the target runs on every micro-batch of this rank's share of the global batch, yielding the aux
   hidden states and its final hidden state;
2. the counted positions per TTT step are summed over micro-batches and all-reduced, so every
   loss is divided by the *global* count: the gradient is that of the mean over the global batch
   however it is split over ranks and accumulation steps (FSDP sums, not averages, the gradients);
3. the draft runs forward and backward on each micro-batch, gradients synchronised on the last;
4. gradient clipping, AdamW, the LR schedule; the metrics counts are all-reduced and logged.

Everything else (config, capture, data order, metrics, schedule, checkpoints, process groups) is a
component in its own module; this file only composes them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from torchspec.draft_models import Eagle3Model, step0_loss_mask
from torchspec.draft_models.errors import UserInputError
from torchspec.draft_models.run_pointer import serving_folder
from torchspec.trainer.config import ConfigError, TrainConfig, dump_config
from torchspec.trainer.distributed.host_memory import loaded_allocator, pin_malloc_mmap_threshold
from torchspec.trainer.distributed.parallelize import (
    apply_activation_checkpointing,
    parallelize_draft,
    parallelize_target,
)
from torchspec.trainer.distributed.process_group import (
    DistributedContext,
    all_reduce_sum,
    init_distributed,
    mixed_precision_policy,
)
from torchspec.trainer.loop.checkpoint import Checkpointer, checkpoint_name, find_latest
from torchspec.trainer.loop.data_loader import DistributedBatchLoader, EvalBatches, MicroBatch
from torchspec.trainer.loop.draft import build_draft, check_draft_against_target, resolve_draft_config
from torchspec.trainer.loop.lr_schedule import WarmupDecaySchedule, build_lr_scheduler, warmup_steps_for
from torchspec.trainer.loop.metrics import (
    LoopClock,
    MetricsSink,
    ProgressBar,
    TTTCounts,
    format_metrics,
    summarize,
    summary_writer_class,
    ttt_counts,
)
from torchspec.trainer.loop.optimizer import build_optimizer
from torchspec.trainer.loop.prefetch import PrefetchingLoader
from torchspec.trainer.loop.resume import check_same_draft, complete_checkpoint, completed_run, resume_hint, resume_path
from torchspec.trainer.loop.run_lock import OutputDirLock
from torchspec.trainer.loop.states import LRScheduleState, ModelState, OptimizerState, RNGState, TrainState
from torchspec.trainer.loop.training_data import load_training_data, vocab_mapping_from_data
from torchspec.trainer.targets.contract import ServedTarget
from torchspec.trainer.targets.factory import (
    backend_name,
    build_target,
    load_tokenizer,
    resolve_dtype,
    resolve_target_path,
)
from torchspec.trainer.targets.in_process import TargetModel

__all__ = ["TrainResult", "Trainer", "train"]

logger = logging.getLogger("torchspec.trainer")

VOCAB_MAPPING_FILE = "vocab_mapping.safetensors"


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path | None
    steps: int
    train_history: list[dict[str, Any]] = field(default_factory=list)  # this process's step records
    eval_metrics: dict[str, Any] | None = None
    speculative_eval: dict[str, Any] | None = None  # real decoding of held-out prompts (main rank)
    already_complete: bool = False  # resumed a run with nothing left to train: nothing was done


def train(config: TrainConfig, step_callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run training as configured. ``step_callback(step, record)`` is called after every step.

    A run resumed (``checkpoint.resume``) from a checkpoint that already reached this config's last
    step trains nothing: one line says so and how to start over, and the result has
    ``already_complete=True``.
    """
    completed = completed_run(config)
    if completed is not None:
        checkpoint, step = completed
        return TrainResult(Path(config.training.output_dir), checkpoint, step, already_complete=True)
    if config.metrics.tensorboard:
        summary_writer_class()  # a missing package stops the run before anything loads or is written
    created_group = not dist.is_initialized()
    ctx = init_distributed(config.training.device)
    if ctx.device.type == "cpu":
        pin_malloc_mmap_threshold()  # glibc only: give freed activations back to the OS (host_memory)
    # Before the target loads: a second run on this folder, or one that cannot be written, stops here.
    lock = OutputDirLock(config.training.output_dir) if ctx.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        trainer = Trainer(config, ctx)
        try:
            trainer.restore()
            return trainer.fit(step_callback)
        finally:
            trainer.close()
    finally:
        if lock is not None:
            lock.release()
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """Builds the components in the order they depend on each other; ``fit`` runs the loop."""

    def __init__(self, config: TrainConfig, ctx: DistributedContext):
        self.config, self.ctx = config, ctx
        t, m, ckpt = config.training, config.model, config.checkpoint
        self.output_dir = Path(t.output_dir)
        self.resume_from = resume_path(ckpt.resume, self.output_dir)
        self.checkpointer = Checkpointer(self.output_dir, ckpt.keep_last)
        self.checkpointer.clean_stale()

        # The target, its tokenizer, the data.
        target_path = resolve_target_path(m.target_model_path)
        self.target = build_target(config, target_path, ctx)
        try:
            self._build(config, ctx, target_path)
        except BaseException:
            self.close()
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
        self.vocab_mapping = _vocab_mapping(self.draft_config, ckpt.continual_training, data.train)
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
            f"{_count(self.draft):,} trainable parameters, vocab {self.draft_config.draft_vocab_size}/"
            f"{self.draft_config.vocab_size}; world size {ctx.world_size} on {ctx.device}"
            + (f" (host allocator: {loaded_allocator()})" if ctx.device.type == "cpu" else ""),
        )

        # Optimizer, schedule, data order.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        opt = config.optimizer
        self.optimizer = build_optimizer(
            self.trainable, opt.learning_rate, (opt.betas[0], opt.betas[1]), opt.weight_decay
        )
        pad_id = _pad_id(tokenizer)
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
            self.loader = PrefetchingLoader(self.loader, self.target, config.target.prefetch_batches)
        self.total_steps = t.max_steps or t.num_epochs * self.loader.steps_per_epoch
        sched = config.lr_schedule
        warmup = warmup_steps_for(self.total_steps, sched.warmup_steps, sched.warmup_ratio)
        self.scheduler = build_lr_scheduler(
            self.optimizer,
            WarmupDecaySchedule(self.total_steps, warmup, sched.kind, sched.min_lr_ratio, sched.decay_ratio),
        )
        self.eval_batches = None
        if data.eval is not None and len(data.eval) > 0:
            self.eval_batches = EvalBatches(
                data.eval, t.micro_batch_size, pad_id, ctx.rank, ctx.world_size, config.data.max_seq_length
            )
        self.train_state = TrainState(self.target.aux_layer_ids, ctx.world_size)
        # What a checkpoint holds, each component Stateful (torchspec.trainer.loop.states).
        self.states: dict[str, Stateful] = {
            "model": ModelState(self.draft),
            "optimizer": OptimizerState(self.draft, self.optimizer),
            "lr_scheduler": LRScheduleState(self.scheduler),
            "data": self.loader,
            "train": self.train_state,
            "rng": RNGState(),
        }

    @property
    def step(self) -> int:
        """Optimizer steps taken (kept in ``train_state``, which checkpoints hold)."""
        return self.train_state.step

    @step.setter
    def step(self, value: int) -> None:
        self.train_state.step = value

    @property
    def best(self) -> dict[str, Any] | None:
        """The best evaluation so far (``train_state``)."""
        return self.train_state.best

    @best.setter
    def best(self, value: dict[str, Any] | None) -> None:
        self.train_state.best = value

    def close(self) -> None:
        """Stop what serves the target's states (an engine process, open dump files)."""
        if isinstance(self.target, ServedTarget):
            self.target.close()

    # --- resume, save -----------------------------------------------------------------------------

    def restore(self) -> None:
        """Resume everything from ``checkpoint.resume``, or take only the weights of ``continual_training``."""
        ckpt = self.config.checkpoint
        if self.resume_from is not None:
            check_same_draft(self.resume_from, self.draft_config, "checkpoint.resume")
            self.checkpointer.load(self.resume_from, self.states, source="checkpoint.resume")
            _log(
                self.ctx,
                resume_hint(cast(str, ckpt.resume), self.output_dir, self.resume_from, self.step, self.total_steps),
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
        return self.checkpointer.save(self.step, self.states, files)

    # --- the loop ---------------------------------------------------------------------------------

    def fit(self, step_callback: Callable[[int, dict], None] | None = None) -> TrainResult:
        t, ctx = self.config.metrics, self.ctx
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.config, self.output_dir / "training_config.yaml")
        resumed = self.resume_from is not None
        sink = (
            MetricsSink(
                self.output_dir, t.tensorboard, append=resumed, keep_through_step=self.step if resumed else None
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
        progress = ProgressBar(self.total_steps, enabled=t.progress_bar and ctx.is_main, initial=self.step)
        try:
            with progress.redirect_logging():
                history, eval_metrics, checkpoint = self._loop(progress, sink, step_callback)
        finally:
            progress.close()
            if sink is not None:
                sink.close()
        checkpoint = checkpoint or find_latest(self.output_dir)
        speculative = self.speculative_evaluation() if t.speculative_eval_prompts else None
        _log(ctx, f"checkpoint: {checkpoint}")
        _log(ctx, f"next: hatch run converter:export  (exports this run to {serving_folder(self.output_dir)})")
        return TrainResult(self.output_dir, checkpoint, self.step, history, eval_metrics, speculative)

    def _loop(
        self, progress: ProgressBar, sink: MetricsSink | None, step_callback: Callable[[int, dict], None] | None
    ) -> tuple[list[dict], dict | None, Path | None]:
        t, ctx = self.config.metrics, self.ctx
        history, eval_metrics, checkpoint = [], None, self.resume_from
        clock = LoopClock()
        while self.step < self.total_steps:
            with clock.measure("data"):
                batches = [batch.to(ctx.device) for batch in self.loader.next_batches()]
            record = self.train_step(batches)
            clock.add("target", record["target_seconds"])
            clock.add("draft", record["step_seconds"] - record["target_seconds"])
            self.step += 1
            record = {"step": self.step, "split": "train", "epoch": self.loader.epoch, **record}
            history.append(record)
            if sink is not None:
                sink.write(record)
            progress.update(self.step, f"loss {record['loss']:.3f} acc {record['acc']:.3f}")
            last = self.step == self.total_steps
            if self.step % t.log_interval == 0 or last:
                _log(ctx, format_metrics(record))

            new_best = False
            if self.eval_batches is not None and ((t.eval_interval and self.step % t.eval_interval == 0) or last):
                with clock.measure("eval"):
                    eval_metrics = {"step": self.step, "split": "eval", **self.evaluate()}
                if sink is not None:
                    sink.write(eval_metrics)
                _log(ctx, "eval " + format_metrics(eval_metrics))
                new_best = self.best is None or eval_metrics["acceptance_length"] > self.best["acceptance_length"]
                if new_best:
                    self.best = {
                        "step": self.step,
                        "acceptance_length": eval_metrics["acceptance_length"],
                        "checkpoint": checkpoint_name(self.step),
                    }
            # A new best eval is always saved, so that best.json points at a checkpoint.
            save_interval = self.config.checkpoint.save_interval
            if (save_interval and self.step % save_interval == 0) or last or new_best:
                with clock.measure("checkpoint"):
                    checkpoint = self.save()
                if new_best:
                    self.checkpointer.mark_best(
                        checkpoint, {k: v for k, v in cast(dict, self.best).items() if k != "checkpoint"}
                    )
            if step_callback is not None:
                step_callback(self.step, record)
        _log(ctx, f"where the time went: {clock.summary()}")
        return history, eval_metrics, checkpoint

    def speculative_evaluation(self) -> dict[str, Any] | None:
        """Real speculative decoding of held-out prompts with the trained draft (main rank; the
        full draft weights are gathered from every rank first)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from torchspec.draft_models import AutoEagle3DraftModel
        from torchspec.trainer.commands.evaluate import evaluate_prompts, prompts_from_tokenized

        ctx = self.ctx
        if not isinstance(self.target, TargetModel):
            _log(
                ctx,
                "speculative eval skipped: the target is not in this process (target.backend="
                f"{self.config.target.backend}); after export, `hatch run trainer:evaluate` or `engine:verify` "
                "measure it",
            )
            return None
        if self.eval_dataset is None or len(self.eval_dataset) == 0 or self.config.training.shard_target:
            _log(ctx, "speculative eval skipped: it needs a held-out split and an unsharded target")
            return None
        state = get_model_state_dict(self.draft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not ctx.is_main:
            return None
        draft = AutoEagle3DraftModel.from_config(self.draft_config)
        draft.load_state_dict(state)
        target = self.target.model
        draft = draft.to(device=ctx.device, dtype=next(target.parameters()).dtype)
        prompts = prompts_from_tokenized(self.eval_dataset, self.config.metrics.speculative_eval_prompts)
        result = evaluate_prompts(
            draft,
            target,
            prompts,
            eos_token_id=self.eos_token_id,
            draft_name=str(self.output_dir),
            target_name=self.config.model.target_model_path,
        )
        _log(
            ctx,
            "speculative decoding on held-out prompts (acceptance length counts the bonus token)\n" + result.table(),
        )
        record = {**asdict(result), "speedup": result.speedup, "step": self.step}
        (self.output_dir / "speculative_eval.json").write_text(json.dumps(record, indent=2) + "\n")
        return record

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

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, Any]:
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
    def evaluate(self) -> dict[str, Any]:
        """The training metrics over the whole held-out set (losses normalised by its total counts)."""
        t = self.config.ttt
        counts = TTTCounts.zeros(t.length, self.ctx.device)
        assert self.eval_batches is not None, "evaluate() needs held-out data"
        for batch in self.eval_batches:
            batch = batch.to(self.ctx.device)
            result = self._draft_pass(batch, *self._target_pass(batch))
            counts = counts.add(ttt_counts(result.correct, result.counted_mask, result.loss_sums))
        cast(Any, self.model).reshard()  # no backward follows, so FSDP would otherwise keep the root gathered
        totals = all_reduce_sum(counts.as_tensor().clone())
        return summarize(TTTCounts.from_tensor(totals), t.loss_decay)


# --- small helpers ------------------------------------------------------------------------------------


def _log(ctx: DistributedContext, message: str) -> None:
    if ctx.is_main:
        logger.info(message)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padding is masked out everywhere; any id will do


def _vocab_mapping(draft_config, continual_training: str | None, train_dataset):
    if not draft_config.is_vocab_pruned:
        return None
    if continual_training is not None:
        from torchspec.data import VocabMapping

        source = complete_checkpoint(continual_training, "checkpoint.continual_training") / VOCAB_MAPPING_FILE
        if source.is_file():
            return VocabMapping.load(source)  # the head's rows follow the mapping it was trained with
    return vocab_mapping_from_data(train_dataset, draft_config.vocab_size, draft_config.draft_vocab_size)
