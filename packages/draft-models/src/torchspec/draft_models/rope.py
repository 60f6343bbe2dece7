"""Rotary position embeddings shared by every draft architecture.

Two layouts exist in the wild and the drafts need both:

* ``neox`` (Llama): the head dimension is split into two halves that rotate together.
* ``interleaved`` (DeepSeek MLA): consecutive pairs ``(0, 1), (2, 3), ...`` rotate together.

Frequency scaling follows the ``rope_scaling`` dict of Hugging Face configs: ``default``/``none``,
``linear``, ``dynamic`` (NTK-aware, recomputed from the longest position seen), ``llama3`` and
``yarn`` (with DeepSeek's ``mscale``/``mscale_all_dim`` refinement).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "RotaryEmbedding",
    "apply_rotary_interleaved",
    "apply_rotary_neox",
    "normalize_rope_scaling",
    "rope_frequencies",
    "yarn_mscale",
]

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def normalize_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Return ``rope_scaling`` with a ``rope_type`` key (transformers 4 wrote ``type``)."""
    if not rope_scaling:
        return None
    scaling = dict(rope_scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    if rope_type == "none":
        rope_type = "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.rope_type={rope_type!r} is not supported; use one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return None
    if rope_type != "dynamic" and "factor" not in scaling:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
    return scaling


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """Attention temperature correction of YaRN: ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_frequencies(dim: int, base: float, scaling: dict, max_position_embeddings: int):
    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    beta_fast = float(scaling.get("beta_fast") or 32.0)
    beta_slow = float(scaling.get("beta_slow") or 1.0)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength completes `num_rotations` turns over the original context.
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    interpolation = extrapolation / factor
    # Fast-rotating dims keep their frequency (extrapolate), slow ones are interpolated.
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)

    if scaling.get("attention_factor") is not None:
        attention_factor = float(scaling["attention_factor"])
    elif scaling.get("mscale") is not None and scaling.get("mscale_all_dim") is not None:
        attention_factor = yarn_mscale(factor, float(scaling["mscale"])) / yarn_mscale(
            factor, float(scaling["mscale_all_dim"])
        )
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    original = int(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(
        wavelen > low_freq_wavelen, inv_freq / factor, torch.where(wavelen < high_freq_wavelen, inv_freq, blended)
    )


def rope_frequencies(
    dim: int,
    base: float,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 2048,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, ``[dim // 2]``) and the factor applied to cos/sin.

    ``seq_len`` only matters for ``dynamic`` scaling, whose base grows once positions pass
    ``max_position_embeddings``.
    """
    scaling = normalize_rope_scaling(rope_scaling)
    rope_type = scaling["rope_type"] if scaling else "default"
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    attention_factor = 1.0
    if rope_type == "dynamic":
        factor = float(scaling.get("factor", 1.0))
        original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        if seq_len is not None and seq_len > original:
            base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base**exponents)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn_frequencies(dim, base, scaling, max_position_embeddings)
    else:
        inv_freq = 1.0 / (base**exponents)
        if rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type == "llama3":
            inv_freq = _llama3_frequencies(inv_freq, scaling)
    return inv_freq.float(), attention_factor


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin)`` of shape ``[batch, seq, dim]`` for the requested layout."""

    def __init__(
        self,
        dim: int,
        base: float,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
        interleaved: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.base = base
        self.rope_scaling = normalize_rope_scaling(rope_scaling)
        self.max_position_embeddings = max_position_embeddings
        self.interleaved = interleaved
        inv_freq, self.attention_factor = rope_frequencies(dim, base, self.rope_scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_inv_freq(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after materialising from the meta device."""
        inv_freq, _ = rope_frequencies(self.dim, self.base, self.rope_scaling, self.max_position_embeddings)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def _inv_freq_for(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.rope_scaling is None or self.rope_scaling["rope_type"] != "dynamic":
            return self.inv_freq
        seq_len = int(position_ids.max()) + 1
        inv_freq, _ = rope_frequencies(
            self.dim, self.base, self.rope_scaling, self.max_position_embeddings, seq_len=seq_len
        )
        return inv_freq.to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq_for(position_ids)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # [B, T, dim/2]
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat([angles, angles], dim=-1)
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, heads, T, dim]`` with the first and second halves paired."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos + rotated * sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, heads, T, dim]`` with consecutive pairs ``(2i, 2i + 1)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    return x * cos + rotated * sin
