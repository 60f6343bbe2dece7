"""vLLM's CPU rotary-embedding kernel on DeepSeek MLA's query/key layout, against its PyTorch rope.

    python benchmarks/vllm_cpu_mla_rope_repro.py                     # tiny MLA dims, plain rope
    python benchmarks/vllm_cpu_mla_rope_repro.py --dims deepseek-v3  # DeepSeek-V3's head dims
    python benchmarks/vllm_cpu_mla_rope_repro.py --rope yarn         # DeepSeek-V3's YaRN settings

Runs in an environment with vLLM's CPU build (``vllm-cpu``), in seconds, without a model. It
rebuilds what ``MultiHeadLatentAttentionWrapper.forward`` (vllm/model_executor/layers/mla.py) hands
the rope: ``q`` viewed as ``[tokens, heads, qk_nope + qk_rope]`` and rotated through the strided
view ``q[..., qk_nope_head_dim:]``; ``k_pe`` sliced out of the fused ``[q_c | kv_c | k_pe]``
projection and unsqueezed to ``[tokens, 1, qk_rope]``. The rope is the one DeepSeek's attention
builds (``get_rope(qk_rope_head_dim, ..., is_neox_style=False)``, vllm/model_executor/models/
deepseek_v2.py). The batch is two requests as the scheduler lays them out: a prefill chunk of 6
tokens at positions 16..21 and one decode token at position 37 (no position 0, whose rotation is
the identity and would hide a missed one).

Compared, on copies of the same inputs:
* ``kernel``: ``vllm._custom_ops.rotary_embedding`` (the op ``RotaryEmbedding.forward_cpu`` calls);
* ``module``: the rope module called as mla.py calls it, built under an eager compilation config
  (``mode=NONE``, what ``enforce_eager=True`` gives; vLLM then defaults custom ops to ``all``) and
  under the same with ``custom_ops=["-rotary_embedding"]``;
* ``native``: ``forward_native`` (vLLM's PyTorch rope);
* ``reference``: an independent float64 GPT-J-style (interleaved) rotation written here, from the
  rope's own cos/sin cache;
* controls: the kernel on contiguous 2-D copies ``[tokens, heads * rope]`` (the layout it expects:
  right) and on contiguous 3-D copies (wrong too: it reads any 3-D tensor as 2-D).

For each (token, head) of the query and each token of ``k_pe`` it prints what the kernel did: the
right rotation, a rotation with another token's position, or none; and which elements outside the
two views it changed. Exit status 1 when the kernel on MLA's layout differs from ``forward_native``
(more than 1e-5), 0 when they agree, 2 when the reference disagrees with ``forward_native`` (the
check itself is wrong then).
"""

from __future__ import annotations

import argparse
import sys

import torch

TOLERANCE = 1e-5
DIMS = {
    # heads, qk_nope_head_dim, qk_rope_head_dim, q_lora_rank, kv_lora_rank
    "tiny": (4, 32, 64, 64, 512),  # the scaled-down DeepSeek-V3 this project's integration tests serve
    "deepseek-v3": (128, 128, 64, 1536, 512),  # DeepSeek-V3 / R1 (one GPU's worth of heads: no TP)
}
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    # DeepSeek-V3's config.json rope_scaling; deepseek_v2.py renames the type to deepseek_yarn
    "yarn": {
        "rope_type": "deepseek_yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}
POSITIONS = [16, 17, 18, 19, 20, 21, 37]  # request A's prefill chunk (6 tokens), request B's decode token


def build_rope(rope: str, rotary_dim: int, custom_ops: list[str] | None):
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, get_rope

    _ROPE_DICT.clear()  # get_rope caches modules, and a module fixes its dispatch when built
    # mode NONE is what enforce_eager=True sets; vLLM then turns custom ops on ("all") by default.
    compilation = CompilationConfig(mode=CompilationMode.NONE, custom_ops=list(custom_ops or []))
    config = VllmConfig(compilation_config=compilation)
    with set_current_vllm_config(config):
        module = get_rope(
            rotary_dim,
            max_position=4096 if rope == "default" else 4096 * 40,
            rope_parameters=dict(ROPES[rope]),
            is_neox_style=False,
            dtype=torch.float32,
        )
    return module, config.compilation_config.custom_ops


def mla_inputs(dims: str, seed: int = 0):
    """``q``, the fused projection output and the two views mla.py rotates, as mla.py makes them."""
    heads, nope, rope, q_lora, kv_lora = DIMS[dims]
    generator = torch.Generator().manual_seed(seed)
    tokens = len(POSITIONS)
    fused = torch.randn(tokens, q_lora + kv_lora + rope, generator=generator)  # fused_qkv_a_proj(hidden)
    q = torch.randn(tokens, heads * (nope + rope), generator=generator).view(-1, heads, nope + rope)  # q_b_proj
    return q, fused


def views(q: torch.Tensor, fused: torch.Tensor, dims: str):
    heads, nope, rope, q_lora, kv_lora = DIMS[dims]
    _q_c, kv_lora_out = fused.split([q_lora, kv_lora + rope], dim=-1)
    _kv_c, k_pe = kv_lora_out.split([kv_lora, rope], dim=-1)
    return q[..., nope:], k_pe.unsqueeze(1)


def reference_rotation(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """GPT-J (interleaved) rope in float64: pairs (x[2i], x[2i+1]) rotated by the angle whose cos and
    sin the cache holds at ``[position, i]`` and ``[position, rotary_dim/2 + i]``. ``x``: [T, n, d]."""
    half = x.shape[-1] // 2
    cache = cos_sin_cache.double()[positions]
    cos, sin = cache[:, None, :half], cache[:, None, half:]
    even, odd = x.double()[..., 0::2], x.double()[..., 1::2]
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def classify(got: torch.Tensor, original: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> str:
    """What was done to one ``[d]`` vector: rotated at which position (of the batch), or not at all."""
    if torch.allclose(got, original, atol=TOLERANCE, rtol=0):
        return "not rotated"
    for index, position in enumerate(positions.tolist()):
        rotated = reference_rotation(original[None, None], torch.tensor([position]), cache)[0, 0].float()
        if torch.allclose(got, rotated, atol=TOLERANCE, rtol=0):
            return f"pos {position} (token {index})"
    return "other"


def run(dims: str, rope: str) -> int:
    from vllm import _custom_ops as ops

    heads, nope, rotary_dim, q_lora, kv_lora = DIMS[dims]
    positions = torch.tensor(POSITIONS, dtype=torch.int64)
    module, default_ops = build_rope(rope, rotary_dim, None)
    torch_rope, torch_ops = build_rope(rope, rotary_dim, ["-rotary_embedding"])
    cache = module.cos_sin_cache
    q0, fused0 = mla_inputs(dims)
    q_view0, k_pe0 = views(q0, fused0, dims)
    print(
        f"vLLM {__import__('vllm').__version__}, torch {torch.__version__}, {dims} dims: {len(POSITIONS)} tokens x "
        f"{heads} heads, qk_nope {nope} + qk_rope {rotary_dim}, q_lora {q_lora}, kv_lora {kv_lora}"
    )
    print(f"rope: {type(module).__name__} ({rope}, is_neox_style=False)")
    print(f"positions: {POSITIONS} (a 6-token prefill chunk and a decode token)")
    print(
        f"q[..., {nope}:]: shape {tuple(q_view0.shape)} stride {q_view0.stride()}; "
        f"k_pe: shape {tuple(k_pe0.shape)} stride {k_pe0.stride()} (rows of the fused [q_c | kv_c | k_pe])"
    )

    # Independent reference vs vLLM's PyTorch rope.
    q_native, k_native = module.forward_native(positions, q_view0.clone(), k_pe0.clone())
    q_ref = reference_rotation(q_view0, positions, cache)
    k_ref = reference_rotation(k_pe0, positions, cache)
    reference_error = max(
        (q_native.double() - q_ref).abs().max().item(), (k_native.double() - k_ref).abs().max().item()
    )
    print(f"forward_native vs float64 reference: max abs error {reference_error:.2e}")
    if reference_error > TOLERANCE:
        print("the reference disagrees with forward_native: this check is wrong, not the kernel")
        return 2

    # The kernel, called on MLA's views exactly as forward_cpu calls it (in place).
    q, fused = q0.clone(), fused0.clone()
    q_view, k_pe = views(q, fused, dims)
    ops.rotary_embedding(positions, q_view, k_pe, rotary_dim, module._match_cos_sin_cache_dtype(q_view), False)
    q_error = (q_view - q_native).abs().amax(-1)  # [T, heads]
    k_error = (k_pe - k_native).abs().amax(-1)[:, 0]  # [T]
    k_pe_mask = torch.zeros_like(fused, dtype=torch.bool)
    k_pe_mask[:, q_lora + kv_lora :] = True
    outside = (fused != fused0) & ~k_pe_mask
    q_nope_changed = (q[..., :nope] != q0[..., :nope]).any().item()

    # The module as mla.py calls it: default custom ops (the kernel) and -rotary_embedding (PyTorch).
    results = {}
    for name, rope_module in (("default custom ops", module), ("-rotary_embedding", torch_rope)):
        q_m, fused_m = q0.clone(), fused0.clone()
        q_view_m, k_pe_m = views(q_m, fused_m, dims)
        q_m[..., nope:], k_pe_m = rope_module(positions, q_view_m, k_pe_m)
        results[name] = max((q_m[..., nope:] - q_native).abs().max().item(), (k_pe_m - k_native).abs().max().item())

    # The kernel's own layout: contiguous 2-D [tokens, heads * rotary_dim] and [tokens, rotary_dim].
    q_2d = q_view0.clone().reshape(len(POSITIONS), -1)
    k_2d = k_pe0.clone().reshape(len(POSITIONS), -1)
    ops.rotary_embedding(positions, q_2d, k_2d, rotary_dim, cache, False)
    contiguous_error = max(
        (q_2d.view_as(q_native) - q_native).abs().max().item(), (k_2d.view_as(k_native) - k_native).abs().max().item()
    )

    # Contiguous 3-D copies: not MLA's strides, but still not the kernel's 2-D layout.
    q_3d, k_3d = q_view0.clone(), k_pe0.clone()
    ops.rotary_embedding(positions, q_3d, k_3d, rotary_dim, cache, False)
    contiguous_3d_error = max((q_3d - q_native).abs().max().item(), (k_3d - k_native).abs().max().item())

    print()
    print(f"ops.rotary_embedding on contiguous 2-D copies vs forward_native: max abs error {contiguous_error:.2e}")
    print(f"ops.rotary_embedding on contiguous 3-D copies vs forward_native: max abs error {contiguous_3d_error:.3e}")
    print(
        f"ops.rotary_embedding on MLA's views vs forward_native: max abs error "
        f"q {q_error.max().item():.3e}, k_pe {k_error.max().item():.3e}"
    )
    for name, error in results.items():
        dispatch = {"default custom ops": default_ops, "-rotary_embedding": torch_ops}[name]
        print(f"rope module as mla.py calls it, custom_ops={dispatch}: max abs error {error:.3e}")
    if results["default custom ops"] <= TOLERANCE:
        print(
            f"  ({type(module).__name__} has no forward_cpu of its own: on CPU it runs forward_native and never "
            "reaches the kernel)"
        )
    wrong_heads = (q_error > TOLERANCE).sum().item()
    wrong_k = (k_error > TOLERANCE).sum().item()
    print(f"query heads rotated wrongly: {wrong_heads} of {q_error.numel()}; k_pe rows: {wrong_k} of {k_error.numel()}")
    print(
        f"q's nope part changed: {q_nope_changed}; elements of the fused projection outside k_pe changed: "
        f"{outside.sum().item()} (rows {sorted(set(outside.nonzero()[:, 0].tolist()))}, "
        f"columns {_spans(outside.nonzero()[:, 1].tolist(), q_lora, kv_lora)})"
    )
    print()
    print("what the kernel did, per token (query heads; then k_pe):")
    shown_heads = list(range(min(heads, 4))) + ([heads - 1] if heads > 4 else [])
    for t, position in enumerate(POSITIONS):
        head_states = [f"h{h}: {classify(q_view[t, h], q_view0[t, h], positions, cache)}" for h in shown_heads]
        k_state = classify(k_pe[t, 0], k_pe0[t, 0], positions, cache)
        print(f"  token {t} (pos {position:2d}): " + "; ".join(head_states) + f" | k_pe: {k_state}")
    failed = max(q_error.max().item(), k_error.max().item()) > TOLERANCE
    print()
    print("FAIL: the CPU kernel mis-rotates MLA's strided views" if failed else "OK: the kernel equals forward_native")
    return 1 if failed else 0


def _spans(columns: list[int], q_lora: int, kv_lora: int) -> str:
    parts = []
    if any(c < q_lora for c in columns):
        parts.append("q_c")
    if any(q_lora <= c < q_lora + kv_lora for c in columns):
        parts.append("kv_c")
    return "+".join(parts) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="tiny")
    parser.add_argument("--rope", choices=sorted(ROPES), default="default")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the kernel's OpenMP loops give the same result on any count; keep it quiet
    return run(args.dims, args.rope)


if __name__ == "__main__":
    sys.exit(main())
