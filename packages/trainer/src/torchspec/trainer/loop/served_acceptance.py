"""Real acceptance during training judged by vLLM: the target served with the draft as trained so
far, for runs whose target only an engine can run (``target.backend`` vllm or fleet), or whenever a
judge is configured (``metrics.judge_url``, ``metrics.start_judge``).

Each measurement gathers the draft's full weights from every rank (FSDP2), writes them as a serving
folder (``<output_dir>/judge/current``, published whole), has the judge server load them into its
running draft (``engine.draft_reload``: no restart, so a 1T target is not loaded again), and sends the
held-out prompts at once (greedy, :data:`~torchspec.trainer.loop.acceptance.NUM_DRAFT_TOKENS` draft
tokens, ``metrics.real_acceptance_max_new_tokens`` tokens each, EOS ignored). Acceptance is the
server's own count; the interval is a percentile bootstrap over prompts of the counts it reports per
request. The main rank talks to the judge and broadcasts the record, so every rank takes the same
decisions.

A judge the trainer started (``metrics.start_judge``) starts at the first measurement from
``<output_dir>/judge/initial`` (the draft then) and is started again when it exits. A judge you
started (``metrics.judge_url``) must serve the target with a draft of this run's shapes: the run logs
the command at its start, with ``judge/initial`` as its draft, and waits for the judge at its first
measurement (``target.engine_timeout_s``). A measurement that fails
before any succeeded stops the run (the judge is set up wrong); later ones are skipped with a warning
and training goes on. The judge itself (``engine.judge.JudgeServer``) comes from
``targets.factory.build_judge``: the loop imports no engine module.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchspec.draft_models.atomic import make_staging_dir, publish_dir
from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.distributed.process_group import DistributedContext
from torchspec.trainer.loop.acceptance_stats import ratio_interval
from torchspec.trainer.loop.speculative_eval import gather_draft
from torchspec.trainer.targets.factory import build_judge
from torchspec.trainer.targets.resolve import resolve_dtype

__all__ = ["ServedRealAcceptance"]

logger = logging.getLogger("torchspec.trainer")


class ServedRealAcceptance:
    """Speculative decoding of fixed held-out prompts by a vLLM judge server, with the draft as
    trained so far loaded into it before each measurement (``num_draft_tokens`` per round)."""

    def __init__(
        self,
        draft,
        target,
        prompts: list[list[int]],
        config: TrainConfig,
        ctx: DistributedContext,
        num_draft_tokens: int,
    ):
        self.draft, self.draft_config, self.target, self.prompts, self.ctx = draft, draft.config, target, prompts, ctx
        self.num_draft_tokens, self.max_new_tokens = num_draft_tokens, config.metrics.real_acceptance_max_new_tokens
        self.folder = Path(config.training.output_dir) / "judge"
        on_cpu = not torch.cuda.is_available()
        self.dtype = resolve_dtype(config.model.dtype, torch.device("cpu" if on_cpu else "cuda"))
        longest = max(len(p) for p in prompts) + self.max_new_tokens + num_draft_tokens + 1
        self.judge = build_judge(config, self.folder / "initial", max(256, -(-longest // 64) * 64), num_draft_tokens)
        self.measured = 0
        # The main rank's plain copy of the draft (every rank takes part in gathering it), refilled at
        # every measurement.
        self.copy = gather_draft(draft, self.draft_config, ctx.is_main, None)
        if ctx.is_main:
            self._write(self.folder / "initial")
            if not config.metrics.start_judge:
                logger.info(
                    f"real acceptance is judged by the vLLM server {self.judge.url} (metrics.judge_url); it must serve "
                    f"the target with a draft of this run's shapes and the reload extension, e.g.: "
                    f"{self.judge.command_line}"
                )

    def _write(self, final: Path) -> None:
        """The draft copy as a serving folder at ``final``, published whole."""
        assert self.copy is not None
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging_dir(final)
        own_embedding = self.draft_config.hidden_size != self.draft_config.target_hidden_size  # as export decides
        self.copy.save_pretrained(
            staging,
            include_embeddings=own_embedding,
            dtype=self.dtype,
            aux_layer_ids=list(self.target.aux_layer_ids),
            num_target_layers=self.target.num_layers,
        )
        publish_dir(staging, final)

    def measure(self) -> dict[str, Any]:
        """The real acceptance now; every rank calls it and gets the main rank's result (an empty
        record when a measurement after the first failed)."""
        started = time.perf_counter()
        self.copy = gather_draft(self.draft, self.draft_config, self.ctx.is_main, None, self.copy)
        record: dict[str, Any] | None = None
        failure: str | None = None
        if self.ctx.is_main:
            self._write(self.folder / "current")
            run, failure = self.judge.judge(
                self.folder / "current", self.prompts, self.max_new_tokens, self.num_draft_tokens
            )
            if run is not None:
                record = self._record(run, started)
        if dist.is_initialized():
            box: list[Any] = [record, failure]
            dist.broadcast_object_list(box, src=0)
            record, failure = box
        if failure is not None:
            if self.measured == 0:
                raise ConfigError(f"real acceptance could not be measured by the vLLM judge: {failure}")
            if self.ctx.is_main:
                logger.warning(f"real acceptance skipped at this step: {failure}")
            return {}
        self.measured += 1
        return dict(record or {})

    def _record(self, run, started: float) -> dict[str, Any]:
        """What is logged of a judged run (an ``engine.launch.EngineRun`` with per-prompt counts)."""
        tokens = [rounds + accepted for rounds, accepted in zip(run.prompt_rounds, run.prompt_accepted)]
        interval = ratio_interval(tokens, run.prompt_rounds)
        return {
            "real_acceptance_length": run.acceptance_length,
            "real_acceptance_low": interval.low,
            "real_acceptance_high": interval.high,
            "real_position_acceptance": run.position_acceptance,
            "num_prompts": len(self.prompts),
            "num_draft_tokens": self.num_draft_tokens,
            "max_new_tokens": self.max_new_tokens,
            "generated_tokens": sum(len(output) for output in run.outputs),
            "judge": f"vllm {run.engine_version} at {self.judge.url}",
            "seconds": time.perf_counter() - started,
        }

    def close(self) -> None:
        self.judge.close()
