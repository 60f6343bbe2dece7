"""``hatch run trainer:evaluate``: real speculative decoding of an exported draft against its target.

For each conversation, the prompt is everything up to the last assistant turn rendered with the
tokenizer's chat template (generation prompt included); the target then generates greedily twice,
once alone and once with the draft proposing chains of ``--num-draft-tokens``. The speculative
output must equal the plain one token for token (it is checked, and reported), and the table shows

* acceptance length: mean tokens per target forward pass = accepted draft tokens + 1 bonus token
  (SGLang's and vLLM's convention),
* per-position acceptance: share of rounds in which draft position i was accepted,
* wall time of both decodings and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["EvaluationResult", "evaluate_draft", "main"]


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

    @property
    def speedup(self) -> float:
        return self.target_only_seconds / max(self.speculative_seconds, 1e-9)

    def table(self) -> str:
        lines = [
            f"draft                 {self.draft}",
            f"target                {self.target}",
            f"prompts               {self.num_prompts} ({self.generated_tokens} generated tokens)",
            f"acceptance length     {self.acceptance_length:.3f} tokens/round (accepted drafts + 1 bonus, K={self.num_draft_tokens})",
            "position acceptance   " + "  ".join(f"{i + 1}:{a:.2f}" for i, a in enumerate(self.position_acceptance)),
            f"wall time             speculative {self.speculative_seconds:.2f}s vs target alone {self.target_only_seconds:.2f}s "
            f"(x{self.speedup:.2f})",
            f"output                {'identical to target greedy decoding' if self.identical_to_target else 'DIFFERS from target greedy decoding'}",
        ]
        return "\n".join(lines)


def _prompts(data_path: str, tokenizer, prompt_key: str, limit: int) -> list[list[int]]:
    from torchspec.data import load_conversation_dataset

    dataset = load_conversation_dataset(data_path, prompt_key)
    prompts = []
    for record in dataset:
        messages = [{"role": m["role"], "content": m["content"] or ""} for m in record["conversations"]]
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        context = messages[:last_assistant]
        if not context or context[-1]["role"] == "assistant":
            continue
        ids = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        prompts.append(list(ids))
        if len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{data_path}: no conversation with a user turn before an assistant turn to use as a prompt")
    return prompts


def evaluate_draft(
    draft_path: str,
    target_path: str,
    data_path: str,
    num_prompts: int = 8,
    max_new_tokens: int = 64,
    num_draft_tokens: int = 4,
    prompt_key: str = "conversations",
) -> EvaluationResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchspec.draft_models import AutoEagle3DraftModel, SpeculativeGenerator, target_greedy_generate

    for label, path in (("--draft", draft_path), ("--target", target_path)):
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{label} {path}: no config.json there")
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    draft = AutoEagle3DraftModel.from_pretrained(draft_path, dtype=torch.float32)
    with torch.no_grad():  # serving engines take the embedding table from the target too
        draft.load_embedding(target.get_input_embeddings().weight)
    generator = SpeculativeGenerator(draft, target, num_draft_tokens=num_draft_tokens)
    eos = tokenizer.eos_token_id
    accepted, produced, identical, per_prompt = [], 0, True, []
    spec_seconds = plain_seconds = 0.0
    prompts = _prompts(data_path, tokenizer, prompt_key, num_prompts)
    for prompt in prompts:
        expected, seconds = target_greedy_generate(target, prompt, max_new_tokens, eos)
        plain_seconds += seconds
        result = generator.generate(prompt, max_new_tokens, eos)
        spec_seconds += result.wall_time_s
        identical &= result.tokens == expected
        accepted += result.accepted_per_round
        per_prompt.append(result.acceptance_length)
        produced += len(result.tokens)
    rounds = max(len(accepted), 1)
    return EvaluationResult(
        draft=str(draft_path), target=str(target_path), num_prompts=len(prompts), num_draft_tokens=num_draft_tokens,
        acceptance_length=sum(a + 1 for a in accepted) / rounds,
        position_acceptance=[sum(a >= i for a in accepted) / rounds for i in range(1, num_draft_tokens + 1)],
        generated_tokens=produced, speculative_seconds=spec_seconds, target_only_seconds=plain_seconds,
        identical_to_target=identical, per_prompt_acceptance=per_prompt,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchspec-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", help="exported draft folder (default: the default training run's export)")
    parser.add_argument("--target", help="Hugging Face target folder (default: the embedded tiny target)")
    parser.add_argument("--data", help="conversations (.jsonl/.json/.parquet; default: the bundled samples)")
    parser.add_argument("--prompt-key", default="conversations")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--output", help="JSON result file (default: <draft>/speculative_eval.json)")
    return parser


def _defaults(args) -> None:
    if args.data is None:
        from torchspec.data import sample_conversations_path

        args.data = str(sample_conversations_path())
    if args.target is None:
        from torchspec.trainer.default_assets import ensure_default_target

        args.target = str(ensure_default_target())
    if args.draft is None:
        args.draft = "outputs/default_llama_hf"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _defaults(args)
        result = evaluate_draft(args.draft, args.target, args.data, args.num_prompts, args.max_new_tokens,
                                args.num_draft_tokens, args.prompt_key)
    except ValueError as err:  # user mistakes: torchspec errors are ValueErrors with one-line messages
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.table())
    output = Path(args.output or Path(args.draft) / "speculative_eval.json")
    output.write_text(json.dumps({**asdict(result), "speedup": result.speedup}, indent=2) + "\n")
    print(f"wrote {output}")
    return 0 if result.identical_to_target else 1


if __name__ == "__main__":
    sys.exit(main())
