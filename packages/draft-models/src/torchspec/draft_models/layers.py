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
        # Normalise in fp32 so bf16 activations do not lose the small-variance directions.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
