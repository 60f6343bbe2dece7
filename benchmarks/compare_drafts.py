"""Which differences between drafts are real: EAGLE-3 against EAGLE-3.1, and training on the target's
regenerated answers against the original ones, on the embedded default, with intervals.

    .venvs/engine/bin/python benchmarks/compare_drafts.py --output /tmp/compare   # ~15 min on 2 cores

Every draft is a full default Llama run (``configs/default_llama.yaml``: the built-in tiny target, the
bundled conversations, 4 epochs, seed 0) that differs from the baseline (``eagle3``) in one thing:

* ``eagle3_1``: ``model.eagle3_1=true`` (fc_norm + norm_output);
* ``regenerated``: trained on the answers the target itself gives (``trainer regenerate``, greedy,
  256 new tokens; the same conversations held out);
* ``eagle3_seed1``: the baseline with ``training.seed=1``: how far two trainings of the same recipe
  fall apart, the yardstick for the others.

All are measured by ``trainer bench``'s evaluator judge on the same prompts, the 48 the baseline run
held out (never trained on by any of them), under one protocol (printed). Reported: acceptance length
with its 95% bootstrap interval over prompts, and each draft's difference to the baseline with a
*paired* interval (the prompts resampled once for both drafts: a hard prompt is hard for both, so
what is left is the drafts' difference). A difference is called real only where its paired interval
excludes 0 and it is larger than the seed-to-seed difference: the bootstrap over prompts knows
nothing of training noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from torchspec.converter import export_checkpoint
from torchspec.trainer.commands.bench import Protocol, held_out_prompt_set, run_bench
from torchspec.trainer.config import load_config
from torchspec.trainer.loop.acceptance_stats import paired_difference_interval
from torchspec.trainer.loop.run import train
from torchspec.trainer.targets.resolve import resolve_target_path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "eagle3"


def variants(regenerated: Path) -> dict[str, list[str]]:
    return {
        BASELINE: [],
        "eagle3_1": ["model.eagle3_1=true"],
        "regenerated": [f"data.train_path={regenerated}"],
        "eagle3_seed1": ["training.seed=1"],
    }


def regenerate(output: Path) -> None:
    if output.is_file():
        return
    command = [sys.executable, "-m", "torchspec.trainer.cli", "regenerate", "--output", str(output)]
    subprocess.run([*command, "--max-new-tokens", "256"], check=True)


def train_and_export(name: str, overrides: list[str], root: Path) -> Path:
    run_dir = root / name
    serving = root / f"{name}_hf"
    if not (serving / "config.json").is_file():
        config = load_config(
            REPO / "configs" / "default_llama.yaml",
            [f"training.output_dir={run_dir}", "checkpoint.resume=null", "metrics.progress_bar=false", *overrides],
        )
        train(config)
        export_checkpoint(run_dir, serving, force=True)
    return serving


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/compare_drafts", help="runs, exports and compare.json go here")
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    regenerated = root / "regenerated.jsonl"
    regenerate(regenerated)
    drafts = {name: train_and_export(name, overrides, root) for name, overrides in variants(regenerated).items()}

    target = str(resolve_target_path("builtin:tiny-qwen3"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = held_out_prompt_set(root / BASELINE, limit=1000)
    protocol = Protocol(
        judge="evaluator", num_draft_tokens=args.num_draft_tokens, max_new_tokens=args.max_new_tokens, num_prompts=1000
    )
    results, _ = run_bench(
        [(str(path), None) for path in drafts.values()],
        target,
        [prompts],
        protocol,
        tokenizer,
        progress=lambda line: print(line, flush=True),
    )
    rounds = {name: [o.accepted for o in result.sets[0].outcomes] for name, result in zip(drafts, results)}
    summaries = {name: result.sets[0].summary for name, result in zip(drafts, results)}
    seed_gap = abs(summaries["eagle3_seed1"].acceptance_length - summaries[BASELINE].acceptance_length)

    print(f"protocol: {protocol.describe(len(prompts.prompts))}")
    print(f"prompts:  {len(prompts.prompts)} from {prompts.path}\n")
    print("| draft | acceptance length [95% interval] | difference to eagle3 [95% paired interval] | real? |")
    print("|---|---|---|---|")
    record = {"protocol": protocol.describe(len(prompts.prompts)), "prompts": prompts.path, "drafts": {}}
    for name, summary in summaries.items():
        interval = summary.interval
        row = f"| {name} | {summary.acceptance_length:.3f} [{interval.low:.3f}, {interval.high:.3f}] |"
        entry = {"acceptance_length": summary.acceptance_length, "interval": [interval.low, interval.high]}
        if name == BASELINE:
            print(row + " | |")
        else:
            diff = summary.acceptance_length - summaries[BASELINE].acceptance_length
            paired = paired_difference_interval(rounds[BASELINE], rounds[name])
            excludes_zero = paired.low > 0 or paired.high < 0
            verdict = (
                "seed-to-seed spread"
                if name == "eagle3_seed1"
                else ("yes" if excludes_zero and abs(diff) > seed_gap else "no")
            )
            print(f"{row} {diff:+.3f} [{paired.low:+.3f}, {paired.high:+.3f}] | {verdict} |")
            entry.update(difference=diff, paired_interval=[paired.low, paired.high], real=verdict)
        record["drafts"][name] = entry
    (root / "compare.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {root / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
