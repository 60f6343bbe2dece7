"""End-to-end throughput of the online training loop (target forward + draft TTT step + AdamW).

    python packages/trainer/benchmarks/bench_online_loop.py                 # both presets
    python packages/trainer/benchmarks/bench_online_loop.py --preset large --steps 6

Presets:

* ``default``: the embedded default run (tiny 8-layer Qwen3-style target, hidden 128, vocab 2048;
  Llama draft; 16 conversations per step, 4 per micro-batch; fp32).
* ``large``: a random-weight Qwen3-style target of 12 layers, hidden 768, vocab 32000 (~150M
  parameters) and the draft generated from it (hidden 768, full 32000 vocab), same data and batch.

Each preset runs in a fresh process (so peak RSS is its own) through ``torchspec.trainer.train``
with evaluation off; the first ``--warmup`` steps are not timed. Reported per preset: median
tokens/s (real, unpadded tokens), median step time, the share of step time spent in the target
forward versus the draft (forward, backward, optimizer), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _large_target(directory: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from torchspec.trainer.commands.default_assets import ensure_default_target

    if (directory / "config.json").is_file():
        return directory
    import torch

    tokenizer_dir = ensure_default_target()
    config = Qwen3Config(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=2048,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(directory)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def _child(preset: str, steps: int, warmup: int, workdir: Path) -> dict:
    import logging

    from torchspec.trainer.config import load_config
    from torchspec.trainer.loop.run import train

    logging.basicConfig(level=logging.WARNING)
    overrides = [
        f"training.max_steps={warmup + steps}",
        "metrics.eval_interval=0",
        "data.eval_split=0",
        "metrics.progress_bar=false",
        f"training.output_dir={workdir / preset}",
        "checkpoint.keep_last=1",
        "training.device=cpu",
    ]
    if preset == "large":
        overrides.append(f"model.target_model_path={_large_target(workdir / 'large_target')}")
    records = []
    train(load_config(None, overrides), step_callback=lambda step, record: records.append(record))
    timed = records[warmup:]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "preset": preset,
        "steps": len(timed),
        "tokens_per_step": statistics.median(r["tokens"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_s": statistics.median(r["step_seconds"] for r in timed),
        "target_share": statistics.median(r["target_time_share"] for r in timed),
        "peak_rss_mb": peak_rss_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["default", "large", "all"], default="all")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per preset")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where runs and the large target go (default: a temp dir)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="torchspec-bench-"))
    if args.child:
        print(json.dumps(_child(args.preset, args.steps, args.warmup, workdir)))
        return

    presets = ["default", "large"] if args.preset == "all" else [args.preset]
    print(
        f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; fp32 CPU; {args.steps} timed steps after "
        f"{args.warmup}"
    )
    print(
        f"{'preset':<8} {'tokens/step':>11} {'tokens/s':>9} {'step s':>7} {'target':>7} {'draft':>7} {'peak RSS':>10}"
    )
    for preset in presets:
        command = [
            sys.executable,
            __file__,
            "--child",
            "--preset",
            preset,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--workdir",
            str(workdir),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{preset} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{preset:<8} {r['tokens_per_step']:>11.0f} {r['tokens_per_s']:>9.0f} {r['step_s']:>7.2f} "
            f"{r['target_share']:>7.1%} {1 - r['target_share']:>7.1%} {r['peak_rss_mb']:>7.0f} MB"
        )


if __name__ == "__main__":
    main()
