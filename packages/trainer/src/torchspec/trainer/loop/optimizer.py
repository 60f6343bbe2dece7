"""The optimizer: AdamW over the draft's trainable parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["build_optimizer"]

# torch has a fused AdamW kernel for these devices: one pass over each tensor, no per-parameter
# temporaries (the for-loop implementation allocates two lm_head-sized buffers per step).
_FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    params = list(params)
    fused = bool(params) and all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
