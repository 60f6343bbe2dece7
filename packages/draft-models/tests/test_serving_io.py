"""save_pretrained / from_pretrained in the serving format."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torchspec.draft_models import (
    AutoEagle3DraftModel,
    DraftCheckpointError,
    DraftConfigError,
    Eagle3DraftModel,
    LlamaForCausalLMEagle3,
)

from draft_helpers import build_draft


def _keys(path):
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def _same_outputs(a, b):
    torch.manual_seed(1)
    h3, ids = torch.randn(1, 5, 96), torch.randint(0, 97, (1, 5))
    pos = torch.arange(5)[None]
    outs = []
    for model in (a, b):
        hidden, _, _ = model.backbone(model.embed_input_ids(ids), model.project_hidden_states(h3), None, pos)
        outs.append(model.compute_logits(hidden))
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("pruned", [False, True])
def test_round_trip_keeps_weights_mapping_and_outputs(tmp_path, draft_kind, pruned):
    draft = build_draft(draft_kind, draft_vocab_size=50 if pruned else 97)
    draft.save_pretrained(tmp_path)
    keys = _keys(tmp_path / "model.safetensors")
    assert "fc.weight" in keys and "norm.weight" in keys and "lm_head.weight" in keys and "embed_tokens.weight" in keys
    assert any(k.startswith("midlayer.self_attn.") for k in keys)
    assert not any(k.startswith("model.") for k in keys)
    assert ({"d2t", "t2d"} <= keys) == pruned
    loaded = AutoEagle3DraftModel.from_pretrained(tmp_path)
    assert type(loaded) is type(draft)
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    _same_outputs(draft, loaded)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["draft_vocab_size"] == (50 if pruned else 97)


def test_eagle3_1_weights_and_flags_are_written_as_vllm_reads_them(tmp_path, draft_kind):
    draft = build_draft(draft_kind, fc_norm=True, norm_before_fc=draft_kind == "llama", norm_output=True)
    draft.save_pretrained(tmp_path)
    keys = _keys(tmp_path / "model.safetensors")
    # vLLM's llama_eagle3.py / deepseek_eagle3.py parameter names, after its "model." prefix
    assert {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"} <= keys
    assert ("input_norm.weight" in keys) == (draft_kind == "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["fc_norm"] is True and config["norm_output"] is True
    assert config["norm_before_fc"] is (draft_kind == "llama")
    loaded = AutoEagle3DraftModel.from_pretrained(tmp_path)
    assert loaded.config.norm_output and loaded.config.fc_norm
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    _same_outputs(draft, loaded)


def test_layers_0_prefix_is_accepted(tmp_path):
    draft = build_draft("llama")
    draft.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        tensors = {k.replace("midlayer.", "layers.0."): handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _same_outputs(draft, AutoEagle3DraftModel.from_pretrained(tmp_path))


def test_without_embeddings_and_in_another_dtype(tmp_path):
    draft = build_draft("mla", draft_vocab_size=40)
    draft.save_pretrained(tmp_path, include_embeddings=False, dtype=torch.bfloat16)
    assert "embed_tokens.weight" not in _keys(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = AutoEagle3DraftModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)


def test_missing_t2d_is_rebuilt_from_d2t(tmp_path):
    draft = build_draft("llama", draft_vocab_size=40)
    draft.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "t2d"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert torch.equal(AutoEagle3DraftModel.from_pretrained(tmp_path).t2d, draft.t2d)


def test_mismatched_weights_name_the_keys(tmp_path):
    draft = build_draft("llama")
    draft.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "fc.weight"}
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(DraftCheckpointError, match="missing fc.weight; unexpected extra.weight"):
        AutoEagle3DraftModel.from_pretrained(tmp_path)


def test_shape_mismatch_and_missing_files(tmp_path):
    draft = build_draft("llama")
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(DraftCheckpointError, match="midlayer.mlp.*has shape"):
        AutoEagle3DraftModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DraftCheckpointError, match="model.safetensors does not exist"):
        AutoEagle3DraftModel.from_pretrained(tmp_path)
    with pytest.raises(DraftConfigError, match="does not exist"):
        AutoEagle3DraftModel.from_pretrained(tmp_path / "nowhere")


def test_loading_through_the_wrong_class_is_refused(tmp_path):
    build_draft("mla").save_pretrained(tmp_path)
    with pytest.raises(DraftCheckpointError, match="load it with AutoEagle3DraftModel"):
        LlamaForCausalLMEagle3.from_pretrained(tmp_path)
    assert isinstance(Eagle3DraftModel.from_pretrained(tmp_path), Eagle3DraftModel)


def test_embedding_and_mapping_setters_check_shapes():
    draft = build_draft("llama", draft_vocab_size=40)
    with pytest.raises(ValueError, match="does not fit"):
        draft.load_embedding(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="do not match"):
        draft.set_vocab_mapping(torch.zeros(3, dtype=torch.long), torch.zeros(97, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs a pruned config"):
        build_draft("llama").set_vocab_mapping(torch.zeros(1), torch.zeros(1))


def test_a_folder_without_torch_dtype_keeps_its_weights_dtype(tmp_path):
    draft = build_draft("llama", torch_dtype=None)  # float32 weights, no declared serving dtype
    draft.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"  # the weights' own
    config = json.loads((tmp_path / "config.json").read_text())
    del config["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert AutoEagle3DraftModel.from_pretrained(tmp_path).fc.weight.dtype == torch.float32  # not the old bf16 default
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))  # transformers 5 spelling
    assert AutoEagle3DraftModel.from_pretrained(tmp_path).fc.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["plain", "pruned", "eagle3_1", "aux-ids", "legacy-name"])
def test_save_pretrained_writes_a_folder_the_serving_checker_passes(tmp_path, draft_kind, variant):
    """save_pretrained and converter export write config.json through one writer (serving_config)."""
    from torchspec.draft_models.serving_folder import check_serving_folder

    options = {"pruned": {"draft_vocab_size": 50}, "eagle3_1": {"fc_norm": True, "norm_output": True}}.get(variant, {})
    if draft_kind == "mla":
        options["kv_lora_rank"] = 508  # + qk_rope_head_dim 4: a latent width vLLM serves (512)
    draft = build_draft(draft_kind, **options)
    if variant == "aux-ids":  # ids a loaded folder recorded (vLLM's key only): written for both engines
        draft.config.extra["eagle_aux_hidden_state_layer_ids"] = [1, 3, 6]
    if variant == "legacy-name" and draft_kind == "mla":
        draft.config.architectures = ["DeepSeekForCausalLMEagle3"]  # written by older versions
    draft.save_pretrained(tmp_path, num_target_layers=8)  # the target's depth gives the default ids
    assert check_serving_folder(tmp_path) == []
    config = json.loads((tmp_path / "config.json").read_text())
    if variant == "aux-ids":
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 5]
    else:
        assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    if variant == "legacy-name" and draft_kind == "mla":
        assert config["architectures"] == ["Eagle3DeepseekV2ForCausalLM"]


@pytest.mark.parametrize(
    "aux_layer_ids, num_target_layers, vllm_ids, sglang_ids",
    [
        (None, 8, [2, 4, 5], [1, 3, 4]),  # the default of an 8-layer target: written all the same
        ([2, 4, 5], 8, [2, 4, 5], [1, 3, 4]),
        (None, 6, [2, 3, 5], [1, 2, 4]),  # where the engines' own fallback would repeat layer 3
        ([1, 3, 6], 8, [1, 3, 6], [0, 2, 5]),
    ],
)
def test_serving_config_always_writes_the_aux_layers_in_both_engines_layouts(
    aux_layer_ids, num_target_layers, vllm_ids, sglang_ids
):
    """Engines fall back to their own (2, L // 2, L - 3) when config.json names no ids; whether
    that fallback stays what training used is not this folder's to assume."""
    from torchspec.draft_models.serving_folder import serving_config

    config = build_draft("llama").config
    values = serving_config(config, torch.float32, aux_layer_ids=aux_layer_ids, num_target_layers=num_target_layers)
    assert values["eagle_aux_hidden_state_layer_ids"] == vllm_ids  # vLLM: input to layer j
    assert values["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == sglang_ids  # SGLang: output of layer j
    assert values["num_aux_hidden_states"] == 3  # vLLM sizes fc (and fc_norm) by it


def test_serving_config_refuses_aux_layers_out_of_order():
    from torchspec.draft_models.serving_folder import serving_config

    with pytest.raises(ValueError, match=r"aux_layer_ids must be strictly ascending, got \[5, 4, 2\].*\[2, 4, 5\]"):
        serving_config(build_draft("llama").config, torch.float32, aux_layer_ids=[5, 4, 2], num_target_layers=8)


@pytest.mark.parametrize(
    "change, level, words",
    [
        ({"eagle_aux_hidden_state_layer_ids": [5, 4, 2]}, "error", ["must be strictly ascending", "[2, 4, 5]"]),
        ({"num_aux_hidden_states": 4}, "error", ["num_aux_hidden_states is 4", "3"]),
        ("no-ids", "warning", ["names no aux layer ids", "fall back", "converter export"]),
    ],
    ids=["out-of-order", "num-aux", "no-ids"],
)
def test_check_reports_aux_layer_ids_the_engines_would_read_otherwise(tmp_path, change, level, words):
    from torchspec.draft_models.serving_folder import check_serving_folder, serving_config

    draft = build_draft("llama")
    draft.save_pretrained(tmp_path)
    config = serving_config(draft.config, torch.float32, num_target_layers=8)
    if change == "no-ids":
        config.pop("eagle_aux_hidden_state_layer_ids"), config.pop("num_aux_hidden_states")
        config["eagle_config"].pop("eagle_aux_hidden_state_layer_ids")
    else:
        config.update(change)
        config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [
            i - 1 for i in config["eagle_aux_hidden_state_layer_ids"]
        ]
    (tmp_path / "config.json").write_text(json.dumps(config))
    findings = [f for f in check_serving_folder(tmp_path) if f.level == level]
    message = " | ".join(f.message for f in findings)
    assert findings and all(word in message for word in words), message
