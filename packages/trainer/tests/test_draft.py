import json
import math

import pytest
import torch

from torchspec.data import VocabMapping
from torchspec.draft_models import AutoEagle3DraftModel, DeepseekEagle3Config, Eagle3Model, LlamaEagle3Config
from torchspec.trainer.config import ConfigError, ModelConfig
from torchspec.trainer.loop.draft import (
    build_draft,
    check_draft_against_target,
    draft_config_from_target,
    resolve_draft_config,
)
from torchspec.trainer.targets.in_process import TargetModel

from trainer_test_helpers import VOCAB, tiny_qwen3


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_qwen3(num_layers=6))


class FakeTokenizer:
    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


def test_generated_llama_draft_has_the_targets_shapes(target):
    config = resolve_draft_config(ModelConfig(), target.config)
    assert isinstance(config, LlamaEagle3Config) and config.architectures == ["LlamaForCausalLMEagle3"]
    hf = target.config
    assert (
        config.hidden_size,
        config.target_hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
        config.draft_vocab_size,
    ) == (
        hf.hidden_size,
        hf.hidden_size,
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim,
        hf.intermediate_size,
        hf.vocab_size,
        hf.vocab_size,
    )
    assert config.rope_theta == hf.rope_parameters["rope_theta"] and config.num_hidden_layers == 1


def test_generated_mla_draft_trains_a_step(target):
    config = resolve_draft_config(ModelConfig(draft_architecture="mla", draft_vocab_size=40), target.config)
    assert isinstance(config, DeepseekEagle3Config) and config.draft_vocab_size == 40
    mapping = VocabMapping.from_target_ids(torch.arange(0, 80, 2), VOCAB)
    draft = build_draft(config, target, mapping)
    assert torch.equal(draft.draft_to_target_ids(), torch.arange(0, 80, 2))
    ids = torch.randint(0, VOCAB, (2, 9))
    out = target(ids)
    mask = torch.ones_like(ids)
    result = Eagle3Model(draft, length=3)(
        ids, out.aux_hidden_states, mask, target_hidden=out.final_hidden, target_head_weight=target.lm_head_weight
    )
    result.total_loss().backward()
    assert draft.fc.weight.grad is not None and draft.embed_tokens.weight.grad is None


def test_generated_mla_draft_is_one_vllm_serves(target):
    """q_lora_rank set (both engines fuse it with kv_a_proj_with_mqa) and DeepSeek-V3's 512 + 64 latent,
    the width vLLM's MLA kernels serve (integration_tests/test_engine.py has vLLM serve it)."""
    config = resolve_draft_config(ModelConfig(draft_architecture="mla"), target.config)
    assert config.q_lora_rank == min(1536, target.config.hidden_size)
    assert (config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim) == (512, 64, target.config.head_dim)
    assert config.engine_refusals() == []


def test_an_mla_target_gives_its_latent_dimensions_to_the_draft():
    from transformers import DeepseekV3Config

    deepseek = DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=VOCAB,
        q_lora_rank=48,
        kv_lora_rank=448,
        qk_nope_head_dim=16,
        qk_rope_head_dim=64,
        v_head_dim=24,
        num_hidden_layers=4,
        rope_scaling=None,
        dtype="float16",
    )
    values = draft_config_from_target(deepseek, "mla")
    assert values["torch_dtype"] == "float16"  # the engines run the draft in the target's dtype
    assert {
        k: values[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    } == dict(q_lora_rank=48, kv_lora_rank=448, qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=24)


def test_a_draft_config_an_engine_refuses_stops_the_run_before_step_one(tmp_path, target):
    values = draft_config_from_target(target.config, "mla")
    values.update(kv_lora_rank=128, qk_rope_head_dim=16)
    path = tmp_path / "narrow.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=r"narrow.json: kv_lora_rank \+ qk_rope_head_dim = 144: vLLM"):
        resolve_draft_config(ModelConfig(draft_config=str(path)), target.config)
    values.update(kv_lora_rank=512, qk_rope_head_dim=64, q_lora_rank=None)
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="q_lora_rank: null cannot be served"):
        resolve_draft_config(ModelConfig(draft_config=str(path)), target.config)


def test_draft_config_file_and_vocab_override(tmp_path, target):
    values = draft_config_from_target(target.config)
    path = tmp_path / "draft.json"
    path.write_text(json.dumps(values))
    config = resolve_draft_config(ModelConfig(draft_config=str(path), draft_vocab_size=32), target.config)
    assert config.draft_vocab_size == 32 and config.is_vocab_pruned
    with pytest.raises(ConfigError, match=r"model.draft_config .*nope.json does not exist"):
        resolve_draft_config(ModelConfig(draft_config=str(tmp_path / "nope.json")), target.config)
    path.write_text("{\n  'bad'")
    with pytest.raises(ConfigError, match=r"draft.json:2: invalid JSON"):
        resolve_draft_config(ModelConfig(draft_config=str(path)), target.config)
    with pytest.raises(ConfigError, match="draft_vocab_size .* exceeds vocab_size"):
        resolve_draft_config(ModelConfig(draft_vocab_size=VOCAB + 1), target.config)


@pytest.mark.parametrize(
    "model, expected",
    [
        (ModelConfig(), (False, False, False)),
        (ModelConfig(eagle3_1=True), (True, False, True)),
        (ModelConfig(eagle3_1=True, norm_before_fc=True), (True, True, True)),
        (ModelConfig(fc_norm=True), (True, False, False)),
        (ModelConfig(norm_output=True, draft_architecture="mla"), (False, False, True)),
    ],
)
def test_eagle3_1_options_reach_the_draft_config(target, model, expected):
    config = resolve_draft_config(model, target.config)
    assert (config.fc_norm, config.norm_before_fc, config.norm_output) == expected


def test_eagle3_1_options_override_a_draft_config_file_and_conflicts_are_errors(tmp_path, target):
    path = tmp_path / "draft.json"
    path.write_text(json.dumps({**draft_config_from_target(target.config), "fc_norm": True}))
    assert resolve_draft_config(ModelConfig(draft_config=str(path)), target.config).fc_norm
    assert not resolve_draft_config(ModelConfig(draft_config=str(path), fc_norm=False), target.config).fc_norm
    with pytest.raises(
        ConfigError, match="model.eagle3_1=true turns on model.norm_output; remove model.norm_output=false"
    ):
        resolve_draft_config(ModelConfig(eagle3_1=True, norm_output=False), target.config)
    # vLLM's DeepSeek EAGLE-3 draft has no input_norm: the run stops before step 1
    with pytest.raises(ConfigError, match="norm_before_fc: true: vLLM's DeepSeek EAGLE-3 draft"):
        resolve_draft_config(ModelConfig(draft_architecture="mla", norm_before_fc=True), target.config)


def test_embedding_is_the_targets_and_frozen(target):
    draft = build_draft(resolve_draft_config(ModelConfig(), target.config), target)
    assert torch.equal(draft.embed_tokens.weight, target.embed_tokens_weight)
    assert not draft.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError, match="needs a vocab mapping"):
        build_draft(resolve_draft_config(ModelConfig(draft_vocab_size=10), target.config), target)


def test_mismatches_with_the_target_are_one_line_errors(target):
    base = draft_config_from_target(target.config)
    wide = LlamaEagle3Config.from_dict({**base, "target_hidden_size": 128})
    with pytest.raises(
        ConfigError, match="target_hidden_size=128 but the target's hidden_size is 64; set target_hidden_size to 64"
    ):
        check_draft_against_target(wide, target, FakeTokenizer(VOCAB), "d.json")
    other_vocab = LlamaEagle3Config.from_dict({**base, "vocab_size": 200, "draft_vocab_size": 200})
    with pytest.raises(ConfigError, match=f"vocab_size=200 but the target's lm_head has {VOCAB} rows"):
        check_draft_against_target(other_vocab, target, FakeTokenizer(VOCAB), "d.json")
    good = LlamaEagle3Config.from_dict(base)
    with pytest.raises(ConfigError, match=f"tokenizer has {VOCAB + 5} tokens but the target's vocabulary has {VOCAB}"):
        check_draft_against_target(good, target, FakeTokenizer(VOCAB + 5), "d.json")
    check_draft_against_target(good, target, FakeTokenizer(VOCAB - 10), "d.json")  # padded target vocab: fine


def test_llama_draft_of_a_deepseek_target_drops_the_mscale_pair():
    """SGLang's Llama YaRN ignores mscale/mscale_all_dim (vLLM's applies them): the generated Llama draft
    leaves them out and so trains what both engines serve, cos/sin scaled by 0.1 * ln(factor) + 1."""
    from transformers import DeepseekV3Config

    yarn = {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    target_config = DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=2560,
        rope_scaling=dict(yarn),
    )
    config = resolve_draft_config(ModelConfig(), target_config)
    assert isinstance(config, LlamaEagle3Config)
    assert config.rope_scaling["factor"] == 40.0 and not {"mscale", "mscale_all_dim"} & set(config.rope_scaling)
    rotary = AutoEagle3DraftModel.from_config(config).midlayer.self_attn.rotary
    assert rotary.attention_factor == pytest.approx(0.1 * math.log(40.0) + 1.0)
    # An MLA draft keeps DeepSeek's YaRN: both engines read the pair for it.
    mla = resolve_draft_config(ModelConfig(draft_architecture="mla"), target_config)
    assert mla.rope_scaling["mscale"] == mla.rope_scaling["mscale_all_dim"] == 1.0
