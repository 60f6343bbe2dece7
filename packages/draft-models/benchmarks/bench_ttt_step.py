"""One TTT training step (forward + backward + AdamW) of each draft, fp32 on CPU by default.

    python packages/draft-models/benchmarks/bench_ttt_step.py            # both drafts, fused loss
    python packages/draft-models/benchmarks/bench_ttt_step.py --naive    # per-step full logits, for comparison

Each draft runs in its own subprocess so peak RSS (ru_maxrss) is that draft's alone. Reports the
median milliseconds per step, tokens/s (sequence tokens per second), GFLOP/s counted by
torch.utils.flop_counter over one step, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _configs(hidden: int, vocab: int) -> dict[str, dict]:
    common = dict(
        hidden_size=hidden,
        vocab_size=vocab,
        draft_vocab_size=vocab,
        intermediate_size=3 * hidden,
        num_attention_heads=8,
        max_position_embeddings=4096,
        torch_dtype="float32",
    )
    return {
        "llama": dict(architectures=["LlamaForCausalLMEagle3"], num_key_value_heads=2, head_dim=128, **common),
        "mla": dict(
            architectures=["Eagle3DeepseekV2ForCausalLM"],
            q_lora_rank=512,
            kv_lora_rank=256,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            **common,
        ),
    }


def _naive_loss(model, batch, decay):
    """The obvious implementation: full logits per step and the target softmax recomputed per step."""
    normed = model.unroll(batch["input_ids"], batch["hidden_states"], batch["attention_mask"])
    counted = model.counted_positions(batch["loss_mask"], batch["attention_mask"])
    total = 0.0
    for k in range(model.length):
        logits = model.draft.lm_head(normed[k])[:, : normed.shape[2] - 1 - k]
        target = torch.softmax(batch["target_hidden"] @ batch["target_head_weight"].T, -1)[:, k + 1 :]
        mask = counted[k, :, : normed.shape[2] - 1 - k]
        loss = -(target * torch.log_softmax(logits, -1)).sum(-1)
        total = total + decay**k * (loss * mask).sum() / mask.sum().clamp(min=1)
    return total


def run_one(kind: str, args) -> dict:
    from torchspec.draft_models import AutoEagle3DraftModel, Eagle3Model, step0_loss_mask

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    draft = AutoEagle3DraftModel.from_config(_configs(args.hidden, args.vocab)[kind]).to(dtype)
    draft.freeze_embedding()
    model = Eagle3Model(
        draft,
        length=args.length,
        attention_backend="sdpa",
        **({"loss_chunk_elements": args.loss_chunk_elements} if args.loss_chunk_elements else {}),
    )
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-5)
    B, T = args.batch, args.seq
    batch = dict(
        input_ids=torch.randint(0, args.vocab, (B, T)),
        hidden_states=torch.randn(B, T, 3 * args.hidden, dtype=dtype),
        attention_mask=torch.ones(B, T, dtype=torch.long),
        target_hidden=torch.randn(B, T, args.hidden, dtype=dtype),
        target_head_weight=torch.randn(args.vocab, args.hidden, dtype=dtype) * 0.05,
    )
    batch["loss_mask"] = step0_loss_mask(torch.ones(B, T, dtype=torch.long))

    def step():
        optimizer.zero_grad(set_to_none=True)
        if args.naive:
            loss = _naive_loss(model, batch, model.loss_decay)
        else:
            out = model(
                batch["input_ids"],
                batch["hidden_states"],
                batch["loss_mask"],
                batch["attention_mask"],
                target_hidden=batch["target_hidden"],
                target_head_weight=batch["target_head_weight"],
            )
            loss = out.loss
        loss.backward()
        optimizer.step()

    from torch.utils.flop_counter import FlopCounterMode

    step()  # warm-up (allocates AdamW state)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(
        draft=kind,
        naive=args.naive,
        median_ms=round(median * 1000, 1),
        tokens_per_s=round(B * T / median, 1),
        gflop_per_step=round(flops / 1e9, 1),
        gflops_per_s=round(flops / 1e9 / median, 1),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        params_m=round(sum(p.numel() for p in draft.parameters()) / 1e6, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafts", nargs="+", default=["llama", "mla"], choices=["llama", "mla"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--naive", action="store_true", help="per-step full logits (the obvious implementation)")
    parser.add_argument("--loss-chunk-elements", type=int, help="elements of one [rows, vocab] loss chunk")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    for kind in args.drafts:
        cmd = [sys.executable, __file__, "--child", kind] + [
            a for a in sys.argv[1:] if a not in args.drafts and a != "--drafts"
        ]
        result = subprocess.run(cmd, check=True, capture_output=True, text=True)
        print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
