import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from torchspec.draft_models import AutoEagle3DraftModel
from torchspec.draft_models.deepseek import mla_softmax_scale
from torchspec.draft_models.rope import (
    RotaryEmbedding,
    apply_rotary_interleaved,
    apply_rotary_neox,
    rope_frequencies,
)

from draft_helpers import build_draft, tiny_llama_config, tiny_mla_config


def _complex_rotation(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, pairs) -> torch.Tensor:
    """Rotate with complex numbers: pair (a, b) -> (a + ib) * e^{i * pos * freq}."""
    real, imag = pairs(x)
    angle = positions[:, None, :, None].double() * inv_freq.double()
    rotated = torch.complex(real.double(), imag.double()) * torch.polar(torch.ones_like(angle), angle)
    return rotated


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotation_matches_complex_multiplication(interleaved):
    dim, positions = 8, torch.tensor([[0, 3, 7, 20]])
    x = torch.randn(1, 2, 4, dim, dtype=torch.float64)
    rotary = RotaryEmbedding(dim, base=10000.0, interleaved=interleaved)
    cos, sin = rotary(positions, torch.float64)
    if interleaved:
        out = apply_rotary_interleaved(x, cos, sin)
        expected = _complex_rotation(x, positions, rotary.inv_freq, lambda t: (t[..., 0::2], t[..., 1::2]))
        got = torch.complex(out[..., 0::2], out[..., 1::2])
    else:
        out = apply_rotary_neox(x, cos, sin)
        half = dim // 2
        expected = _complex_rotation(x, positions, rotary.inv_freq, lambda t: (t[..., :half], t[..., half:]))
        got = torch.complex(out[..., :half], out[..., half:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_interleaved_rotation_preserves_relative_position():
    dim = 8
    rotary = RotaryEmbedding(dim, base=100.0, interleaved=True)
    q, k = torch.randn(1, 1, 1, dim), torch.randn(1, 1, 1, dim)

    def score(pq, pk):
        cq, sq = rotary(torch.tensor([[pq]]), torch.float32)
        ck, sk = rotary(torch.tensor([[pk]]), torch.float32)
        return (apply_rotary_interleaved(q, cq, sq) * apply_rotary_interleaved(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "truncate": False},
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
    ],
)
def test_frequencies_match_transformers(scaling):
    dim, theta, max_pos = 64, 10000.0, 4096
    hf = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        head_dim=dim,
        max_position_embeddings=max_pos,
        rope_parameters={**scaling, "rope_theta": theta},
    )
    expected_freq, expected_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    inv_freq, factor = rope_frequencies(dim, theta, scaling, max_pos)
    torch.testing.assert_close(inv_freq, expected_freq.float(), rtol=1e-5, atol=1e-9)
    assert factor == pytest.approx(expected_factor)


def test_dynamic_ntk_grows_the_base_past_the_trained_length():
    dim, theta, max_pos, factor = 16, 10000.0, 128, 2.0
    short, _ = rope_frequencies(dim, theta, {"rope_type": "dynamic", "factor": factor}, max_pos, seq_len=100)
    long, _ = rope_frequencies(dim, theta, {"rope_type": "dynamic", "factor": factor}, max_pos, seq_len=512)
    plain = 1.0 / theta ** (torch.arange(0, dim, 2).double() / dim)
    torch.testing.assert_close(short, plain.float())
    base = theta * ((factor * 512 / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    torch.testing.assert_close(long, (1.0 / base ** (torch.arange(0, dim, 2).double() / dim)).float())


def test_yarn_softmax_scale_of_mla():
    config = tiny_mla_config(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 64.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    mscale = 0.1 * 1.0 * math.log(64.0) + 1.0
    assert mla_softmax_scale(config) == pytest.approx(mscale**2 / math.sqrt(8 + 4))
    assert mla_softmax_scale(tiny_mla_config(rope_scaling=None)) == pytest.approx(1 / math.sqrt(12))
    # mscale == mscale_all_dim: cos/sin are not rescaled, only the softmax is.
    assert RotaryEmbedding(4, 1e4, config.rope_scaling, 64, interleaved=True).attention_factor == pytest.approx(1.0)


# --- what the engines compute, written out one frequency at a time ---------------------------------


def _m(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _engine_rope(position: int, dim: int, theta: float, scaling: dict | None, max_position: int, mla: bool = False):
    """``(angles, cos/sin factor)`` at ``position`` as vLLM 0.32's get_rope builds them for a Llama draft
    (Linear/Llama3/YaRNScalingRotaryEmbedding) or, with ``mla``, for an MLA draft (any rope_scaling
    becomes DeepseekScalingRotaryEmbedding: mscale defaults 1, mscale_all_dim 0, always truncated).
    Missing original_max_position_embeddings is max_position_embeddings, as transformers fills it in."""
    freqs = [theta ** (-2 * i / dim) for i in range(dim // 2)]
    s = scaling or {"rope_type": "default"}
    kind = s["rope_type"]
    original = s.get("original_max_position_embeddings", max_position)
    if kind == "default":
        return [position * f for f in freqs], 1.0
    if kind == "linear":
        return [position / s["factor"] * f for f in freqs], 1.0
    if kind == "llama3":
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        scaled = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < original / high:
                scaled.append(f)
            elif wavelen > original / low:
                scaled.append(f / s["factor"])
            else:
                smooth = (original / wavelen - low) / (high - low)
                scaled.append((1 - smooth) * f / s["factor"] + smooth * f)
        return [position * f for f in scaled], 1.0
    assert kind == "yarn"
    factor = s["factor"]

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast", 32)), correction_dim(s.get("beta_slow", 1))
    if mla or s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    angles = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        angles.append(position * (f / factor * ramp + f * (1 - ramp)))
    if mla:
        return angles, _m(factor, s.get("mscale", 1.0)) / _m(factor, s.get("mscale_all_dim", 0.0))
    return angles, _m(factor)  # a Llama draft config admits neither attention_factor nor the mscale pair


def _expected_cos_sin(angles, factor, interleaved):
    cos = torch.tensor([math.cos(a) * factor for a in angles], dtype=torch.float64)
    sin = torch.tensor([math.sin(a) * factor for a in angles], dtype=torch.float64)
    if interleaved:
        return cos.repeat_interleave(2), sin.repeat_interleave(2)
    return torch.cat([cos, cos]), torch.cat([sin, sin])


POSITIONS = [0, 1, 7, 63, 500, 4000]


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        {"rope_type": "yarn", "factor": 8.0},
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "truncate": False},
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 48,
            "beta_fast": 8.0,
            "beta_slow": 2.0,
        },
    ],
    ids=lambda s: (
        "none" if s is None else "-".join(f"{k}={v}" for k, v in s.items() if k != "rope_type") + f"-{s['rope_type']}"
    ),
)
def test_llama_draft_rope_is_vllms(scaling):
    """Every rope_scaling a Llama draft config accepts gives the cos/sin of vLLM's Llama EAGLE-3 path."""
    config = tiny_llama_config(head_dim=16, rope_theta=10000.0, max_position_embeddings=128, rope_scaling=scaling)
    rotary = AutoEagle3DraftModel.from_config(config).midlayer.self_attn.rotary
    cos, sin = rotary(torch.tensor([POSITIONS]), torch.float32)
    for row, position in enumerate(POSITIONS):
        angles, factor = _engine_rope(position, 16, 10000.0, scaling, 128)
        expected_cos, expected_sin = _expected_cos_sin(angles, factor, interleaved=False)
        torch.testing.assert_close(cos[0, row].double(), expected_cos, rtol=0, atol=2e-3)
        torch.testing.assert_close(sin[0, row].double(), expected_sin, rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale_all_dim": 1.0},
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 48,
            "mscale": 0.707,
            "beta_fast": 8.0,
        },
    ],
    ids=["none", "deepseek-v3", "no-mscale", "mscale_all_dim-only", "mscale-only"],
)
def test_mla_draft_rope_and_softmax_scale_are_the_engines_deepseek_yarn(scaling):
    config = tiny_mla_config(qk_rope_head_dim=16, rope_theta=10000.0, max_position_embeddings=128, rope_scaling=scaling)
    attention = AutoEagle3DraftModel.from_config(config).midlayer.self_attn
    cos, sin = attention.rotary(torch.tensor([POSITIONS]), torch.float32)
    for row, position in enumerate(POSITIONS):
        angles, factor = _engine_rope(position, 16, 10000.0, scaling, 128, mla=True)
        expected_cos, expected_sin = _expected_cos_sin(angles, factor, interleaved=True)
        torch.testing.assert_close(cos[0, row].double(), expected_cos, rtol=0, atol=2e-3)
        torch.testing.assert_close(sin[0, row].double(), expected_sin, rtol=0, atol=2e-3)
    # DeepseekV2MLAAttention: qk_head_dim**-0.5, times m(mscale_all_dim or 0)**2 under rope_scaling.
    mscale = _m(scaling["factor"], scaling.get("mscale_all_dim", 0.0)) if scaling else 1.0
    assert attention.scale == pytest.approx((8 + 16) ** -0.5 * mscale**2)


def _cast_by_from_pretrained(model, tmp_path):
    model.save_pretrained(tmp_path / "fp32", dtype=torch.float32)
    return AutoEagle3DraftModel.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)


def _materialised_from_meta(model, tmp_path):
    with torch.device("meta"):
        meta = AutoEagle3DraftModel.from_config(model.config)
    return meta.to_empty(device="cpu").to(torch.bfloat16)


@pytest.mark.parametrize(
    "make_bf16",
    [
        _cast_by_from_pretrained,
        lambda model, _: model.to(torch.bfloat16),
        lambda model, _: model.half(),
        _materialised_from_meta,
    ],
    ids=["from_pretrained-dtype", "to-bfloat16", "half", "meta-to_empty"],
)
def test_low_precision_weights_keep_fp32_frequencies(draft_kind, make_bf16, tmp_path):
    """cos/sin at position 4000 of a bf16 draft equal cos(pos * theta^(-2i/d)) up to bf16 rounding of
    the output (bf16 frequencies would be off by radians there)."""
    if draft_kind == "llama":
        model, dim = build_draft("llama", head_dim=16, rope_theta=10000.0), 16
    else:
        model, dim = build_draft("mla", qk_rope_head_dim=16, rope_theta=10000.0, rope_scaling=None), 16
    model = make_bf16(model, tmp_path)
    assert model.fc.weight.dtype in (torch.bfloat16, torch.float16)
    rotary = model.midlayer.self_attn.rotary
    assert rotary.inv_freq.dtype == torch.float32
    position = 4000
    cos, sin = rotary(torch.tensor([[position]]), model.fc.weight.dtype)
    angles = [position * 10000.0 ** (-2 * i / dim) for i in range(dim // 2)]
    expected_cos, expected_sin = _expected_cos_sin(angles, 1.0, interleaved=draft_kind == "mla")
    torch.testing.assert_close(cos[0, 0].double(), expected_cos, rtol=0, atol=5e-3)
    torch.testing.assert_close(sin[0, 0].double(), expected_sin, rtol=0, atol=5e-3)
