"""DeepSeek MLA EAGLE-3 draft: multi-head latent attention as in DeepSeek-V2/V3.

    q           = q_b_proj(q_a_layernorm(q_a_proj(x)))
    latent, k_pe = split(kv_a_proj_with_mqa(x))              one rope key shared by all heads
    k_nope, v   = split(kv_b_proj(kv_a_layernorm(latent)))
    scores      = [q_nope, rope(q_pe)] . [k_nope, rope(k_pe)] * softmax_scale

RoPE rotates interleaved pairs of the ``qk_rope_head_dim`` slice only. YaRN is DeepSeek's, as both
engines run it for MLA drafts (``deepseek_yarn``): cos/sin carry ``m(mscale) / m(mscale_all_dim)``
and the softmax scale ``m(mscale_all_dim)**2``, where ``m(x) = 0.1 * x * ln(factor) + 1`` and the
keys default to ``mscale = 1``, ``mscale_all_dim = 0``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from torchspec.draft_models.config import DeepseekEagle3Config, Eagle3DraftConfig
from torchspec.draft_models.draft_model import Eagle3DraftModel, register_draft_model
from torchspec.draft_models.layers import RMSNorm
from torchspec.draft_models.rope import RotaryEmbedding, apply_rotary_interleaved, yarn_mscale
from torchspec.draft_models.ttt_attention import ttt_attention

__all__ = ["DeepseekMLAttention", "Eagle3DeepseekV2ForCausalLM", "mla_softmax_scale"]


def mla_softmax_scale(config: DeepseekEagle3Config) -> float:
    """``qk_head_dim**-0.5``, times ``m(mscale_all_dim)**2`` under YaRN (vLLM's and SGLang's MLA scale)."""
    scale = config.qk_head_dim**-0.5
    scaling = config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "yarn":
        mscale = yarn_mscale(float(scaling["factor"]), float(scaling.get("mscale_all_dim") or 0.0))
        scale = scale * mscale * mscale
    return scale


class DeepseekMLAttention(nn.Module):
    def __init__(self, config: DeepseekEagle3Config):
        super().__init__()
        in_features = 2 * config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        qk_head_dim = config.qk_head_dim
        self.q_a_proj = nn.Linear(in_features, config.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(in_features, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            config.kv_lora_rank, self.num_heads * (config.qk_nope_head_dim + config.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * config.v_head_dim, config.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(
            config.qk_rope_head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.max_position_embeddings,
            interleaved=True,
            deepseek_yarn=True,
        )
        self.scale = mla_softmax_scale(config)

    def reset_rotary_buffers(self) -> None:
        self.rotary.reset_inv_freq()

    def forward(self, x, mask, position_ids, cache_keys, cache_values, use_cache):
        batch, seq_len, _ = x.shape
        heads = self.num_heads
        query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(batch, seq_len, heads, -1).transpose(1, 2)
        q_nope, q_pe = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(batch, seq_len, heads, -1).transpose(1, 2)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        cos, sin = self.rotary(position_ids, query.dtype)
        q_pe = apply_rotary_interleaved(q_pe, cos, sin)
        k_pe = apply_rotary_interleaved(k_pe.unsqueeze(1), cos, sin)  # one key for all heads

        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, k_pe.expand(-1, heads, -1, -1)], dim=-1)
        out, cache_keys, cache_values = ttt_attention(
            query, key, value.contiguous(), mask, cache_keys, cache_values, use_cache, self.scale
        )
        out = out.transpose(1, 2).reshape(batch, seq_len, heads * self.v_head_dim)
        return self.o_proj(out), cache_keys, cache_values


# DeepSeekForCausalLMEagle3 (written by older TorchSpec versions, registered by neither engine) only
# loads; the converter exports the engines' name.
@register_draft_model
class Eagle3DeepseekV2ForCausalLM(Eagle3DraftModel):
    config_class = DeepseekEagle3Config

    def _build_attention(self, config: Eagle3DraftConfig) -> nn.Module:
        return DeepseekMLAttention(cast(DeepseekEagle3Config, config))  # config_class
