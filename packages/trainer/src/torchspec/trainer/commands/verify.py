"""``hatch run engine:verify``: serve your target with your exported draft in vLLM and compare what
the engine measures with what the in-process evaluator predicts, before you deploy.

Three greedy decodings of the same prompt token ids, ``--max-new-tokens`` tokens each (EOS ignored
on both sides, so both verify the same number of rounds):

1. vLLM serving the target alone,
2. vLLM serving the target with the draft (``speculative_config: eagle3``),
3. the in-process evaluator (``torchspec.trainer.commands.evaluate``) with the same draft.

The draft is good to deploy when vLLM loads it, (2) equals (1) token for token, and vLLM counts
what the evaluator counts. Identical output alone proves little: greedy decoding is lossless, so
(2) equals (1) however wrongly the engine reads the draft (other aux layers, norm flags or vocabulary
mapping); the counts are what catch that. They agree when both sides count the same rounds with a
draft and the same accepted draft tokens, and per draft position at most one count apart (float32
rounding may flip a near-tie late in a chain, seen once in ~150 rounds, totals still equal).

With ``--server URL --plain-server URL`` the two vLLM runs are servers already running (``vllm
serve``, with whatever parallelism a large target needs, on any node; ``--print-serve-commands``
prints their command lines): nothing of the target is loaded here but its tokenizer, and the
evaluator runs beside them only when the target fits this process (``--no-evaluator`` otherwise).
The servers' counters come from their ``/metrics``, so they must serve nobody else meanwhile
(verify refuses counts that include other requests).

Exit status: 0 served, identical outputs and counts agree; 1 served but the outputs differ or the
counts disagree (each difference printed); 2 not served (the engine's reason is printed). The
evaluator runs float32, so the verdict needs the engine in float32 too (``--dtype``, the default):
in bfloat16 or float16 the counts differ by rounding and verify exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path

from torchspec.draft_models.errors import UserInputError, cli_main

__all__ = [
    "VerifyReport",
    "count_disagreements",
    "first_differences",
    "json_object",
    "main",
    "print_serve_commands",
    "verdict",
    "verify_draft",
]


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
    # Rounds in which draft position i was accepted, on each side.
    engine_accepted_per_position: list[int] = field(default_factory=list)
    evaluator_accepted_per_position: list[int] = field(default_factory=list)
    # [prompt, token]: where vLLM's output with the draft first departs from its output without.
    engine_output_differences: list[list[int]] = field(default_factory=list)
    # False with --no-evaluator (a target too large for this process): nothing is compared to it.
    evaluator_ran: bool = True

    @property
    def counts_agree(self) -> bool:
        return not count_disagreements(self)

    def table(self) -> str:
        def positions(shares):
            return "  ".join(f"{i + 1}:{a:.2f}" for i, a in enumerate(shares))

        def yes(flag):
            return "yes" if flag else "NO"

        if not self.evaluator_ran:
            self.evaluator_position_acceptance = []
        rows = [
            ("", f"vLLM {self.engine_version}", "evaluator" if self.evaluator_ran else "evaluator (not run)"),
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
        ]
        if self.evaluator_ran:
            lines += [
                f"vLLM output == evaluator's target output   {yes(self.engine_output_identical_to_evaluator)}",
                f"engine counts == evaluator counts          {yes(self.counts_agree)}",
            ]
        else:
            lines.append("engine counts == evaluator counts          not compared (--no-evaluator)")
        return "\n".join(lines)


def first_differences(outputs: list[list[int]], reference: list[list[int]]) -> list[list[int]]:
    """``[prompt, token]`` of the first token where each prompt's output departs from the reference's."""
    differences = []
    missing: list[int] = []  # a prompt one side lacks
    for prompt, (tokens, expected) in enumerate(zip_longest(outputs, reference, fillvalue=missing)):
        if tokens != expected:
            same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
            differences.append([prompt, min(len(tokens), len(expected)) if same is None else same])
    return differences


def count_disagreements(report: VerifyReport) -> list[str]:
    """Where vLLM's counts and the evaluator's differ beyond float32 rounding (empty: they agree).
    Totals must be equal; per draft position a count may be one off (a near-tie flipped late in a chain)."""
    found: list[str] = []
    if not report.evaluator_ran:
        return found
    for what, engine, evaluator in (
        ("rounds with a draft", report.engine_num_drafts, report.evaluator_num_rounds),
        ("accepted draft tokens", report.engine_num_accepted_tokens, report.evaluator_num_accepted_tokens),
    ):
        if engine != evaluator:
            found.append(f"{what}: vLLM {engine}, evaluator {evaluator}")
    pairs = zip_longest(report.engine_accepted_per_position, report.evaluator_accepted_per_position)
    for position, (engine, evaluator) in enumerate(pairs, start=1):
        if engine is None or evaluator is None or abs(engine - evaluator) > 1:
            found.append(f"draft position {position}: vLLM accepted {engine}, evaluator {evaluator}")
    return found


def verdict(report: VerifyReport) -> list[str]:
    """Why the draft is not shown to be served as trained (empty: vLLM's output is the same with and
    without it, and its counts agree with the evaluator's). Decides the exit status of ``verify``."""
    problems = []
    if not report.engine_output_identical_with_and_without_draft:
        where = ", ".join(f"prompt {p} from token {t}" for p, t in report.engine_output_differences)
        problems.append(f"vLLM's output with the draft differs from its output without it: {where or 'see the report'}")
    return problems + count_disagreements(report)


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
    engine_args: dict | None = None,
    engine_python: str | None = None,
    evaluator: bool = True,
    server: str | None = None,
    plain_server: str | None = None,
) -> VerifyReport:
    """vLLM serving ``target_path`` with and without the draft, and (``evaluator``) the in-process
    evaluator on the same prompts. ``engine_args`` are vLLM's (``tensor_parallel_size``, ...) and
    ``engine_python`` the interpreter of its environment, so a target larger than this process can
    be verified by the engine alone (``evaluator=False``). ``server`` and ``plain_server``: running vLLM
    servers of the target with and without the draft, used instead of starting engines here."""
    from transformers import AutoTokenizer

    from torchspec.trainer.commands.evaluate import (
        EvaluationResult,
        evaluate_prompts,
        load_for_evaluation,
        prompts_from_conversations,
        require_model_folders,
    )
    from torchspec.trainer.engine.launch import run_vllm

    if (server is None) != (plain_server is None):
        raise UserInputError(
            "verify against running servers needs both --server (the target with the draft) and --plain-server "
            "(the target alone); --print-serve-commands prints how to start them"
        )
    require_model_folders(draft_path, target_path)
    if prompts is None:
        tokenizer = AutoTokenizer.from_pretrained(target_path)
        prompts = prompts_from_conversations(data_path, tokenizer, prompt_key, num_prompts)
    if server is not None and plain_server is not None:
        from torchspec.trainer.engine.served import run_served

        plain = run_served(plain_server, prompts, max_new_tokens, num_draft_tokens=0)
        served = run_served(server, prompts, max_new_tokens, num_draft_tokens=num_draft_tokens)
    else:
        plain = run_vllm(
            target_path, prompts, max_new_tokens, dtype=dtype, engine_args=engine_args or {}, python=engine_python
        )
        served = run_vllm(
            target_path,
            prompts,
            max_new_tokens,
            draft=draft_path,
            num_draft_tokens=num_draft_tokens,
            dtype=dtype,
            engine_args=engine_args or {},
            python=engine_python,
        )
    if evaluator:
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
    else:
        evaluated = EvaluationResult(
            draft_path, target_path, len(prompts), num_draft_tokens, float("nan"), [], 0, 0.0, 0.0, False
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
        engine_accepted_per_position=list(served.accepted_per_position),
        # The evaluator reports shares of its rounds; the integers they were made of.
        evaluator_accepted_per_position=[round(s * evaluated.num_rounds) for s in evaluated.position_acceptance],
        engine_output_differences=first_differences(served.outputs, plain.outputs),
        evaluator_ran=evaluator,
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
        help="engine dtype (the evaluator runs float32: the counts, and so the verdict, agree only in float32)",
    )
    parser.add_argument(
        "--engine-args",
        type=json_object,
        default={},
        metavar="JSON",
        help="vLLM engine arguments, e.g. '{\"tensor_parallel_size\": 8}' (a target larger than one GPU)",
    )
    parser.add_argument("--engine-python", help="the python of the environment vLLM is installed in")
    parser.add_argument(
        "--no-evaluator",
        action="store_true",
        help="verify with the engine alone (a target this process cannot load): output and acceptance, "
        "no count comparison",
    )
    parser.add_argument(
        "--server", metavar="URL", help="a running vLLM server of the target with this draft (needs --plain-server)"
    )
    parser.add_argument("--plain-server", metavar="URL", help="a running vLLM server of the target without a draft")
    parser.add_argument(
        "--print-serve-commands",
        action="store_true",
        help="print the two `vllm serve` commands --server and --plain-server expect (ports 8000 and 8001), then exit",
    )
    parser.add_argument("--output", help="JSON report (default: <draft>/engine_verify.json)")
    return parser


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object of engine arguments")
    return value


def print_serve_commands(args: argparse.Namespace) -> None:
    """The `vllm serve` commands of the target with the draft (port 8000) and without it (port 8001)."""
    import torch

    from torchspec.trainer.commands.evaluate import decoding_inputs
    from torchspec.trainer.engine.fleet import format_command
    from torchspec.trainer.engine.served import generation_serve_command

    draft, target, *_ = decoding_inputs(args)
    options = {
        "dtype": args.dtype,
        "engine_args": args.engine_args,
        "on_cpu": not torch.cuda.is_available(),
        "python": args.engine_python,
    }
    with_draft = generation_serve_command(target, draft, num_draft_tokens=args.num_draft_tokens, port=8000, **options)
    print(format_command(with_draft))
    print(format_command(generation_serve_command(target, port=8001, **options)))


@cli_main
def main(argv: list[str] | None = None) -> int:
    from torchspec.trainer.commands.evaluate import decoding_inputs, write_report

    args = build_parser().parse_args(argv)
    if args.print_serve_commands:
        print_serve_commands(args)
        return 0
    report = verify_draft(
        *decoding_inputs(args),
        args.dtype,
        engine_args=args.engine_args,
        engine_python=args.engine_python,
        evaluator=not args.no_evaluator,
        server=args.server,
        plain_server=args.plain_server,
    )
    problems = verdict(report)
    record = {**asdict(report), "counts_agree": report.counts_agree, "verdict": problems}
    write_report(report.table(), record, args.output or Path(args.draft) / "engine_verify.json")
    for problem in problems:
        print(f"FAILED: {problem}")
    if problems and args.dtype != "float32":
        print(f"(--dtype {args.dtype}: the counts differ by rounding; run with float32 for the verdict)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
