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
    extra = (
        {}
        if config_class is LlamaEagle3Config
        else dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=16)
    )
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
    none = AutoDraftModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLMEagle3"], **BASE, "rope_scaling": {"type": "default"}}
    )
    assert none.rope_scaling is None


def test_config_errors_name_the_key():
    with pytest.raises(DraftConfigError, match="draft_vocab_size \\(200\\) exceeds vocab_size \\(100\\)"):
        LlamaEagle3Config(**BASE, draft_vocab_size=200)
    with pytest.raises(DraftConfigError, match="multiple of num_key_value_heads"):
        LlamaEagle3Config(**BASE, num_key_value_heads=3)
    with pytest.raises(DraftConfigError, match="rope_type='ntk'"):
        LlamaEagle3Config(**BASE, rope_scaling={"rope_type": "ntk", "factor": 2})
    with pytest.raises(DraftConfigError, match="lacks required keys: intermediate_size"):
        AutoDraftModelConfig.from_dict(
            {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 8, "vocab_size": 10, "num_attention_heads": 2}
        )


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
    # nothing an engine refuses (for MLA: q_lora_rank set, 512 + 64 = 576-wide latent, which vLLM serves)
    assert config.engine_refusals() == []


def test_an_mla_latent_width_vllm_lacks_is_an_engine_refusal():
    values = {**MLA, "kv_lora_rank": 128, "qk_rope_head_dim": 16}
    refusals = AutoDraftModelConfig.from_dict(values).engine_refusals()
    assert len(refusals) == 1 and "= 144" in refusals[0] and "vLLM" in refusals[0] and "512" in refusals[0]
    assert AutoDraftModelConfig.from_dict({**MLA, "kv_lora_rank": 512, "qk_rope_head_dim": 64}).engine_refusals() == []


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


LLAMA = {"architectures": ["LlamaForCausalLMEagle3"], **BASE}
MLA = {
    "architectures": ["Eagle3DeepseekV2ForCausalLM"],
    **BASE,
    "q_lora_rank": 16,
    "kv_lora_rank": 8,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
}
YARN = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    "values, expected",
    [
        # q/k/v biases: SGLang's EAGLE-3 layer has none, vLLM's adds an o_proj bias.
        ({**LLAMA, "attention_bias": True}, ["attention_bias", "SGLang", "vLLM", "set attention_bias to false"]),
        # Llama YaRN: vLLM applies mscale/mscale_all_dim and attention_factor, SGLang does not.
        (
            {**LLAMA, "rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
            ["rope_scaling.mscale:", "SGLang", "vLLM", "remove it"],
        ),
        (
            {**LLAMA, "rope_scaling": {**YARN, "mscale_all_dim": 1.0}},
            ["rope_scaling.mscale_all_dim:", "SGLang", "remove it"],
        ),
        (
            {**LLAMA, "rope_scaling": {**YARN, "attention_factor": 1.2}},
            ["rope_scaling.attention_factor:", "SGLang", "remove it"],
        ),
        ({**LLAMA, "rope_scaling": {**YARN, "attn_factor": 1.2}}, ["rope_scaling.attn_factor:", "vLLM", "remove it"]),
        (
            {**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            ["'dynamic'", "vLLM", "SGLang", "use one of: linear, llama3, yarn"],
        ),
        ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["low_freq_factor", "vLLM", "add it"]),
        (
            {**LLAMA, "rope_scaling": {**YARN, "partial_rotary_factor": 0.5}},
            ["rope_scaling.partial_rotary_factor:", "vLLM", "remove it"],
        ),
        ({**LLAMA, "partial_rotary_factor": 0.5}, ["partial_rotary_factor:", "vLLM", "remove it"]),
        (
            {**LLAMA, "rope_scaling": {**YARN, "rope_theta": 5e5}, "rope_theta": 1e4},
            ["rope_scaling.rope_theta", "keep one"],
        ),
        ({**LLAMA, "bias": True}, ["bias: True", "SGLang", "remove it"]),
        ({**LLAMA, "norm_before_residual": True}, ["norm_before_residual", "vLLM", "remove it"]),
        # MLA: both engines run any rope_scaling as DeepSeek YaRN.
        (
            {**MLA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            ["'linear'", "DeepSeek YaRN", "use one of: yarn"],
        ),
        ({**MLA, "rope_scaling": LLAMA3}, ["'llama3'", "DeepSeek YaRN", "use one of: yarn"]),
        (
            {**MLA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            ["'dynamic'", "DeepSeek YaRN", "use one of: yarn"],
        ),
        (
            {**MLA, "rope_scaling": {**YARN, "attention_factor": 1.0}},
            ["rope_scaling.attention_factor:", "vLLM", "remove it"],
        ),
        ({**MLA, "rope_scaling": {**YARN, "attn_factor": 2.0}}, ["rope_scaling.attn_factor:", "SGLang", "remove it"]),
        (
            {**MLA, "rope_scaling": {**YARN, "truncate": False}},
            ["rope_scaling.truncate:", "always truncates", "remove it"],
        ),
        ({**MLA, "fc_norm": "yes"}, ["fc_norm must be true or false", "'yes'"]),
        # MLA without query compression: both engines fuse q_a_proj with kv_a_proj_with_mqa.
        ({**MLA, "q_lora_rank": None}, ["q_lora_rank: null", "vLLM", "SGLang", "set q_lora_rank"]),
        (
            {**LLAMA, "norm_before_fc": False, "eagle_config": {"use_aux_hidden_state": True, "norm_before_fc": True}},
            ["norm_before_fc is False but eagle_config.norm_before_fc is True", "vLLM serves the latter", "keep one"],
        ),
    ],
)
def test_configs_the_engines_would_serve_differently_are_refused(values, expected):
    with pytest.raises(DraftConfigError) as err:
        AutoDraftModelConfig.from_dict(values)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    "values",
    [
        {**LLAMA, "rope_scaling": {**YARN, "truncate": False}},
        {**LLAMA, "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 8192}},
        {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0}},
        {**LLAMA, "rope_parameters": {**YARN, "rope_theta": 5e5}},
        {**LLAMA, "attention_bias": False, "bias": False},
        {**MLA, "rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0, "truncate": True}},
        {**LLAMA, "fc_norm": True, "norm_before_fc": True, "norm_output": True},
        {**MLA, "fc_norm": True, "norm_output": True},
    ],
)
def test_configs_both_engines_serve_alike_load(values):
    AutoEagle3DraftModel.from_config(AutoDraftModelConfig.from_dict(values))


def test_eagle3_1_options_default_off_and_are_read_where_vllm_reads_them():
    plain = AutoDraftModelConfig.from_dict(LLAMA)
    assert (plain.fc_norm, plain.norm_before_fc, plain.norm_output) == (False, False, False)
    # vLLM reads norm_before_fc from eagle_config first, then from the top level; fc_norm and norm_output top level.
    nested = AutoDraftModelConfig.from_dict(
        {**LLAMA, "eagle_config": {"use_aux_hidden_state": True, "norm_before_fc": True}}
    )
    assert nested.norm_before_fc and nested.to_dict()["norm_before_fc"] is True
    top = AutoDraftModelConfig.from_dict({**LLAMA, "fc_norm": True, "norm_output": True})
    assert (top.fc_norm, top.norm_before_fc, top.norm_output) == (True, False, True)
    assert {"fc_norm": True, "norm_output": True}.items() <= top.to_dict().items()


def test_norm_before_fc_on_an_mla_draft_is_an_engine_refusal():
    # vLLM 0.32's deepseek_eagle3.py builds no input_norm (only llama_eagle3.py does); the engine test
    # shows it refusing such a folder.
    config = AutoDraftModelConfig.from_dict(
        {**MLA, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "norm_before_fc": True}
    )
    refusals = config.engine_refusals()
    assert len(refusals) == 1 and "norm_before_fc" in refusals[0] and "use fc_norm" in refusals[0]
    assert AutoDraftModelConfig.from_dict({**LLAMA, "norm_before_fc": True}).engine_refusals() == []


def test_one_registry_names_every_draft_once():
    from torchspec.draft_models.config import DRAFT_CONFIG_CLASSES
    from torchspec.draft_models.draft_model import model_class_for

    names = [n for c in DRAFT_CONFIG_CLASSES for n in (c.architecture, *c.architecture_aliases)]
    assert len(names) == len(set(names)) and set(names) == set(AutoDraftModelConfig.supported_architectures)
    assert [c.kind for c in DRAFT_CONFIG_CLASSES] == ["llama", "mla"]
    for config_class in DRAFT_CONFIG_CLASSES:
        assert AutoDraftModelConfig.config_class_for_kind(config_class.kind) is config_class
        config = AutoDraftModelConfig.from_dict({**(LLAMA if config_class.kind == "llama" else MLA)})
        assert model_class_for(config).config_class is config_class
    with pytest.raises(DraftConfigError, match="unknown draft kind 'gpt'; use one of: llama, mla"):
        AutoDraftModelConfig.config_class_for_kind("gpt")
