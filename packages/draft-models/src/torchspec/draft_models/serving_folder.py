"""A checker for the draft folder SGLang and vLLM load unmodified: ``check_serving_folder`` reports,
as errors naming the engine and the fix, what an engine would refuse or compute differently from
training. The layout it checks (keys, config.json, aux layers, EAGLE-3.1 flags) is documented and
written in ``serving_layout``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from torchspec.draft_models.auto import AutoEagle3DraftModel
from torchspec.draft_models.aux_layers import CONFIG_KEY as AUX_KEY
from torchspec.draft_models.aux_layers import from_sglang_layer_ids
from torchspec.draft_models.config import AutoDraftModelConfig, DraftConfigError, LlamaEagle3Config
from torchspec.draft_models.safe_checkpoint import DamagedCheckpointError, open_safetensors
from torchspec.draft_models.serving_layout import ENGINE_ARCHITECTURES, serving_config, unregistered_by

__all__ = ["ENGINE_ARCHITECTURES", "Finding", "check_serving_folder", "serving_config", "unregistered_by"]


@dataclass
class Finding:
    level: str  # "error" or "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = AutoEagle3DraftModel.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_serving_folder(folder: str | Path) -> list[Finding]:
    folder = Path(folder)
    findings: list[Finding] = []

    def error(message):
        findings.append(Finding("error", message))

    def warning(message):
        findings.append(Finding("warning", message))

    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file():
        error(f"{config_path} is missing")
        return findings
    try:
        config = AutoDraftModelConfig.from_file(config_path)  # names the file (and line) in its errors
    except DraftConfigError as err:
        error(str(err))
        return findings
    raw = json.loads(config_path.read_text())
    if not weights_path.is_file():
        error(f"{weights_path} is missing")
        return findings

    for refusal in config.engine_refusals():
        error(refusal)
    missing_in = unregistered_by(config.architectures[0])
    if missing_in:
        error(
            f"architectures {config.architectures} is not registered by {' or '.join(missing_in)}; set it to "
            f"[{type(config).architecture!r}] (converter export writes that name)"
        )
    for key in ("draft_vocab_size", "vocab_size", "torch_dtype"):
        if key not in raw:
            error(f"config.json lacks {key!r}")
    if raw.get("num_hidden_layers", 1) != 1:
        error(f"config.json num_hidden_layers is {raw['num_hidden_layers']}; an EAGLE-3 draft has 1")
    if raw.get("tie_word_embeddings") is not False:
        error("config.json tie_word_embeddings must be false (the draft head is not the embedding)")
    if isinstance(config, LlamaEagle3Config) and "head_dim" not in raw:
        error("config.json lacks an explicit head_dim (engines would assume hidden_size / num_attention_heads)")
    if raw.get("model_type") == "deepseek_v3":
        error("model_type deepseek_v3 makes vLLM load the folder as an MTP draft; use deepseek_v2")
    if config.norm_before_fc:
        warning(
            "norm_before_fc: only vLLM serves it; SGLang's EAGLE-3 drafts (EAGLE-3.1 support of May 2026) skip "
            "input_norm.weight and would serve this draft without that norm: serve it with vLLM, or train with fc_norm"
        )
    eagle = raw.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state") is not True:
        error("config.json eagle_config.use_aux_hidden_state must be true for EAGLE-3")
    sglang_ids, vllm_ids = eagle.get(AUX_KEY), raw.get(AUX_KEY)
    if sglang_ids is None and vllm_ids is None:
        warning(
            "config.json names no aux layer ids: the engines fall back to their own (2, L // 2, L - 3), which repeats "
            "layers for targets of 6 layers or fewer and need not be what the draft was trained on; converter export "
            f"writes them ({AUX_KEY} and eagle_config.{AUX_KEY})"
        )
    if raw.get("num_aux_hidden_states", 3) != 3:
        error(
            f"config.json num_aux_hidden_states is {raw['num_aux_hidden_states']}: vLLM sizes fc by it, the draft's fc "
            "reads 3 states (low, mid, high); set it to 3"
        )
    if (sglang_ids is None) != (vllm_ids is None):
        error(
            "aux layer ids are written for only one engine: set both eagle_config.eagle_aux_hidden_state_layer_ids "
            "(SGLang, output of layer j) and eagle_aux_hidden_state_layer_ids (vLLM, input to layer j), or neither"
        )
    elif sglang_ids is not None and from_sglang_layer_ids(sglang_ids) != list(vllm_ids):
        error(
            f"aux layer ids disagree: SGLang {sglang_ids} (output of layer j) should equal vLLM {vllm_ids} (input "
            "to layer j) minus 1"
        )

    expected = _expected_shapes(config)
    try:
        with open_safetensors(weights_path) as handle:
            keys = set(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
            prefixed = sorted(k for k in keys if k.startswith("model."))
            if prefixed:
                error(f"keys carry a 'model.' prefix ({prefixed[0]}, ...); engines expect fc.weight, midlayer.*")
            if "lm_head.weight" not in keys:
                error("lm_head.weight is missing (engines need it, also for a full vocabulary)")
            if "embed_tokens.weight" not in keys and config.hidden_size != config.target_hidden_size:
                error(
                    f"embed_tokens.weight is missing but hidden_size ({config.hidden_size}) differs from "
                    "target_hidden_size "
                    f"({config.target_hidden_size}): SGLang and vLLM cannot use the target's table and keep an "
                    "uninitialised one; export the draft's own embedding"
                )
            optional = {"embed_tokens.weight", "t2d"}
            for key in sorted(set(expected) - keys - optional):
                if key != "lm_head.weight":
                    error(f"missing key {key}")
            for key in sorted(keys - set(expected)):
                if not key.startswith("model."):
                    error(f"unexpected key {key}")
            for key in sorted(keys & set(expected)):
                if shapes[key] != expected[key]:
                    error(f"{key} has shape {shapes[key]}, config.json implies {expected[key]}")
            if config.is_vocab_pruned:
                if "d2t" in keys:
                    d2t = handle.get_tensor("d2t")
                    if d2t.dtype != torch.int64:
                        error(f"d2t has dtype {d2t.dtype}; engines expect int64 offsets")
                    target_ids = torch.arange(d2t.numel()) + d2t.long()
                    if target_ids.min() < 0 or target_ids.max() >= config.vocab_size:
                        error(
                            "d2t offsets map draft ids outside the target vocabulary (d2t must hold offsets, not ids)"
                        )
                    elif target_ids.unique().numel() != target_ids.numel():
                        error("d2t maps two draft ids to the same target id")
                    elif "t2d" in keys:
                        t2d = handle.get_tensor("t2d")
                        if t2d.dtype != torch.bool:
                            error(f"t2d has dtype {t2d.dtype}; expected bool")
                        elif not (t2d[target_ids].all() and int(t2d.sum()) == d2t.numel()):
                            error("t2d disagrees with d2t: t2d must be True exactly at arange(draft_vocab_size) + d2t")
            elif "d2t" in keys or "t2d" in keys:
                warning("d2t/t2d present although draft_vocab_size == vocab_size; engines ignore them")
    except DamagedCheckpointError as err:  # check reports, it does not crash
        error(str(err))
    return findings
