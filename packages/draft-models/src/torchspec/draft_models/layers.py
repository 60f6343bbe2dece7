"""Building blocks shared by the draft architectures: norm, MLP and the EAGLE-3 decoder layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Eagle3DecoderLayer", "GatedMLP", "RMSNorm"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """``weight * (x / rms(x))``, normalised in fp32 so bf16 activations do not lose the
    small-variance directions. Backward keeps only ``x`` and ``1 / rms`` (autograd through the
    plain formula keeps three ``x``-sized tensors per norm, and TTT runs every norm once per step)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x32 * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(inv_rms.dtype) * inv_rms
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad_out * weight).to(inv_rms.dtype)
            # d(x / rms)/dx applied to g: (g - normed * mean(g * normed)) / rms
            grad_x = (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)) * inv_rms
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``.

    Forward reads the three projections' weights itself (:class:`_GatedMLPFunction`), so the MLP is
    one unit for sharding, not three."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GatedMLPFunction.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class _GatedMLPFunction(torch.autograd.Function):
    """The MLP keeping two ``[T, intermediate]`` tensors for backward, ``gate(x)`` and ``up(x)``:
    autograd through the plain formula keeps four (also ``silu(gate)`` and the product), and
    recomputing the MLP in backward costs three more matmuls per TTT step. Everything else backward
    needs is elementwise in those two."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight):
        gate, up = F.linear(x, gate_weight), F.linear(x, up_weight)
        ctx.save_for_backward(x, gate, up, gate_weight, up_weight, down_weight)
        return F.linear(F.silu(gate) * up, down_weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, up, gate_weight, up_weight, down_weight = ctx.saved_tensors
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad
        silu_gate = F.silu(gate)
        grad_product = grad_out @ down_weight
        grad_down = _weight_grad(grad_out, silu_gate * up) if need_down else None
        grad_up = grad_product * silu_gate
        # In place where a buffer is done with: backward runs with every TTT step's activations alive.
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_product.mul_(up), gate, grad_input=silu_gate)
        del grad_product
        grad_x = (
            torch.addmm(grad_up.flatten(0, -2) @ up_weight, grad_gate.flatten(0, -2), gate_weight).view_as(x)
            if need_x
            else None
        )
        return (
            grad_x,
            _weight_grad(grad_gate, x) if need_gate else None,
            _weight_grad(grad_up, x) if need_up else None,
            grad_down,
        )


def _weight_grad(grad_output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The gradient of ``F.linear(inputs, weight)``'s weight: ``grad_output^T @ inputs`` over all rows."""
    return grad_output.reshape(-1, grad_output.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])


class Eagle3DecoderLayer(nn.Module):
    """The single EAGLE-3 layer (``midlayer``); only the attention differs between drafts.

    The attention reads the normed token embedding and the normed recurrent hidden state side by
    side (``2 * hidden_size`` wide); the residual stream is the recurrent hidden state.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, rms_norm_eps: float, self_attn: nn.Module):
        super().__init__()
        self.hidden_norm = RMSNorm(hidden_size, rms_norm_eps)
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.mlp = GatedMLP(hidden_size, intermediate_size)

    def forward(self, input_embeds, hidden_states, mask, position_ids, cache_keys, cache_values, use_cache):
        residual = hidden_states
        attn_input = torch.cat([self.input_layernorm(input_embeds), self.hidden_norm(hidden_states)], dim=-1)
        attn_out, cache_keys, cache_values = self.self_attn(
            attn_input, mask, position_ids, cache_keys, cache_values, use_cache
        )
        hidden_states = residual + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, cache_keys, cache_values
