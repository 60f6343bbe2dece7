"""Llama-style EAGLE-3 draft: grouped-query attention with an explicit ``head_dim`` and neox RoPE."""

from __future__ import annotations

from typing import cast

from torch import nn

from torchspec.draft_models.config import Eagle3DraftConfig, LlamaEagle3Config
from torchspec.draft_models.draft_model import Eagle3DraftModel, register_draft_model
from torchspec.draft_models.rope import RotaryEmbedding, apply_rotary_neox
from torchspec.draft_models.ttt_attention import ttt_attention

__all__ = ["LlamaEagle3Attention", "LlamaForCausalLMEagle3"]


class LlamaEagle3Attention(nn.Module):
    def __init__(self, config: LlamaEagle3Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        # Both are ints once LlamaEagle3Config's validation ran (None there means the default).
        self.num_kv_heads = cast(int, config.num_key_value_heads)
        self.head_dim = cast(int, config.head_dim)
        in_features = 2 * config.hidden_size  # normed embedding and normed hidden state side by side
        # No biases: LlamaEagle3Config refuses attention_bias, which SGLang and vLLM serve differently.
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(
            self.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings, interleaved=False
        )
        self.scale = self.head_dim**-0.5

    def reset_rotary_buffers(self) -> None:
        self.rotary.reset_inv_freq()

    def forward(self, x, mask, position_ids, cache_keys, cache_values, use_cache):
        batch, seq_len, _ = x.shape
        query = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(position_ids, query.dtype)
        query, key = apply_rotary_neox(query, cos, sin), apply_rotary_neox(key, cos, sin)
        out, cache_keys, cache_values = ttt_attention(
            query, key, value, mask, cache_keys, cache_values, use_cache, self.scale
        )
        out = out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(out), cache_keys, cache_values


@register_draft_model
class LlamaForCausalLMEagle3(Eagle3DraftModel):
    config_class = LlamaEagle3Config

    def _build_attention(self, config: Eagle3DraftConfig) -> nn.Module:
        return LlamaEagle3Attention(cast(LlamaEagle3Config, config))  # config_class
