import json
from pathlib import Path

import pytest
import torch

from torchspec.draft_models import (
    AutoDraftModelConfig,
    AutoEagle3DraftModel,
    DeepseekEagle3Config,
    DraftConfigError,
    Eagle3DeepseekV2ForCausalLM,
    LlamaEagle3Config,
    LlamaForCausalLMEagle3,
)

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "draft_models"

BASE = dict(hidden_size=32, vocab_size=100, num_attention_heads=4, intermediate_size=64)


@pytest.mark.parametrize(
    "architecture, config_class, model_class",
    [
        ("LlamaForCausalLMEagle3", LlamaEagle3Config, LlamaForCausalLMEagle3),
        ("Eagle3DeepseekV2ForCausalLM", DeepseekEagle3Config, Eagle3DeepseekV2ForCausalLM),
        ("Eagle3DeepseekV3ForCausalLM", DeepseekEagle3Config, Eagle3DeepseekV2ForCausalLM),
        ("DeepSeekForCausalLMEagle3", DeepseekEagle3Config, Eagle3DeepseekV2ForCausalLM),
    ],
)
def test_architecture_names_dispatch_to_their_draft(architecture, config_class, model_class):
    extra = {} if config_class is LlamaEagle3Config else dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=None)
    config = AutoDraftModelConfig.from_dict({"architectures": [architecture], **BASE, **extra})
    assert type(config) is config_class
    assert type(AutoEagle3DraftModel.from_config(config)) is model_class


@pytest.mark.parametrize(
    "architectures, expected",
    [
        (None, "missing or empty"),
        ([], "missing or empty"),
        (["LlamaForCausalLMEagle3", "Eagle3DeepseekV2ForCausalLM"], "exactly one"),
        (["LlamaForCausalLM"], "unknown draft architecture 'LlamaForCausalLM'"),
    ],
)
def test_bad_architectures_name_the_supported_ones(architectures, expected):
    with pytest.raises(DraftConfigError) as err:
        AutoDraftModelConfig.from_dict({"architectures": architectures, **BASE})
    assert expected in str(err.value)
    assert "LlamaForCausalLMEagle3" in str(err.value) and "Eagle3DeepseekV2ForCausalLM" in str(err.value)


def test_rope_scaling_accepts_type_and_rope_type_and_rope_parameters():
    old = AutoDraftModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLMEagle3"], **BASE, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    new = AutoDraftModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLMEagle3"], **BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    )
    v5 = AutoDraftModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLMEagle3"],
            **BASE,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
        }
    )
    assert old.rope_scaling == new.rope_scaling == v5.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert v5.rope_theta == 5e5
    none = AutoDraftModelConfig.from_dict({"architectures": ["LlamaForCausalLMEagle3"], **BASE, "rope_scaling": {"type": "default"}})
    assert none.rope_scaling is None


def test_config_errors_name_the_key():
    with pytest.raises(DraftConfigError, match="draft_vocab_size \\(200\\) exceeds vocab_size \\(100\\)"):
        LlamaEagle3Config(**BASE, draft_vocab_size=200)
    with pytest.raises(DraftConfigError, match="multiple of num_key_value_heads"):
        LlamaEagle3Config(**BASE, num_key_value_heads=3)
    with pytest.raises(DraftConfigError, match="rope_type='ntk'"):
        LlamaEagle3Config(**BASE, rope_scaling={"rope_type": "ntk", "factor": 2})
    with pytest.raises(DraftConfigError, match="lacks required keys: intermediate_size"):
        AutoDraftModelConfig.from_dict({"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 8, "vocab_size": 10, "num_attention_heads": 2})


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 8,\n  oops\n}')
    with pytest.raises(DraftConfigError, match=r"config.json:3: invalid JSON"):
        AutoDraftModelConfig.from_file(path)


def test_unknown_keys_survive_a_round_trip(tmp_path):
    config = AutoDraftModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLMEagle3"], **BASE, "eagle_config": {"use_aux_hidden_state": True}}
    )
    config.save_pretrained(tmp_path)
    again = AutoDraftModelConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert again.to_dict()["eagle_config"] == {"use_aux_hidden_state": True}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_reference_configs_load(name):
    config = AutoDraftModelConfig.from_file(CONFIGS / name)
    assert config.num_hidden_layers == 1 and config.draft_vocab_size == 32000


def _count(config) -> int:
    with torch.device("meta"):
        model = AutoEagle3DraftModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_qwen3_8b_mla_parameter_counts():
    values = json.loads((CONFIGS / "qwen3-8b-eagle3-mla.json").read_text())
    assert _count(AutoDraftModelConfig.from_dict({**values, "draft_vocab_size": 151936})) == 1_493_714_944
    assert _count(AutoDraftModelConfig.from_dict({**values, "draft_vocab_size": 32000})) == 1_002_457_088


def test_qwen3_8b_llama_parameter_count_matches_its_formula():
    config = AutoDraftModelConfig.from_file(CONFIGS / "qwen3-8b-eagle3-llama.json")
    h, i, v, dv = 4096, 12288, 151936, 32000
    attention = 2 * h * (32 * 128) + 2 * (2 * h * 8 * 128) + 32 * 128 * h
    expected = 3 * h * h + attention + 3 * h * i + 4 * h + v * h + dv * h
    assert _count(config) == expected
