"""The checks that need a GPU, as one short script for a session that is lent one.

    python benchmarks/gpu_check.py            # ~2-3 minutes on one H100/H200

1. flex_attention forward + backward (compiled) against sdpa on the same TTT batch, bf16;
2. bf16 numerics of one TTT step against an fp32 reference (loss and gradient agreement);
3. timing of one TTT training step (hidden 4096, vocab 32000, seq 2048, length 7) for both drafts.

Prints one JSON line per check. Exits 1 when a check is not ``ok``, and 1 with one line on stderr
when there is no CUDA device: a check that was asked for and could not run has not passed.
For the correctness of the GPU-only paths against fp64 references, run
``python -m pytest packages/draft-models/tests/test_gpu_paths.py`` on the same machine.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

from torchspec.draft_models import AutoEagle3DraftModel, Eagle3Model, step0_loss_mask


def _draft(kind: str, hidden: int, vocab: int):
    common = dict(
        hidden_size=hidden,
        vocab_size=vocab,
        draft_vocab_size=vocab,
        intermediate_size=3 * hidden,
        num_attention_heads=32,
        max_position_embeddings=8192,
        torch_dtype="float32",
    )
    if kind == "llama":
        config = dict(architectures=["LlamaForCausalLMEagle3"], num_key_value_heads=8, head_dim=128, **common)
    else:
        config = dict(
            architectures=["Eagle3DeepseekV2ForCausalLM"],
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            **common,
        )
    torch.manual_seed(0)
    return AutoEagle3DraftModel.from_config(config).cuda()


def _batch(hidden: int, vocab: int, seq: int, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = dict(
        input_ids=torch.randint(0, vocab, (1, seq), device="cuda", generator=g),
        hidden_states=torch.randn(1, seq, 3 * hidden, device="cuda", generator=g).to(dtype),
        target_hidden=torch.randn(1, seq, hidden, device="cuda", generator=g).to(dtype),
        target_head_weight=(torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).to(dtype),
    )
    batch["loss_mask"] = step0_loss_mask(torch.ones(1, seq, dtype=torch.long, device="cuda"))
    return batch


def _step(model, batch):
    out = model(
        batch["input_ids"],
        batch["hidden_states"],
        batch["loss_mask"],
        target_hidden=batch["target_hidden"],
        target_head_weight=batch["target_head_weight"],
    )
    loss = out.total_loss(0.8)
    loss.backward()
    return out, loss


def check_flex_vs_sdpa(kind: str) -> dict:
    draft = _draft(kind, 1024, 32000).to(torch.bfloat16)
    batch = _batch(1024, 32000, 1024, torch.bfloat16)
    results = {}
    for backend in ("sdpa", "flex_attention"):
        draft.zero_grad(set_to_none=True)
        out, loss = _step(Eagle3Model(draft, 7, backend), batch)
        results[backend] = (out.losses.detach().float(), draft.fc.weight.grad.float().clone())
    loss_diff = (results["sdpa"][0] - results["flex_attention"][0]).abs().max().item()
    grad_rel = ((results["sdpa"][1] - results["flex_attention"][1]).norm() / results["sdpa"][1].norm()).item()
    return dict(
        check="flex_vs_sdpa_bf16",
        draft=kind,
        max_loss_diff=loss_diff,
        fc_grad_rel_diff=grad_rel,
        ok=loss_diff < 2e-2 and grad_rel < 5e-2,
    )


def check_bf16_numerics(kind: str) -> dict:
    draft32 = _draft(kind, 1024, 32000)
    draft16 = copy.deepcopy(draft32).to(torch.bfloat16)
    out32, _ = _step(Eagle3Model(draft32, 7), _batch(1024, 32000, 1024, torch.float32))
    out16, _ = _step(Eagle3Model(draft16, 7), _batch(1024, 32000, 1024, torch.bfloat16))
    rel = ((out32.losses - out16.losses.float()).abs() / out32.losses.abs()).max().item()
    g32, g16 = draft32.lm_head.weight.grad, draft16.lm_head.weight.grad.float()
    cos = torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0).item()
    return dict(
        check="bf16_vs_fp32", draft=kind, max_loss_rel_diff=rel, lm_head_grad_cosine=cos, ok=rel < 2e-2 and cos > 0.99
    )


def time_step(kind: str, backend: str) -> dict:
    hidden, vocab, seq = 4096, 32000, 2048
    draft = _draft(kind, hidden, vocab).to(torch.bfloat16)
    draft.freeze_embedding()
    model = Eagle3Model(draft, 7, backend)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-5)
    batch = _batch(hidden, vocab, seq, torch.bfloat16)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    times = []
    for i in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _step(model, batch)
        optimizer.step()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    # Another sequence length: a design that recompiles per TTT step or per length shows it here.
    _step(model, _batch(hidden, vocab, seq // 2 + 8, torch.bfloat16))
    median = sorted(times)[len(times) // 2]
    return dict(
        check="ttt_step_time",
        draft=kind,
        backend=backend,
        median_ms=round(median * 1e3, 1),
        tokens_per_s=round(seq / median),
        peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
        compiled_graphs=counters["stats"]["unique_graphs"] - graphs_before,
    )


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible, so nothing was checked; run it on a machine with a GPU", file=sys.stderr
        )
        return 1
    failed = []
    for kind in ("llama", "mla"):
        for check in (check_flex_vs_sdpa, check_bf16_numerics):
            result = check(kind)
            print(json.dumps(result), flush=True)
            if not result["ok"]:
                failed.append(f"{result['check']} ({kind})")
        for backend in ("sdpa", "flex_attention"):
            torch.cuda.reset_peak_memory_stats()
            print(json.dumps(time_step(kind, backend)), flush=True)
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
