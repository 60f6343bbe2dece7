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
    """A tiny DeepSeek-V3-style target with random weights and the default target's vocabulary and
    hidden size, for the MLA serving and hidden-state tests: MLA attention with DeepSeek-V3's layout
    scaled down, its first 3 layers dense and the other 5 MoE (4 routed experts, top-2 of one group,
    a shared expert), routed as DeepSeek-V3 routes (sigmoid scores plus a non-zero correction bias),
    and every RMSNorm weight 1 + 0.3 * N(0, 1), so that a state taken before a norm differs from one
    taken after it."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config

    reference = AutoConfig.from_pretrained(default_target)
    layers = 8  # default aux layers [2, 4, 5] are distinct (vLLM keeps one state per layer)
    config = DeepseekV3Config(
        vocab_size=reference.vocab_size,
        hidden_size=reference.hidden_size,
        intermediate_size=256,
        num_hidden_layers=layers,
        first_k_dense_replace=3,  # DeepSeek-V3's: layers 0-2 dense, 3-7 MoE
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
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
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__ == "DeepseekV3RMSNorm":
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
            elif type(module).__name__ == "DeepseekV3TopkRouter":
                # about the spread of the sigmoid scores: the bias shifts choices without deciding them
                module.e_score_correction_bias.copy_(0.05 * torch.randn_like(module.e_score_correction_bias))
    path = tmp_path_factory.mktemp("mla_target")
    model.save_pretrained(path)
    # DeepSeek-V3's own config.json carries its router's kind; transformers 5's DeepseekV3Config
    # (which always routes this way) no longer writes it, and without it vLLM builds a softmax router
    # without the correction bias and refuses the checkpoint (KeyError: ...e_score_correction_bias).
    written = json.loads((path / "config.json").read_text())
    written.update(topk_method="noaux_tc", scoring_func="sigmoid")
    (path / "config.json").write_text(json.dumps(written, indent=2))
    return path
