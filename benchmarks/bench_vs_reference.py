"""One TTT training step, this project beside the original TorchSpec, on the same shapes, in one run.

    python benchmarks/bench_vs_reference.py                       # Llama and MLA, vocab 32000 and 151936
    python benchmarks/bench_vs_reference.py --cases llama:32000 --seq 4096 --steps 1
    python benchmarks/bench_vs_reference.py --no-reference --cases mla:32000 --profile   # where the time goes

Each side runs in its own process (both packages are named ``torchspec``), fp32 on the CPU, with the
reference's shapes (``../shared/reference/README.md``): H=1024, sequence 512, TTT length 7, batch 1,
AdamW, embedding frozen, every position supervised, the target given as hidden states plus its
``lm_head`` weight. Both sides do the same: a warm-up step, one step under ``FlopCounterMode``, then
``--steps`` timed steps; the median is reported, with peak RSS (ru_maxrss) of the whole process.

This project runs as the trainer runs it by default: ``Eagle3Model(draft, length)`` with nothing
else set, the MLP recomputed in backward (``trainer.parallelize.apply_activation_checkpointing``,
mode ``mlp``), the optimizer the trainer builds (``trainer.optimizer.build_optimizer``) and the
host-memory policy the trainer applies to every CPU run (``trainer.host_memory``: the process starts
on tcmalloc where the system has it, else glibc with its mmap threshold pinned; the last line says
which). The reference runs its own benchmark script, ``bench_reference_step.py``, unchanged, on the
system's allocator, as it would run. Without ``../shared/reference`` (a user's clone has
none) only this project's figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REFERENCE = Path(os.environ.get("TORCHSPEC_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
DEFAULT_CASES = ["llama:32000", "mla:32000", "llama:151936", "mla:151936"]
TRAINER_ACTIVATION_CHECKPOINTING = "mlp"  # what the trainer applies unless ttt.gradient_checkpointing


def draft_config(arch: str, hidden: int, vocab: int) -> dict:
    """The reference benchmark's shapes, as this project's draft config."""
    common = dict(
        hidden_size=hidden,
        vocab_size=vocab,
        draft_vocab_size=vocab,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        torch_dtype="float32",
    )
    if arch == "llama":
        return dict(
            architectures=["LlamaForCausalLMEagle3"],
            intermediate_size=hidden * 11 // 4,
            num_attention_heads=hidden // 64,
            num_key_value_heads=max(1, hidden // 256),
            head_dim=64,
            **common,
        )
    return dict(
        architectures=["Eagle3DeepseekV2ForCausalLM"],
        intermediate_size=hidden * 3,
        num_attention_heads=hidden // 128,
        q_lora_rank=hidden * 3 // 8,
        kv_lora_rank=hidden // 8,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        **common,
    )


def run_project(arch: str, vocab: int, args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from torchspec.draft_models import AutoEagle3DraftModel, Eagle3Model, step0_loss_mask
    from torchspec.trainer.distributed.host_memory import loaded_allocator, pin_malloc_mmap_threshold
    from torchspec.trainer.distributed.parallelize import apply_activation_checkpointing
    from torchspec.trainer.loop.optimizer import build_optimizer

    pin_malloc_mmap_threshold()  # as the trainer does: glibc only
    torch.manual_seed(0)
    hidden, seq = args.hidden, args.seq
    draft = AutoEagle3DraftModel.from_config(draft_config(arch, hidden, vocab)).float()
    draft.freeze_embedding()
    model = apply_activation_checkpointing(Eagle3Model(draft, length=args.ttt), TRAINER_ACTIVATION_CHECKPOINTING)
    optimizer = build_optimizer([p for p in draft.parameters() if p.requires_grad], 1e-4, (0.9, 0.999), 0.01)
    target_head = torch.randn(vocab, hidden) * 0.02

    def batch():
        return dict(
            input_ids=torch.randint(0, vocab, (1, seq)),
            hidden_states=torch.randn(1, seq, 3 * hidden),
            loss_mask=step0_loss_mask(torch.ones(1, seq, dtype=torch.long)),
            attention_mask=torch.ones(1, seq, dtype=torch.long),
            target_hidden=torch.randn(1, seq, hidden),
            target_head_weight=target_head,
        )

    def step(b):
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batch())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            step(batch())
        # On stderr: stdout carries the child's one JSON line.
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    with FlopCounterMode(display=False) as counter:
        step(batch())
    times = []
    for _ in range(args.steps):
        b = batch()
        start = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(
        ms_per_step=median * 1000,
        tokens_per_s=seq / median,
        gflop_per_step=counter.get_total_flops() / 1e9,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        allocator=loaded_allocator(),
    )


def run_reference(arch: str, vocab: int, args) -> dict | None:
    script = REFERENCE / "bench_reference_step.py"
    if not script.exists():
        return None
    cmd = [sys.executable, str(script), "--arch", arch, "--vocab", str(vocab), "--hidden", str(args.hidden)]
    cmd += ["--seq", str(args.seq), "--ttt", str(args.ttt), "--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"reference failed ({arch}, vocab {vocab}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    fields = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
    return dict(
        ms_per_step=float(fields["ms/step"]),
        tokens_per_s=float(fields["tok/s"]),
        gflop_per_step=float(fields["GFLOP/step"]),
        peak_rss_mb=float(fields["peakRSS_MB"]),
    )


def _project_in_child(arch: str, vocab: int, show_profile: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{arch}:{vocab}"] + [a for a in sys.argv[1:] if a != "--child"]
    # Started as the trainer starts a CPU run: on tcmalloc where the system has it (host_memory).
    from torchspec.trainer.distributed.host_memory import tcmalloc_environment

    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=tcmalloc_environment())
    if show_profile:
        print(done.stderr, file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="arch:vocab pairs")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--ttt", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="time this project only")
    parser.add_argument(
        "--profile", action="store_true", help="print where this project's step spends its time (torch.profiler)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arch, vocab = args.child.split(":")
        print(json.dumps(run_project(arch, int(vocab), args)))
        return
    print(f"H={args.hidden} T={args.seq} TTT={args.ttt} batch=1 fp32, median of {args.steps} steps")
    header = f"{'draft':6} {'vocab':>7} | {'reference s/step':>16} {'RSS GB':>7} | {'project s/step':>14} {'RSS GB':>7}"
    print(header + f" | {'speed':>6} {'RSS':>6}")
    allocators: set[str] = set()
    for case in args.cases:
        arch, vocab = case.split(":")
        reference = None if args.no_reference else run_reference(arch, int(vocab), args)
        ours = _project_in_child(arch, int(vocab), args.profile)
        line = f"{arch:6} {vocab:>7} | "
        if reference:
            line += f"{reference['ms_per_step'] / 1000:16.2f} {reference['peak_rss_mb'] / 1024:7.2f} | "
        else:
            line += f"{'-':>16} {'-':>7} | "
        line += f"{ours['ms_per_step'] / 1000:14.2f} {ours['peak_rss_mb'] / 1024:7.2f}"
        allocators.add(ours["allocator"])
        if reference:
            speed = ours["tokens_per_s"] / reference["tokens_per_s"]
            line += f" | {speed:5.2f}x {ours['peak_rss_mb'] / reference['peak_rss_mb']:5.2f}x"
        print(line, flush=True)
    print(f"this project's host allocator: {', '.join(sorted(allocators))} (the reference runs on the system's)")


if __name__ == "__main__":
    main()
