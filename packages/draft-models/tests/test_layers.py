"""Shared building blocks against their direct formulas."""

import pytest
import torch

from torchspec.draft_models.layers import GatedMLP, RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_forward_and_gradients_equal_the_direct_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, dtype=dtype))
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    upstream = torch.randn(3, 5, 16, dtype=dtype)

    out = norm(x)
    grad_x, grad_weight = torch.autograd.grad((out * upstream).sum(), [x, norm.weight])

    weight = norm.weight.detach().clone().requires_grad_(True)
    direct = weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    expected_x, expected_weight = torch.autograd.grad((direct * upstream).sum(), [x, weight])
    torch.testing.assert_close(out, direct)
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(grad_weight, expected_weight)


# bf16 keeps 8 significant bits: one rounding is off by up to 2**-9 of the value. The norm rounds its
# input, output and gradients once each, so the bounds are a few roundings: every element within
# 2**-6 of the tensor's largest (measured: at most 0.006), and the whole tensor within 2**-7 in norm
# (measured: at most 0.0036).
BF16_ELEMENT_BOUND, BF16_NORM_BOUND = 2**-6, 2**-7


def _assert_within_bf16_bounds(actual, expected, name):
    error = actual.double() - expected
    assert error.abs().max() <= BF16_ELEMENT_BOUND * expected.abs().max(), name
    assert error.norm() <= BF16_NORM_BOUND * expected.norm(), name


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])  # 1e-3: a variance of eps's order
def test_rms_norm_in_bf16_matches_the_fp64_formula_forward_and_backward(scale):
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(64, generator=generator))
    x = (torch.randn(4, 5, 64, generator=generator) * scale).to(torch.bfloat16).requires_grad_(True)
    upstream = torch.randn(4, 5, 64, generator=generator).to(torch.bfloat16)

    out = norm(x)
    out.backward(upstream)
    assert out.dtype == x.grad.dtype == norm.weight.grad.dtype == torch.bfloat16

    # The formula in fp64 on the same (bf16) values.
    x64 = x.detach().double().requires_grad_(True)
    weight64 = norm.weight.detach().double().requires_grad_(True)
    direct = weight64 * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6)
    direct.backward(upstream.double())
    _assert_within_bf16_bounds(out, direct.detach(), "output")
    _assert_within_bf16_bounds(x.grad, x64.grad, "input gradient")
    _assert_within_bf16_bounds(norm.weight.grad, weight64.grad, "weight gradient")


def _direct_mlp(x, gate, up, down):
    return (torch.sigmoid(x @ gate.T) * (x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_mlp_forward_and_gradients_equal_the_direct_formula(dtype):
    torch.manual_seed(0)
    mlp = GatedMLP(16, 40).to(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    upstream = torch.randn(3, 5, 16, dtype=dtype)
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]

    out = mlp(x)
    grads = torch.autograd.grad((out * upstream).sum(), [x, *weights])

    plain = [w.detach().clone().requires_grad_(True) for w in weights]
    direct = _direct_mlp(x, *plain)
    expected = torch.autograd.grad((direct * upstream).sum(), [x, *plain])
    torch.testing.assert_close(out, direct)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want)


def test_gated_mlp_computes_only_the_gradients_asked_for():
    torch.manual_seed(0)
    mlp = GatedMLP(8, 24)
    mlp.gate_proj.weight.requires_grad_(False)
    x = torch.randn(2, 4, 8)  # an input without gradient, a frozen gate
    mlp(x).square().sum().backward()
    assert mlp.gate_proj.weight.grad is None
    assert mlp.up_proj.weight.grad is not None and mlp.down_proj.weight.grad is not None
    plain = [w.detach().clone().requires_grad_(True) for w in (mlp.up_proj.weight, mlp.down_proj.weight)]
    _direct_mlp(x, mlp.gate_proj.weight, *plain).square().sum().backward()
    torch.testing.assert_close(mlp.up_proj.weight.grad, plain[0].grad)
    torch.testing.assert_close(mlp.down_proj.weight.grad, plain[1].grad)


def test_gated_mlp_keeps_two_intermediate_sized_tensors_for_backward():
    """gate(x) and up(x): not silu(gate(x)) and the product too, as autograd through the formula would."""
    mlp = GatedMLP(8, 24)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        mlp(torch.randn(2, 4, 8, requires_grad=True))
    activations = [t for t in saved if not isinstance(t, torch.nn.Parameter)]
    assert sorted(tuple(t.shape) for t in activations) == [(2, 4, 8), (2, 4, 24), (2, 4, 24)]
