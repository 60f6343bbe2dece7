"""`converter check` against what the engines do with a folder: each case is a folder one of them
would serve differently from training (or not load), reported as an error naming engine and fix."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from torchspec.converter import check_serving_folder, export_checkpoint
from torchspec.converter.cli import main
from torchspec.draft_models import AutoEagle3DraftModel

from converter_helpers import draft_logits, tiny_draft, write_training_checkpoint

YARN = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}


def _exported(tmp_path, kind):
    write_training_checkpoint(tiny_draft(kind), tmp_path / "run")
    return export_checkpoint(tmp_path / "run", include_embeddings=True).output


def _with_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _errors(folder):
    return [f.message for f in check_serving_folder(folder) if f.level == "error"]


@pytest.mark.parametrize(
    "kind, changes, expected",
    [
        # 2. Llama YaRN: SGLang ignores DeepSeek's mscale pair, vLLM applies it.
        (
            "llama",
            {"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
            ["rope_scaling.mscale:", "SGLang", "vLLM", "remove it"],
        ),
        (
            "llama",
            {"rope_scaling": {**YARN, "mscale_all_dim": 0.5}},
            ["rope_scaling.mscale_all_dim:", "SGLang", "remove it"],
        ),
        (
            "llama",
            {"rope_scaling": {**YARN, "attention_factor": 1.1}},
            ["rope_scaling.attention_factor:", "SGLang", "remove it"],
        ),
        (
            "llama",
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            ["'dynamic'", "SGLang", "vLLM", "use one of"],
        ),
        # 3. MLA: both engines run any rope_scaling as DeepSeek YaRN.
        (
            "mla",
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            ["'linear'", "SGLang and vLLM", "use one of: yarn"],
        ),
        (
            "mla",
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
            ["'llama3'", "SGLang and vLLM", "use one of: yarn"],
        ),
        (
            "mla",
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            ["'dynamic'", "SGLang and vLLM", "use one of: yarn"],
        ),
        (
            "mla",
            {"rope_scaling": {**YARN, "attention_factor": 1.0}},
            ["rope_scaling.attention_factor:", "vLLM", "remove it"],
        ),
        # 4. q/k/v biases: SGLang drops them, vLLM wants an o_proj.bias.
        ("llama", {"attention_bias": True}, ["attention_bias", "SGLang", "vLLM", "set attention_bias to false"]),
        ("llama", {"bias": True}, ["bias: True", "SGLang", "remove it"]),
        # 5. An architecture name no engine registers.
        (
            "mla",
            {"architectures": ["DeepSeekForCausalLMEagle3"]},
            ["not registered by SGLang or vLLM", "'Eagle3DeepseekV2ForCausalLM'"],
        ),
        ("llama", {"architectures": ["DeepSeekForCausalLMEagle3"]}, ["not registered by SGLang or vLLM"]),
    ],
    ids=[
        "llama-yarn-mscale-pair",
        "llama-yarn-mscale_all_dim",
        "llama-yarn-attention_factor",
        "llama-dynamic",
        "mla-linear",
        "mla-llama3",
        "mla-dynamic",
        "mla-yarn-attention_factor",
        "llama-attention_bias",
        "llama-bias",
        "mla-old-alias",
        "llama-old-alias",
    ],
)
def test_check_reports_folders_the_engines_serve_differently(tmp_path, kind, changes, expected):
    folder = _exported(tmp_path, kind)
    assert _errors(folder) == []
    errors = _errors(_with_config(folder, **changes))
    assert len(errors) >= 1
    message = " | ".join(errors)
    for part in expected:
        assert part in message, (part, message)
    assert main(["check", str(folder)]) == 1


def test_registered_v3_alias_passes(tmp_path):
    folder = _with_config(_exported(tmp_path, "mla"), architectures=["Eagle3DeepseekV3ForCausalLM"])
    assert _errors(folder) == []


def test_export_writes_the_engines_name_for_the_old_mla_alias(tmp_path):
    draft = tiny_draft("mla")
    path = write_training_checkpoint(draft, tmp_path / "run")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["DeepSeekForCausalLMEagle3"]}))
    out = export_checkpoint(tmp_path / "run", include_embeddings=True).output
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Eagle3DeepseekV2ForCausalLM"]
    assert _errors(out) == []
    _with_config(out, architectures=["DeepSeekForCausalLMEagle3"])  # old folders still load here
    torch.testing.assert_close(draft_logits(AutoEagle3DraftModel.from_pretrained(out)), draft_logits(draft))


def test_missing_embedding_of_a_narrower_draft_is_an_error(tmp_path):
    """hidden_size != target_hidden_size: vLLM keeps the draft's table when the widths differ, SGLang's
    set_embed skips the target's; without embed_tokens.weight both would serve an uninitialised one."""
    folder = _exported(tmp_path, "llama")
    _with_config(folder, target_hidden_size=48)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["fc.weight"] = torch.zeros(32, 3 * 48)
    save_file(tensors, str(folder / "model.safetensors"))
    assert _errors(folder) == []
    del tensors["embed_tokens.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    (error,) = _errors(folder)
    assert "embed_tokens.weight is missing" in error and "export the draft's own embedding" in error
