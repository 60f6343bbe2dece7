"""Real speculative decoding with a draft and its target in memory: the evaluator behind
``trainer:evaluate``, and the held-out evaluation at the end of a training run."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EvaluationResult",
    "evaluate_prompts",
    "evaluate_trained_draft",
    "gather_draft",
    "prompts_from_tokenized",
]


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
    per_prompt_rounds: list[int] = field(default_factory=list)  # target verification rounds of each prompt
    num_rounds: int = 0  # target verification rounds that carried a draft (vLLM: spec_decode_num_drafts)
    num_accepted_tokens: int = 0  # accepted draft tokens, bonus tokens excluded
    target_outputs: list[list[int]] = field(default_factory=list, repr=False)  # the target's own greedy tokens
    prompt_source: str = ""  # where the prompts come from, e.g. "the eval split of outputs/default_llama (...)"

    @property
    def speedup(self) -> float:
        return self.target_only_seconds / max(self.speculative_seconds, 1e-9)

    def table(self) -> str:
        lines = [
            f"draft                 {self.draft}",
            f"target                {self.target}",
            f"prompts               {self.num_prompts}"
            + (f" from {self.prompt_source}" if self.prompt_source else "")
            + f" ({self.generated_tokens} generated tokens)",
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
    per_prompt_rounds: list[int] = []
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
        per_prompt_rounds.append(result.rounds)
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
        per_prompt_rounds=per_prompt_rounds,
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


def gather_draft(draft, draft_config, is_main: bool, like, into=None):
    """The full weights of ``draft`` (FSDP2-sharded or not) in a plain draft model on the main rank, on
    the device and dtype of the module ``like`` (the target; None: on the CPU, in the weights' own
    dtype); None on the other ranks. ``into``: a copy made by an earlier call, refilled. Every rank
    must call it (the weights are gathered from all)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from torchspec.draft_models import AutoEagle3DraftModel

    state = get_model_state_dict(draft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    if into is None:
        into = AutoEagle3DraftModel.from_config(draft_config)
        if like is not None:
            parameter = next(like.parameters())
            into = into.to(device=parameter.device, dtype=parameter.dtype)
    into.load_state_dict(state)
    return into


def evaluate_trained_draft(trainer: Any) -> dict[str, Any] | None:
    """Speculative decoding of a run's held-out prompts with the draft it trained (main rank; the
    full draft weights are gathered from every rank first); written to ``speculative_eval.json``."""
    import logging

    from torchspec.trainer.config import real_acceptance_off

    ctx, config = trainer.ctx, trainer.config
    log = logging.getLogger("torchspec.trainer").info if ctx.is_main else (lambda message: None)
    off = real_acceptance_off(config, "speculative_eval_prompts")
    if off is not None:
        log(f"speculative eval skipped: {off}")
        return None
    target = trainer.target.model
    draft = gather_draft(trainer.draft, trainer.draft_config, ctx.is_main, target)
    if draft is None:
        return None
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
