"""Real speculative decoding with a draft and its target in memory: the evaluator behind
``trainer:evaluate``, and the held-out evaluation at the end of a training run."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EvaluationResult", "evaluate_prompts", "evaluate_trained_draft", "prompts_from_tokenized"]


@dataclass
class EvaluationResult:
    draft: str
    target: str
    num_prompts: int
    num_draft_tokens: int
    acceptance_length: float
    position_acceptance: list[float]
    generated_tokens: int
    speculative_seconds: float
    target_only_seconds: float
    identical_to_target: bool
    per_prompt_acceptance: list[float] = field(default_factory=list)
    num_rounds: int = 0  # target verification rounds that carried a draft (vLLM: spec_decode_num_drafts)
    num_accepted_tokens: int = 0  # accepted draft tokens, bonus tokens excluded
    target_outputs: list[list[int]] = field(default_factory=list, repr=False)  # the target's own greedy tokens

    @property
    def speedup(self) -> float:
        return self.target_only_seconds / max(self.speculative_seconds, 1e-9)

    def table(self) -> str:
        lines = [
            f"draft                 {self.draft}",
            f"target                {self.target}",
            f"prompts               {self.num_prompts} ({self.generated_tokens} generated tokens)",
            f"acceptance length     {self.acceptance_length:.3f} tokens/round (accepted drafts + 1 bonus, "
            f"K={self.num_draft_tokens})",
            "position acceptance   " + "  ".join(f"{i + 1}:{a:.2f}" for i, a in enumerate(self.position_acceptance)),
            f"wall time             speculative {self.speculative_seconds:.2f}s vs target alone "
            f"{self.target_only_seconds:.2f}s (x{self.speedup:.2f})",
            "output                "
            + (
                "identical to target greedy decoding"
                if self.identical_to_target
                else "DIFFERS from target greedy decoding"
            ),
        ]
        return "\n".join(lines)


def evaluate_prompts(
    draft,
    target,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    num_draft_tokens: int = 4,
    eos_token_id: int | None = None,
    draft_name: str = "draft",
    target_name: str = "target",
) -> EvaluationResult:
    """Speculative vs plain greedy decoding of ``prompts`` with models already in memory."""
    from torchspec.draft_models import SpeculativeGenerator, target_greedy_generate

    generator = SpeculativeGenerator(draft, target, num_draft_tokens=num_draft_tokens)
    accepted, produced, identical, per_prompt, target_outputs = [], 0, True, [], []
    spec_seconds = plain_seconds = 0.0

    from tqdm.auto import tqdm

    for prompt in tqdm(
        prompts, desc="speculative decoding", unit="prompt", leave=False, disable=not sys.stderr.isatty()
    ):
        expected, seconds = target_greedy_generate(target, prompt, max_new_tokens, eos_token_id)
        plain_seconds += seconds
        target_outputs.append(expected)
        result = generator.generate(prompt, max_new_tokens, eos_token_id)
        spec_seconds += result.wall_time_s
        identical &= result.tokens == expected
        accepted += result.accepted_per_round
        per_prompt.append(result.acceptance_length)
        produced += len(result.tokens)
    rounds = max(len(accepted), 1)
    return EvaluationResult(
        draft=draft_name,
        target=target_name,
        num_prompts=len(prompts),
        num_draft_tokens=num_draft_tokens,
        acceptance_length=sum(a + 1 for a in accepted) / rounds,
        position_acceptance=[sum(a >= i for a in accepted) / rounds for i in range(1, num_draft_tokens + 1)],
        generated_tokens=produced,
        speculative_seconds=spec_seconds,
        target_only_seconds=plain_seconds,
        identical_to_target=identical,
        per_prompt_acceptance=per_prompt,
        num_rounds=len(accepted),
        num_accepted_tokens=sum(accepted),
        target_outputs=target_outputs,
    )


def prompts_from_tokenized(dataset, limit: int) -> list[list[int]]:
    """Prompts from tokenized samples: each sample up to its first supervised token, i.e. the
    context the target saw before it started to answer (works with any chat template)."""
    prompts = []
    for sample in dataset:
        mask = list(sample["loss_mask"])
        if 1 in mask and mask.index(1) > 0:
            prompts.append(list(sample["input_ids"][: mask.index(1)]))
        if len(prompts) >= limit:
            break
    return prompts


def evaluate_trained_draft(trainer: Any) -> dict[str, Any] | None:
    """Speculative decoding of a run's held-out prompts with the draft it trained (main rank; the
    full draft weights are gathered from every rank first); written to ``speculative_eval.json``."""
    import logging

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from torchspec.draft_models import AutoEagle3DraftModel
    from torchspec.trainer.targets.in_process import TargetModel

    ctx, config = trainer.ctx, trainer.config
    log = logging.getLogger("torchspec.trainer").info if ctx.is_main else (lambda message: None)
    if not isinstance(trainer.target, TargetModel):
        log(
            "speculative eval skipped: the target is not in this process (target.backend="
            f"{config.target.backend}); after export, `hatch run trainer:evaluate` or `engine:verify` measure it"
        )
        return None
    if trainer.eval_dataset is None or len(trainer.eval_dataset) == 0 or config.training.shard_target:
        log("speculative eval skipped: it needs a held-out split and an unsharded target")
        return None
    state = get_model_state_dict(trainer.draft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    draft = AutoEagle3DraftModel.from_config(trainer.draft_config)
    draft.load_state_dict(state)
    target = trainer.target.model
    draft = draft.to(device=ctx.device, dtype=next(target.parameters()).dtype)
    prompts = prompts_from_tokenized(trainer.eval_dataset, config.metrics.speculative_eval_prompts)
    result = evaluate_prompts(
        draft,
        target,
        prompts,
        eos_token_id=trainer.eos_token_id,
        draft_name=str(trainer.output_dir),
        target_name=config.model.target_model_path,
    )
    log("speculative decoding on held-out prompts (acceptance length counts the bonus token)\n" + result.table())
    record = {**asdict(result), "speedup": result.speedup, "step": trainer.train_state.step}
    (Path(trainer.output_dir) / "speculative_eval.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
