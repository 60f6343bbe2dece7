"""The optimizer the trainer builds."""

import torch

from torchspec.trainer.loop.optimizer import build_optimizer


def _params(seed):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_adamw_is_fused_on_cpu_and_steps_like_the_for_loop_implementation():
    fused_params, loop_params = _params(0), _params(0)
    fused = build_optimizer(fused_params, 1e-2, (0.9, 0.95), 0.1)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        fused.step()
        loop.step()
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
