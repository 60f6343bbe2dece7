"""The draft: its config (from a file or generated from the target), the checks against the target,
and the model with the target's embedding and, for a pruned vocabulary, its token mapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from torchspec.draft_models import AutoDraftModelConfig, AutoEagle3DraftModel, DraftConfigError, Eagle3DraftConfig
from torchspec.draft_models.config import EAGLE3_1_OPTIONS
from torchspec.draft_models.draft_model import Eagle3DraftModel
from torchspec.trainer.config import ConfigError, ModelConfig

__all__ = [
    "count_trainable",
    "build_draft",
    "check_draft_against_target",
    "draft_config_from_target",
    "eagle3_1_options",
    "resolve_draft_config",
]


def _rope_fields(target_config, architecture: str) -> dict[str, Any]:
    """The target's RoPE, less the keys the engines would serve differently for this draft (a Llama
    draft of a DeepSeek/Kimi target drops ``mscale``/``mscale_all_dim``, which SGLang's Llama YaRN ignores)."""
    servable = AutoDraftModelConfig.config_class_for_kind(architecture).servable_rope_scaling
    rope_parameters = getattr(target_config, "rope_parameters", None)
    if rope_parameters:  # transformers 5: theta and scaling in one dict
        return {"rope_parameters": servable(dict(rope_parameters))}
    rope_scaling = getattr(target_config, "rope_scaling", None)
    return {
        "rope_theta": getattr(target_config, "rope_theta", 10000.0),
        "rope_scaling": servable(dict(rope_scaling)) if rope_scaling else None,
    }


def _mla_dimensions(target_config, hidden: int, head_dim: int) -> dict[str, int]:
    if getattr(target_config, "kv_lora_rank", None):  # an MLA target (DeepSeek, Kimi)
        names = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        dims = {name: int(getattr(target_config, name)) for name in names}
        dims["q_lora_rank"] = int(getattr(target_config, "q_lora_rank", None) or min(3 * dims["kv_lora_rank"], hidden))
        return dims
    return dict(
        q_lora_rank=min(1536, hidden),
        kv_lora_rank=512,
        qk_nope_head_dim=head_dim,
        qk_rope_head_dim=64,
        v_head_dim=head_dim,
    )


def _dtype_name(target_config) -> str:
    """The target's weight dtype as config.json spells it (transformers 5 ``dtype``, 4 ``torch_dtype``)."""
    dtype = getattr(target_config, "dtype", None) or getattr(target_config, "torch_dtype", None) or "bfloat16"
    return str(dtype).removeprefix("torch.")


def draft_config_from_target(target_config, architecture: str = "llama") -> dict[str, Any]:
    """A one-layer draft shaped like the target: same hidden size, heads, head_dim, vocab and RoPE.

    The MLA draft copies an MLA target's latent dimensions; for other targets it takes DeepSeek-V3's
    (``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64, ``q_lora_rank`` 1536 but at most hidden_size) with
    ``qk_nope_head_dim = v_head_dim = head_dim``: vLLM's MLA attention serves only latent widths
    ``kv_lora_rank + qk_rope_head_dim`` of 320, 512 or 576. ``torch_dtype`` is the target's: engines run
    the draft in the target's dtype, so that is the dtype the converter exports by default.
    """
    hidden = int(target_config.hidden_size)
    heads = int(target_config.num_attention_heads)
    head_dim = int(getattr(target_config, "head_dim", None) or hidden // heads)
    values: dict[str, Any] = {
        "architectures": [AutoDraftModelConfig.config_class_for_kind(architecture).architecture],
        "hidden_size": hidden,
        "target_hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": int(target_config.intermediate_size),
        "vocab_size": int(target_config.vocab_size),
        "max_position_embeddings": int(getattr(target_config, "max_position_embeddings", 2048)),
        "rms_norm_eps": float(getattr(target_config, "rms_norm_eps", 1e-6)),
        "num_hidden_layers": 1,
        "torch_dtype": _dtype_name(target_config),
        **_rope_fields(target_config, architecture),
    }
    if architecture == "llama":
        values["num_key_value_heads"] = int(getattr(target_config, "num_key_value_heads", None) or heads)
        values["head_dim"] = head_dim
    else:
        values.update(_mla_dimensions(target_config, hidden, head_dim))
    return values


def eagle3_1_options(model: ModelConfig) -> dict[str, bool]:
    """The EAGLE-3.1 flags this run sets in the draft config (``model.eagle3_1`` and the single options)."""
    options = {"fc_norm": True, "norm_output": True} if model.eagle3_1 else {}
    for name in EAGLE3_1_OPTIONS:
        value = getattr(model, name)
        if value is None:
            continue
        if model.eagle3_1 and name in options and not value:
            raise ConfigError(f"model.eagle3_1=true turns on model.{name}; remove model.{name}=false or model.eagle3_1")
        options[name] = value
    return options


def resolve_draft_config(model: ModelConfig, target_config) -> Eagle3DraftConfig:
    """The draft config of this run: ``model.draft_config`` or generated, with ``model.draft_vocab_size`` applied."""
    if model.draft_config is not None:
        path = Path(model.draft_config)
        source = f"model.draft_config {path}"
        if not path.is_file():
            raise ConfigError(
                f"{source} does not exist; pass a draft config.json or null to generate one from the target"
            )
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    else:
        source = "the draft config generated from the target"
        values = draft_config_from_target(target_config, model.draft_architecture)
    if model.draft_vocab_size is not None:
        values["draft_vocab_size"] = model.draft_vocab_size
    elif "draft_vocab_size" not in values:
        values["draft_vocab_size"] = values.get("vocab_size")
    values.update(eagle3_1_options(model))
    try:
        config = AutoDraftModelConfig.from_dict(values, source=source)
    except DraftConfigError as err:
        raise ConfigError(str(err)) from None
    refusals = config.engine_refusals()
    if refusals:  # the run would train a draft no engine serves
        raise ConfigError(f"{source}: {refusals[0]}")
    return config


def check_draft_against_target(draft_config: Eagle3DraftConfig, target, tokenizer, source: str) -> None:
    """Shapes that must agree before step 1, each a one-line error naming the fix."""
    if draft_config.target_hidden_size != target.hidden_size:
        raise ConfigError(
            f"{source}: target_hidden_size={draft_config.target_hidden_size} but the target's hidden_size is "
            f"{target.hidden_size}; set target_hidden_size to {target.hidden_size}"
        )
    if draft_config.vocab_size != target.vocab_size:
        raise ConfigError(
            f"{source}: vocab_size={draft_config.vocab_size} but the target's lm_head has {target.vocab_size} rows; "
            f"set vocab_size to {target.vocab_size}"
        )
    if len(tokenizer) > target.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the target's vocabulary has {target.vocab_size}; "
            "use the target's own tokenizer (model.tokenizer_path)"
        )


def build_draft(draft_config: Eagle3DraftConfig, target, vocab_mapping=None) -> Eagle3DraftModel:
    """Build the draft (fp32 master weights) with the target's embedding table.

    The embedding is copied and frozen when the draft's hidden size is the target's; otherwise the
    draft keeps and trains its own table (the converter then exports it).
    """
    draft = AutoEagle3DraftModel.from_config(draft_config).float()
    if draft_config.hidden_size == target.hidden_size:
        draft.load_embedding(target.embed_tokens_weight.float().cpu())
        draft.freeze_embedding()
    if draft_config.is_vocab_pruned:
        if vocab_mapping is None:
            raise ValueError("a pruned draft vocabulary needs a vocab mapping")
        draft.set_vocab_mapping(vocab_mapping.d2t, vocab_mapping.t2d)
    return draft


def count_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
