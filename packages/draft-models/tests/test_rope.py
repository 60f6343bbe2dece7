import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from torchspec.draft_models.deepseek import mla_softmax_scale
from torchspec.draft_models.rope import (
    RotaryEmbedding,
    apply_rotary_interleaved,
    apply_rotary_neox,
    rope_frequencies,
)

from draft_helpers import tiny_mla_config


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
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 128, "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5},
    ],
)
def test_frequencies_match_transformers(scaling):
    dim, theta, max_pos = 64, 10000.0, 4096
    hf = LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=dim, max_position_embeddings=max_pos,
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
        rope_scaling={"rope_type": "yarn", "factor": 64.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0}
    )
    mscale = 0.1 * 1.0 * math.log(64.0) + 1.0
    assert mla_softmax_scale(config) == pytest.approx(mscale**2 / math.sqrt(8 + 4))
    assert mla_softmax_scale(tiny_mla_config(rope_scaling=None)) == pytest.approx(1 / math.sqrt(12))
    # mscale == mscale_all_dim: cos/sin are not rescaled, only the softmax is.
    assert RotaryEmbedding(4, 1e4, config.rope_scaling, 64, interleaved=True).attention_factor == pytest.approx(1.0)
