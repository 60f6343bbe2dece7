"""``hatch run engine:verify``: serve your target with your exported draft in vLLM and compare what
the engine measures with what the in-process evaluator predicts, before you deploy.

Three greedy decodings of the same prompt token ids, ``--max-new-tokens`` tokens each (EOS ignored
on both sides, so both verify the same number of rounds):

1. vLLM serving the target alone,
2. vLLM serving the target with the draft (``speculative_config: eagle3``),
3. the in-process evaluator (``torchspec.trainer.commands.evaluate``) with the same draft.

The draft is good to deploy when vLLM loads it, (2) equals (1) token for token, and the
acceptance vLLM counts is what you expect. In float32 the evaluator's counts equal vLLM's exactly
(a test holds this); in bfloat16 they differ by rounding. Exit status: 0 served with identical
outputs, 1 served but the outputs differ, 2 not served (the engine's reason is printed).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from torchspec.draft_models.errors import cli_main

__all__ = ["VerifyReport", "main", "verify_draft"]


@dataclass
class VerifyReport:
    draft: str
    target: str
    num_prompts: int
    max_new_tokens: int
    num_draft_tokens: int
    engine_version: str
    engine_acceptance_length: float
    engine_position_acceptance: list[float]
    engine_num_drafts: int
    engine_num_accepted_tokens: int
    evaluator_acceptance_length: float
    evaluator_position_acceptance: list[float]
    evaluator_num_rounds: int
    evaluator_num_accepted_tokens: int
    engine_output_identical_with_and_without_draft: bool
    engine_output_identical_to_evaluator: bool

    @property
    def counts_agree(self) -> bool:
        return (self.engine_num_drafts, self.engine_num_accepted_tokens) == (
            self.evaluator_num_rounds,
            self.evaluator_num_accepted_tokens,
        )

    def table(self) -> str:
        def positions(shares):
            return "  ".join(f"{i + 1}:{a:.2f}" for i, a in enumerate(shares))

        def yes(flag):
            return "yes" if flag else "NO"

        rows = [
            ("", f"vLLM {self.engine_version}", "evaluator"),
            ("acceptance length", f"{self.engine_acceptance_length:.3f}", f"{self.evaluator_acceptance_length:.3f}"),
            (
                "position acceptance",
                positions(self.engine_position_acceptance),
                positions(self.evaluator_position_acceptance),
            ),
            ("rounds with a draft", str(self.engine_num_drafts), str(self.evaluator_num_rounds)),
            ("accepted draft tokens", str(self.engine_num_accepted_tokens), str(self.evaluator_num_accepted_tokens)),
        ]
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"draft   {self.draft}",
            f"target  {self.target}",
            f"{self.num_prompts} prompts x {self.max_new_tokens} tokens, K={self.num_draft_tokens}, greedy, "
            "EOS ignored (both sides verify the same rounds)",
            "",
        ]
        lines += ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
        lines += [
            "",
            f"vLLM output with draft == without draft   {yes(self.engine_output_identical_with_and_without_draft)}",
            f"vLLM output == evaluator's target output   {yes(self.engine_output_identical_to_evaluator)}",
            f"engine counts == evaluator counts          {yes(self.counts_agree)}",
        ]
        return "\n".join(lines)


def verify_draft(
    draft_path: str,
    target_path: str,
    data_path: str,
    num_prompts: int = 8,
    max_new_tokens: int = 48,
    num_draft_tokens: int = 4,
    prompt_key: str = "conversations",
    dtype: str = "float32",
    prompts: list[list[int]] | None = None,
) -> VerifyReport:
    from transformers import AutoTokenizer

    from torchspec.trainer.commands.evaluate import (
        evaluate_prompts,
        load_for_evaluation,
        prompts_from_conversations,
        require_model_folders,
    )
    from torchspec.trainer.engine.launch import run_vllm

    require_model_folders(draft_path, target_path)
    if prompts is None:
        tokenizer = AutoTokenizer.from_pretrained(target_path)
        prompts = prompts_from_conversations(data_path, tokenizer, prompt_key, num_prompts)
    plain = run_vllm(target_path, prompts, max_new_tokens, dtype=dtype)
    served = run_vllm(
        target_path, prompts, max_new_tokens, draft=draft_path, num_draft_tokens=num_draft_tokens, dtype=dtype
    )
    draft, target = load_for_evaluation(draft_path, target_path)
    evaluated = evaluate_prompts(
        draft,
        target,
        prompts,
        max_new_tokens,
        num_draft_tokens,
        eos_token_id=None,
        draft_name=draft_path,
        target_name=target_path,
    )
    return VerifyReport(
        draft=str(draft_path),
        target=str(target_path),
        num_prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        num_draft_tokens=num_draft_tokens,
        engine_version=served.engine_version,
        engine_acceptance_length=served.acceptance_length,
        engine_position_acceptance=served.position_acceptance,
        engine_num_drafts=served.num_drafts,
        engine_num_accepted_tokens=served.num_accepted_tokens,
        evaluator_acceptance_length=evaluated.acceptance_length,
        evaluator_position_acceptance=evaluated.position_acceptance,
        evaluator_num_rounds=evaluated.num_rounds,
        evaluator_num_accepted_tokens=evaluated.num_accepted_tokens,
        engine_output_identical_with_and_without_draft=served.outputs == plain.outputs,
        engine_output_identical_to_evaluator=served.outputs == evaluated.target_outputs,
    )


def build_parser() -> argparse.ArgumentParser:
    from torchspec.trainer.commands.evaluate import add_decoding_arguments

    parser = argparse.ArgumentParser(
        prog="torchspec-verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_decoding_arguments(parser, max_new_tokens=48)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="engine dtype (the evaluator runs float32; counts agree exactly only in float32)",
    )
    parser.add_argument("--output", help="JSON report (default: <draft>/engine_verify.json)")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    from torchspec.trainer.commands.evaluate import decoding_inputs, write_report

    args = build_parser().parse_args(argv)
    report = verify_draft(*decoding_inputs(args), args.dtype)
    record = {**asdict(report), "counts_agree": report.counts_agree}
    write_report(report.table(), record, args.output or Path(args.draft) / "engine_verify.json")
    return 0 if report.engine_output_identical_with_and_without_draft else 1


if __name__ == "__main__":
    sys.exit(main())
