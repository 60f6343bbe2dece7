import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from e2e_helpers import STEPS, train_default  # noqa: E402


@pytest.fixture(scope="session")
def default_target():
    from torchspec.trainer.commands.default_assets import ensure_default_target

    return ensure_default_target()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """``trained_run(arch, *overrides)``: the output folder of a default run, trained once per
    session for each distinct (arch, overrides), shared by the end-to-end and engine tests."""
    runs = {}

    def get(arch: str, *overrides: str, steps: int = STEPS) -> Path:
        key = (arch, steps, overrides)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"run-{arch}")
            train_default(arch, root / "run", steps, *overrides)
            runs[key] = root / "run"
        return runs[key]

    return get


@pytest.fixture(scope="session")
def mla_target(tmp_path_factory, default_target):
    """A tiny DeepSeek-V3-style target (MLA attention, MoE) with random weights and the default
    target's vocabulary and hidden size, for the MLA serving and hidden-state tests."""
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config

    reference = AutoConfig.from_pretrained(default_target)
    layers = 8  # default aux layers [2, 4, 5] are distinct (vLLM keeps one state per layer)
    config = DeepseekV3Config(
        vocab_size=reference.vocab_size,
        hidden_size=reference.hidden_size,
        intermediate_size=256,
        num_hidden_layers=layers,
        first_k_dense_replace=layers,
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=64,
        kv_lora_rank=512,
        qk_nope_head_dim=32,
        qk_rope_head_dim=64,
        v_head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rope_scaling=None,
        bos_token_id=reference.bos_token_id,
        eos_token_id=reference.eos_token_id,
        pad_token_id=reference.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mla_target")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path
