"""The code that runs only on a CUDA device, against fp64 references computed on the CPU.

On a GPU the TTT attention takes other code than on the CPU: ``sdpa`` attends over the concatenated
cache with a dense boolean mask (the default backend), and ``flex_attention`` is compiled and runs
its backward (the CPU has no flex backward). The fused loss takes its accelerator branches
(``torch.mm`` into the logits buffer, the plain hidden-state product, at least 256 rows a chunk).
CI has no GPU, so these tests are skipped there, visibly (``-ra`` lists the reason); run this file
on a machine with one. ``benchmarks/gpu_check.py`` times the step at real sizes.

Tolerances. fp32: kernels that accumulate in fp32, as the CPU ones do (TF32 is kept off here). bf16:
stated as the error's norm relative to the reference's norm; a bf16 rounding is off by up to 2**-9,
and the bounds allow a few roundings per operand (outputs 2**-6, gradients 2**-5 in the attention;
the TTT step's bounds are twice those of its CPU test in test_eagle3.py). The bf16 bounds were set
without a GPU to measure on; a failure near them is a numerics question, not necessarily a bug.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchspec.draft_models import Eagle3Model
from torchspec.draft_models.loss import TargetDistribution, TargetFromHead, fused_forward_kl
from torchspec.draft_models.ttt_attention import TTTMask, ttt_attention

from draft_helpers import build_draft, explicit_ttt_attention, forward_batch, make_batch, reference_ttt

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: the GPU-only attention and loss paths (dense-mask sdpa, compiled "
    "flex_attention forward and backward, the loss's accelerator branches)",
)
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """fp32 products in full fp32: with TF32 they carry 10 significant bits, not 24."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double().cpu()
    return ((actual.double().cpu() - expected).norm() / expected.norm()).item()


# --- attention over the TTT cache ------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key_dim, value_dim, kv_heads", [(32, 32, 2), (32, 16, 4)])  # GQA; MLA's narrower values
def test_ttt_attention_and_its_gradients_equal_the_explicit_mask_reference(
    backend, dtype, key_dim, value_dim, kv_heads
):
    """Four TTT steps through ``ttt_attention`` on the GPU (sdpa: dense mask over the concatenated
    cache; flex: compiled, causal block mask plus the merged diagonal keys), outputs and the
    gradients of every query, key and value against one softmax over the cache in fp64 with the
    mask built from the rules."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, seq_len, steps, scale = 2, 4, 80, 4, key_dim**-0.5
    padding = torch.ones(batch, seq_len, dtype=torch.bool)
    padding[1, 61:] = False

    def leaves(heads_, dim):
        return [torch.randn(batch, heads_, seq_len, dim, generator=generator) for _ in range(steps)]

    queries, keys, values = leaves(heads, key_dim), leaves(kv_heads, key_dim), leaves(kv_heads, value_dim)
    upstream = [torch.randn(batch, heads, seq_len, value_dim, generator=generator) for _ in range(steps)]

    def run(device, run_dtype, attention, mask):
        inputs = [[t.to(device, run_dtype).requires_grad_() for t in group] for group in (queries, keys, values)]
        outs, cache_keys, cache_values = [], None, None
        for k in range(steps):
            out, cache_keys, cache_values = attention(
                inputs[0][k], inputs[1][k], inputs[2][k], mask, cache_keys, cache_values, True, scale
            )
            outs.append(out)
        objective = sum((out * up.to(device, run_dtype)).sum() for out, up in zip(outs, upstream))
        grads = torch.autograd.grad(objective, [t for group in inputs for t in group])
        return outs, grads

    outs, grads = run(DEVICE, dtype, ttt_attention, TTTMask(padding.to(DEVICE), backend))
    expected_outs, expected_grads = run("cpu", torch.float64, explicit_ttt_attention, TTTMask(padding))
    assert all(out.dtype == dtype and out.device.type == "cuda" for out in outs)
    if dtype == torch.float32:
        for actual, expected in zip([*outs, *grads], [*expected_outs, *expected_grads]):
            torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-4, atol=1e-4)
    else:
        for k, (actual, expected) in enumerate(zip(outs, expected_outs)):
            assert _relative_error(actual, expected) <= 2**-6, f"output of step {k}"
        for i, (actual, expected) in enumerate(zip(grads, expected_grads)):
            assert _relative_error(actual, expected) <= 2**-5, f"gradient {i}"


# --- the fused loss --------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [None, 2 * (2 * 1024 + 77)])  # the accelerator default; 2 rows
def test_fused_loss_on_the_gpu_matches_the_fp64_formula(dtype, chunk_elements):
    """The accelerator branches of the loss (``torch.mm`` into the logits buffer, the plain
    ``grad_logits @ weight``; bf16 weights take the copy branch), against full logits and
    log_softmax in fp64 on the CPU: loss, per-step sums, top-1 agreement and both gradients."""
    generator = torch.Generator().manual_seed(0)
    vocab, hidden_size, rows, steps, count = 2 * 1024 + 77, 32, 40, 3, 9
    hidden = torch.randn(rows, hidden_size, generator=generator).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.3).to(dtype)
    target_hidden = torch.randn(1, count, hidden_size, generator=generator).to(dtype)
    target_weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.3).to(dtype)
    positions = torch.arange(count)
    row_index = torch.randint(0, rows, (steps, count), generator=generator)
    counted = torch.rand(steps, count, generator=generator) > 0.2
    row_weight = torch.rand(steps, count, generator=generator) * counted

    gpu_hidden = hidden.to(DEVICE, copy=True).requires_grad_()
    gpu_weight = weight.to(DEVICE, copy=True).requires_grad_()
    loss, loss_sums, correct = fused_forward_kl(
        gpu_hidden,
        gpu_weight,
        TargetFromHead(target_hidden.to(DEVICE), target_weight.to(DEVICE)),
        positions.to(DEVICE),
        row_index.to(DEVICE),
        row_weight.to(DEVICE),
        counted.to(DEVICE),
        chunk_elements=chunk_elements,
    )
    loss.backward()
    assert gpu_hidden.grad.dtype == gpu_weight.grad.dtype == dtype

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    p = torch.softmax(target_hidden[0].double() @ target_weight.double().T, -1)[positions]
    log_q = torch.log_softmax(h64[row_index] @ w64.T, -1)
    row_loss = -(p * log_q).sum(-1)
    expected = (row_weight.double() * row_loss).sum()
    expected.backward()
    expected_sums = (row_loss * counted).sum(-1).detach()
    if dtype == torch.float32:
        torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss_sums.double().cpu(), expected_sums, rtol=1e-5, atol=1e-5)
        assert torch.equal(correct.cpu(), (log_q.argmax(-1) == p.argmax(-1)) & counted)
        torch.testing.assert_close(gpu_hidden.grad.double().cpu(), h64.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gpu_weight.grad.double().cpu(), w64.grad, rtol=1e-4, atol=1e-6)
    else:
        # bf16 logits (the matmul's output is bf16 before the fp32 softmax): 2**-9 of |z| per logit.
        assert abs(loss.item() - expected.item()) <= 1e-2 * expected.item()
        assert _relative_error(loss_sums, expected_sums) <= 1e-2
        assert _relative_error(gpu_hidden.grad, h64.grad) <= 2**-5
        assert _relative_error(gpu_weight.grad, w64.grad) <= 2**-5


@needs_gpu
def test_on_an_accelerator_the_loss_takes_at_least_256_target_positions_at_a_time():
    """2**24 [rows, vocab] elements a chunk, never fewer than 256 rows (the CPU takes half)."""

    class CountingTarget(TargetDistribution):
        def __init__(self, vocab):
            self.vocab, self.chunks = vocab, []

        def probs(self, positions):
            self.chunks.append(positions.numel())
            return torch.full((positions.numel(), self.vocab), 1.0 / self.vocab, device=positions.device)

    for vocab, expected in [(1 << 17, [256, 44]), (1 << 14, [300])]:  # 2**24 / 2**17 = 128 < 256 rows
        target = CountingTarget(vocab)
        rows = torch.zeros(1, 300, dtype=torch.long, device=DEVICE)
        fused_forward_kl(
            torch.randn(1, 4, device=DEVICE),
            torch.randn(vocab, 4, device=DEVICE),
            target,
            torch.arange(300, device=DEVICE),
            rows,
            torch.zeros(1, 300, device=DEVICE),
            torch.ones(1, 300, dtype=torch.bool, device=DEVICE),
        )
        assert target.chunks == expected


# --- one whole TTT step ----------------------------------------------------------------------------

# Head sizes flex_attention compiles for (at least 16); the CPU tests' tiny drafts use 12.
GPU_DRAFT_SIZES = {
    "llama": dict(head_dim=16),
    "mla": dict(qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16),
}
# The CPU bf16 step's bounds (test_eagle3.py), doubled: GPU kernels round differently.
BF16_LOSS_BOUND, BF16_OBJECTIVE_BOUND, BF16_GRADIENT_BOUND = 8e-3, 2e-3, 0.1


@needs_gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_ttt_step_on_the_gpu_matches_the_fp64_reference(draft_kind, backend, dtype):
    """Eagle3Model forward and backward on the GPU (3 TTT steps, padding, the default loss chunks)
    against the row-by-row TTT objective in fp64 on the CPU, its norms, MLP and attention written
    as plain formulas: per-step loss sums, the objective and every parameter's gradient."""
    draft = build_draft(draft_kind, **GPU_DRAFT_SIZES[draft_kind]).to(dtype)
    reference_draft = copy.deepcopy(draft).double()  # the same (dtype-rounded) weights
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in make_batch(seq_len=40, pad_last=7).items()}
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    length, decay = 3, 0.8

    out = forward_batch(
        Eagle3Model(draft.to(DEVICE), length=length, attention_backend=backend, loss_decay=decay),
        {k: v.to(DEVICE) for k, v in batch.items()},
    )
    out.total_loss().backward()

    loss_sums, counts, _ = reference_ttt(reference_draft, batch64, length, batch["token_loss_mask"])
    objective = sum(decay**k * loss_sums[k] / max(counts[k], 1) for k in range(length))
    objective.backward()
    assert out.counted.tolist() == counts
    expected_sums = torch.stack(loss_sums).detach()
    parameters = zip(draft.named_parameters(), reference_draft.parameters())
    if dtype == torch.float32:
        torch.testing.assert_close(out.loss_sums.double().cpu(), expected_sums, rtol=1e-4, atol=1e-4)
        for (name, param), reference in parameters:
            torch.testing.assert_close(param.grad.double().cpu(), reference.grad, rtol=1e-3, atol=1e-5, msg=name)
    else:
        assert ((out.loss_sums.double().cpu() - expected_sums).abs() <= BF16_LOSS_BOUND * expected_sums.abs()).all()
        assert abs(out.loss.item() - objective.item()) <= BF16_OBJECTIVE_BOUND * objective.item()
        for (name, param), reference in parameters:
            error = _relative_error(param.grad, reference.grad)
            assert error <= BF16_GRADIENT_BOUND, f"{name}: {error:.4f}"


# --- the GPU check script --------------------------------------------------------------------------


def test_gpu_check_fails_in_one_line_without_a_gpu():
    """Asked to check the GPU paths where there is no GPU, the script must not pass (it runs with
    no device visible, on any machine)."""
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_check.py"
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], result.stderr
