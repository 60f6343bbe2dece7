"""Rotary position embeddings shared by every draft architecture.

Two layouts exist in the wild and the drafts need both:

* ``neox`` (Llama): the head dimension is split into two halves that rotate together.
* ``interleaved`` (DeepSeek MLA): consecutive pairs ``(0, 1), (2, 3), ...`` rotate together.

Frequency scaling follows the ``rope_scaling`` dict of Hugging Face configs: ``default``/``none``,
``linear``, ``dynamic`` (NTK-aware, recomputed from the longest position seen), ``llama3`` and
``yarn``. YaRN's cos/sin factor comes in two flavours, because the engines run it two ways:

* Llama drafts (vLLM's ``YaRNScalingRotaryEmbedding``, transformers): ``attention_factor`` if given,
  else ``mscale / mscale_all_dim`` when both are set and non-zero, else ``0.1 * ln(factor) + 1``;
* MLA drafts (``deepseek_yarn``: both engines' ``DeepseekScalingRotaryEmbedding``, whatever the
  config's type): ``mscale / mscale_all_dim`` with the defaults ``mscale = 1``, ``mscale_all_dim = 0``.

Which keys a draft config may carry is decided in ``config.py`` (only what both engines read alike).
Frequencies are always float32 values computed from the config, whatever dtype the weights have.
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


def _yarn_attention_factor(scaling: dict, deepseek_yarn: bool) -> float:
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if deepseek_yarn:
        return yarn_mscale(factor, 1.0 if mscale is None else float(mscale)) / yarn_mscale(
            factor, 0.0 if mscale_all_dim is None else float(mscale_all_dim)
        )
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if mscale and mscale_all_dim:  # truthiness, as vLLM and transformers test it
        return yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
    return yarn_mscale(factor)


def _yarn_frequencies(dim: int, base: float, scaling: dict, max_position_embeddings: int) -> torch.Tensor:
    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    beta_fast = float(scaling.get("beta_fast") or 32.0)
    beta_slow = float(scaling.get("beta_slow") or 1.0)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength completes `num_rotations` turns over the original context.
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    interpolation = extrapolation / factor
    # Fast-rotating dims keep their frequency (extrapolate), slow ones are interpolated.
    return interpolation * ramp + extrapolation * (1 - ramp)


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict, max_position_embeddings: int) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    # Without the key, transformers (and so both engines) fill in max_position_embeddings.
    original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
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
    deepseek_yarn: bool = False,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32 on the CPU, ``[dim // 2]``) and the factor applied to cos/sin.

    ``seq_len`` only matters for ``dynamic`` scaling, whose base grows once positions pass
    ``max_position_embeddings``. ``deepseek_yarn`` picks the MLA flavour of YaRN's cos/sin factor
    (see the module docstring).
    """
    scaling = normalize_rope_scaling(rope_scaling) or {}
    rope_type = scaling["rope_type"] if scaling else "default"
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
    attention_factor = 1.0
    if rope_type == "dynamic":
        factor = float(scaling.get("factor", 1.0))
        original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        if seq_len is not None and seq_len > original:
            base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base**exponents)
    elif rope_type == "yarn":
        inv_freq = _yarn_frequencies(dim, base, scaling, max_position_embeddings)
        attention_factor = _yarn_attention_factor(scaling, deepseek_yarn)
    else:
        inv_freq = 1.0 / (base**exponents)
        if rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type == "llama3":
            inv_freq = _llama3_frequencies(inv_freq, scaling, max_position_embeddings)
    return inv_freq.float(), attention_factor


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin)`` of shape ``[batch, seq, dim]`` for the requested layout.

    ``inv_freq`` is a float32 buffer (it follows the module's device) that no cast changes: in bf16
    the frequencies are off by up to 2**-9 relative, i.e. radians of angle by position 4000.
    """

    inv_freq: torch.Tensor  # a buffer (register_buffer)

    def __init__(
        self,
        dim: int,
        base: float,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
        interleaved: bool = False,
        deepseek_yarn: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.base = base
        self.rope_scaling = normalize_rope_scaling(rope_scaling)
        self.max_position_embeddings = max_position_embeddings
        self.interleaved = interleaved
        self.deepseek_yarn = deepseek_yarn
        inv_freq, self.attention_factor = self._frequencies()
        # Built under `torch.device("meta")` (from_pretrained) the buffer is meta like the weights.
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def _frequencies(self, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        return rope_frequencies(
            self.dim, self.base, self.rope_scaling, self.max_position_embeddings, seq_len, self.deepseek_yarn
        )

    def reset_inv_freq(self) -> None:
        """Recompute the (non-persistent) fp32 frequencies on the buffer's current device."""
        self.inv_freq = self._frequencies()[0].to(self.inv_freq.device)

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)`, `.half()`, `.to_empty()` and FSDP materialisation all reach the buffer
        # through here; recomputing afterwards keeps exact fp32 values on the new device.
        super()._apply(fn, recurse)
        self.reset_inv_freq()
        return self

    def _inv_freq_for(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.rope_scaling is None or self.rope_scaling["rope_type"] != "dynamic":
            return self.inv_freq
        seq_len = int(position_ids.max()) + 1
        return self._frequencies(seq_len)[0].to(self.inv_freq.device)

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
