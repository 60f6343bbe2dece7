"""Shared building blocks against their direct formulas."""

import pytest
import torch

from torchspec.draft_models.layers import RMSNorm


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


def test_rms_norm_in_bf16_normalises_in_fp32_and_returns_bf16():
    torch.manual_seed(0)
    norm = RMSNorm(64).to(torch.bfloat16)
    x = (torch.randn(4, 64) * 1e-3).to(torch.bfloat16).requires_grad_(True)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.bfloat16
