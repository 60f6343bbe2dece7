"""EAGLE-3 against the EAGLE-3.1 variants on the embedded default: same data, steps, seed and
evaluation; only the draft options differ.

    python benchmarks/eagle3_1_comparison.py                 # Llama draft, every variant (~15 min on 2 cores)
    python benchmarks/eagle3_1_comparison.py --arch mla --variants eagle3 eagle3_1

Each variant is a full default run (``configs/default_<arch>.yaml``: the built-in tiny target, the
bundled sample conversations, 4 epochs) followed by the trainer's own speculative evaluation on the
held-out split (real greedy decoding, K=4, stops at EOS). Prints a Markdown table: acceptance length,
per-position acceptance, held-out step-0 accuracy and final training loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from torchspec.trainer.config import load_config
from torchspec.trainer.loop.run import train

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "eagle3": [],
    "eagle3_1": ["model.eagle3_1=true"],  # fc_norm + norm_output
    "fc_norm": ["model.fc_norm=true"],
    "norm_output": ["model.norm_output=true"],
    "norm_before_fc": ["model.norm_before_fc=true"],  # Llama only (vLLM's DeepSeek draft lacks it)
}


def run_variant(arch: str, variant: str, output_dir: Path) -> dict:
    overrides = [
        f"training.output_dir={output_dir}",
        "checkpoint.resume=null",
        "metrics.progress_bar=false",
        *VARIANTS[variant],
    ]
    start = time.perf_counter()
    result = train(load_config(REPO / "configs" / f"default_{arch}.yaml", overrides))
    speculative = result.speculative_eval or {}
    last = result.train_history[-1] if result.train_history else {}
    return {
        "variant": variant,
        "steps": result.steps,
        "acceptance_length": speculative.get("acceptance_length"),
        "position_acceptance": speculative.get("position_acceptance"),
        "eval_acc_0": (result.eval_metrics or {}).get("acc"),
        "train_loss": last.get("loss"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def markdown(arch: str, rows: list[dict]) -> str:
    lines = [
        f"| {arch} draft | acceptance length | position acceptance (1..4) | held-out step-0 accuracy | final loss |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        positions = " ".join(f"{share:.2f}" for share in row["position_acceptance"] or [])
        accuracy = "-" if row["eval_acc_0"] is None else f"{row['eval_acc_0']:.3f}"
        loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.2f}"
        lines.append(f"| {row['variant']} | {row['acceptance_length']:.3f} | {positions} | {accuracy} | {loss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["llama", "mla"], default="llama")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=None,
        help="default: all (without norm_before_fc for mla)",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    variants = args.variants or [v for v in VARIANTS if not (args.arch == "mla" and v == "norm_before_fc")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="eagle3_1_comparison-") as scratch:
        for variant in variants:
            rows.append(run_variant(args.arch, variant, Path(scratch) / variant))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(args.arch, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
