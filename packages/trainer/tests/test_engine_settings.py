"""What the project's vLLM launcher gives vLLM and makes of its failures, without vLLM.

The settings an MLA model gets on CPU (docs/vllm-cpu-mla-rope.md):

vLLM's CPU rotary-embedding kernel mis-rotates DeepSeek MLA's strided query/key views, so every
CPU engine with an MLA target or draft runs rope in PyTorch (``custom_ops: ["-rotary_embedding"]``):

* ``is_mla_model`` tells MLA folders (a DeepSeek-V3 target, the project's MLA draft, an older
  draft name) from the others (Qwen3 and Llama targets, Llama drafts) by their config.json;
* ``cpu_mla_compilation_config`` adds the setting to the user's compilation config and keeps the
  rest of it, replacing a ``+rotary_embedding`` (vLLM refuses both at once);
* the child's ``_engine`` hands it to vLLM's ``LLM`` on CPU only, after the user's engine arguments.

And a generating engine logs its stats (``run_vllm`` reads the spec-decode counters from them, also
without a draft), and a draft the engine fails on at its first request is refused by name, as one
it fails on at start.

``launch`` and ``worker`` import vLLM only inside the functions that start it; a stand-in ``vllm``
module records what ``LLM`` is given.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from torchspec.draft_models import DeepseekEagle3Config, LlamaEagle3Config
from torchspec.trainer.engine import launch
from torchspec.trainer.engine.launch import EngineError, is_mla_model
from torchspec.trainer.engine.worker import _engine, cpu_mla_compilation_config

# --- is_mla_model ----------------------------------------------------------------------------------

# The keys of DeepSeek-V3's own config.json that matter here (deepseek-ai/DeepSeek-V3).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096},
}


def _folder(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_deepseek_v3_target_is_mla(tmp_path):
    assert is_mla_model(_folder(tmp_path / "deepseek-v3", DEEPSEEK_V3))
    # transformers' own config class writes the same model type
    from transformers import DeepseekV3Config

    DeepseekV3Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "hf")
    assert is_mla_model(tmp_path / "hf")


def test_the_projects_mla_draft_is_mla(tmp_path):
    config = DeepseekEagle3Config(hidden_size=64, vocab_size=96, num_attention_heads=4, intermediate_size=128)
    config.save_pretrained(tmp_path / "draft")
    written = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert written["architectures"] == ["Eagle3DeepseekV2ForCausalLM"] and "kv_lora_rank" in written
    assert is_mla_model(tmp_path / "draft")


@pytest.mark.parametrize(
    "config",
    [
        # an MLA draft is recognised by its latent width alone (no DeepSeek model type or name)
        {"architectures": ["Eagle3DeepseekV2ForCausalLM"], "kv_lora_rank": 512},
        {"architectures": ["SomeEagle3Draft"], "model_type": "", "kv_lora_rank": 512},
        {"architectures": ["DeepSeekForCausalLMEagle3"], "model_type": "llama"},  # older TorchSpec exports
        {"model_type": "kimi_k2"},
    ],
    ids=["eagle3-deepseek", "latent-width", "old-name", "kimi"],
)
def test_mla_drafts_by_any_sign(tmp_path, config):
    assert is_mla_model(_folder(tmp_path / "draft", config))


def test_llama_and_qwen3_folders_are_not_mla(tmp_path):
    from transformers import LlamaConfig, Qwen3Config

    Qwen3Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "qwen3")
    LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "llama")
    LlamaEagle3Config(hidden_size=64, vocab_size=96, num_attention_heads=4, intermediate_size=128).save_pretrained(
        tmp_path / "llama-draft"
    )
    for name in ("qwen3", "llama", "llama-draft"):
        assert not is_mla_model(tmp_path / name), name


def test_a_folder_without_a_readable_config_is_not_mla(tmp_path):
    assert not is_mla_model(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert not is_mla_model(tmp_path / "broken")


# --- cpu_mla_compilation_config -------------------------------------------------------------------


def test_no_compilation_config_gets_the_pytorch_rope():
    assert cpu_mla_compilation_config(None) == {"custom_ops": ["-rotary_embedding"]}
    assert cpu_mla_compilation_config({}) == {"custom_ops": ["-rotary_embedding"]}


def test_the_users_compilation_config_is_kept_and_a_kernel_rope_replaced():
    users = {"mode": 0, "custom_ops": ["none", "+rms_norm", "+rotary_embedding", "-silu_and_mul"]}
    assert cpu_mla_compilation_config(users) == {
        "mode": 0,
        "custom_ops": ["none", "+rms_norm", "-silu_and_mul", "-rotary_embedding"],
    }
    assert users["custom_ops"][2] == "+rotary_embedding"  # the caller's dict is left alone


def test_the_setting_is_not_repeated():
    once = cpu_mla_compilation_config({"custom_ops": ["-rotary_embedding", "all"]})
    assert once == {"custom_ops": ["all", "-rotary_embedding"]}
    assert cpu_mla_compilation_config(once) == once


def test_a_compilation_mode_given_as_a_number_is_kept():
    # vLLM's LLM takes an int as the compilation mode (CompilationMode(n)).
    assert cpu_mla_compilation_config(3) == {"mode": 3, "custom_ops": ["-rotary_embedding"]}


# --- _engine: what vLLM's LLM is given ------------------------------------------------------------


@pytest.fixture
def llm_arguments(monkeypatch):
    """A stand-in ``vllm`` module whose ``LLM`` returns the keyword arguments it was given."""
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)

    def engine(on_cuda: bool = False, **spec):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: on_cuda)
        return _engine({"target": "t", "dtype": "float32", "max_model_len": 128, **spec})

    return engine


def test_an_mla_engine_on_cpu_rotates_in_pytorch(llm_arguments):
    assert llm_arguments(has_mla=True)["compilation_config"] == {"custom_ops": ["-rotary_embedding"]}
    users = {"compilation_config": {"custom_ops": ["+rotary_embedding", "+rms_norm"]}, "max_num_seqs": 3}
    kwargs = llm_arguments(has_mla=True, engine_args=users)
    assert kwargs["compilation_config"] == {"custom_ops": ["+rms_norm", "-rotary_embedding"]}
    assert kwargs["max_num_seqs"] == 3 and kwargs["enforce_eager"] is True


def test_other_engines_keep_vllms_settings(llm_arguments):
    assert "compilation_config" not in llm_arguments(has_mla=False)
    assert "compilation_config" not in llm_arguments()
    # On a GPU vLLM's CUDA rope takes the strided views: the user's settings go through unchanged.
    users = {"compilation_config": {"custom_ops": ["+rotary_embedding"]}}
    assert llm_arguments(on_cuda=True, has_mla=True, engine_args=users)["compilation_config"] == {
        "custom_ops": ["+rotary_embedding"]
    }


def test_a_generating_engine_logs_the_stats_its_counters_come_from(llm_arguments):
    # vLLM's LLM.get_metrics asserts "Stat logging disabled" otherwise, and run_vllm always asks.
    assert llm_arguments()["disable_log_stats"] is False
    assert llm_arguments(draft={"model": "d", "num_speculative_tokens": 4})["disable_log_stats"] is False
    assert "disable_log_stats" not in llm_arguments(layer_ids=[1, 2], scratch_dir="s")  # extraction


# --- run_vllm: a draft the engine fails on ---------------------------------------------------------


class _FailingWorker:
    """An EngineWorker that starts and fails its first request with the engine's reason."""

    vllm_version = "0"

    def __init__(self, target, **options):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def send(self, op, **request):
        return 0

    def reply(self, request_id):
        failure = EngineError("vLLM failed a request: RuntimeError: Unsupported block size: 16 (log: x)")
        failure.reason = "RuntimeError: Unsupported block size: 16"
        raise failure


def test_a_draft_the_engine_fails_on_at_its_first_request_is_refused_by_name(monkeypatch, tmp_path):
    monkeypatch.setattr(launch, "vllm_available", lambda: True)
    monkeypatch.setattr(launch, "EngineWorker", _FailingWorker)
    with pytest.raises(EngineError, match=r"^vLLM refused the draft .*d: RuntimeError: Unsupported block size: 16$"):
        launch.run_vllm(tmp_path / "t", [[1, 2]], 4, draft=tmp_path / "d")
    # without a draft the engine's failure is its own
    with pytest.raises(EngineError, match="^vLLM failed a request: RuntimeError: Unsupported block size"):
        launch.run_vllm(tmp_path / "t", [[1, 2]], 4)
