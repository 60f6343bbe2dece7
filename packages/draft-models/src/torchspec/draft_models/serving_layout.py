"""The serving folder's config.json, as SGLang and vLLM read it: the one writer (``serving_config``,
used by ``save_pretrained`` and the converter's export) and the engines' architecture names.
``serving_folder`` checks a whole folder against the same layout.

A serving folder holds ``config.json`` and ``model.safetensors``:

* keys ``fc.weight``, ``midlayer.*``, ``norm.weight``, ``lm_head.weight`` (always, also for a full
  vocabulary), ``d2t`` (int64 offsets) when ``draft_vocab_size < vocab_size``, optional ``t2d``
  (bool), optional ``embed_tokens.weight``; no ``model.`` prefix;
* config: one ``architectures`` entry, ``num_hidden_layers: 1``, the target's ``vocab_size``,
  ``draft_vocab_size``, ``tie_word_embeddings: false``, ``torch_dtype``, ``head_dim`` for Llama
  drafts, and ``eagle_config.use_aux_hidden_state: true``;
* aux layers: SGLang reads ``eagle_config.eagle_aux_hidden_state_layer_ids`` as "output of layer j",
  vLLM reads top-level ``eagle_aux_hidden_state_layer_ids`` as "input to layer j" (and the former,
  unshifted, when the latter is missing). Both are always written, differing by one, in ascending
  order, with ``num_aux_hidden_states: 3`` (vLLM sizes ``fc`` by it): without them each engine falls
  back to its own ``(2, L // 2, L - 3)``, which repeats layers for small targets and need not stay
  what training used;
* MLA drafts use ``model_type: deepseek_v2``: vLLM turns ``deepseek_v3`` configs into its MTP draft;
* ``architectures`` is a name both engines register (``ENGINE_ARCHITECTURES``);
* ``embed_tokens.weight`` is present when ``hidden_size != target_hidden_size``: both engines then keep
  the draft's own table (and never the target's, whose width differs);
* EAGLE-3.1 flags ``fc_norm``, ``norm_before_fc``, ``norm_output`` at the top level (vLLM reads them
  there; ``norm_before_fc`` also from ``eagle_config``, first), weights ``fc_norm.{0,1,2}.weight`` and
  ``input_norm.weight``. SGLang reads fc_norm and norm_output but not norm_before_fc (a warning), vLLM's
  DeepSeek draft has no input_norm (an error);
* RoPE, biases and other keys the engines would serve differently from training are refused by the
  draft config itself (``DraftConfigError``), so they show up here as config errors.
"""

from __future__ import annotations

from typing import Any

import torch

from torchspec.draft_models.aux_layers import CONFIG_KEY as AUX_KEY
from torchspec.draft_models.aux_layers import (
    default_aux_layer_ids,
    from_sglang_layer_ids,
    to_sglang_layer_ids,
    validate_aux_layer_ids,
)
from torchspec.draft_models.config import Eagle3DraftConfig, LlamaEagle3Config

__all__ = ["ENGINE_ARCHITECTURES", "serving_config", "unregistered_by"]

# Draft architecture names each engine registers: vLLM 0.32 models/registry.py (EAGLEConfig keeps
# names that end in Eagle3), SGLang's EntryClass in models/llama_eagle3.py and deepseek_eagle3.py.
ENGINE_ARCHITECTURES = {
    "SGLang": frozenset({"LlamaForCausalLMEagle3", "Eagle3DeepseekV2ForCausalLM", "Eagle3DeepseekV3ForCausalLM"}),
    "vLLM": frozenset({"LlamaForCausalLMEagle3", "Eagle3DeepseekV2ForCausalLM", "Eagle3DeepseekV3ForCausalLM"}),
}


def unregistered_by(architecture: str) -> list[str]:
    """The engines that cannot load a draft folder naming ``architecture``."""
    return [engine for engine, names in ENGINE_ARCHITECTURES.items() if architecture not in names]


def serving_config(
    config: Eagle3DraftConfig,
    dtype: torch.dtype,
    draft_vocab_size: int | None = None,
    aux_layer_ids: list[int] | None = None,
    num_target_layers: int | None = None,
    special_tokens: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of a serving folder, the one writer for ``save_pretrained`` and ``export``.

    ``aux_layer_ids`` (the convention here: input to layer j; default: what ``config`` records, else
    the default of a ``num_target_layers``-layer target) are written for both engines, whenever known;
    ``special_tokens`` (the target's bos/eos/pad ids) fill keys the draft config lacks.
    """
    values = config.to_dict()
    for key, value in (special_tokens or {}).items():
        values.setdefault(key, value)
    if unregistered_by(values["architectures"][0]):  # an alias older versions wrote
        values["architectures"] = [type(config).architecture]
    values.update(
        num_hidden_layers=1,
        draft_vocab_size=config.draft_vocab_size if draft_vocab_size is None else draft_vocab_size,
        tie_word_embeddings=False,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if isinstance(config, LlamaEagle3Config):
        values["head_dim"] = config.head_dim
    eagle = dict(values.get("eagle_config") or {})
    if aux_layer_ids is None:
        recorded_for_sglang = eagle.get("eagle_aux_hidden_state_layer_ids")
        aux_layer_ids = values.get("eagle_aux_hidden_state_layer_ids") or (
            from_sglang_layer_ids(recorded_for_sglang) if recorded_for_sglang else None
        )
    if aux_layer_ids is None and num_target_layers is not None:
        aux_layer_ids = default_aux_layer_ids(int(num_target_layers))
    eagle["use_aux_hidden_state"] = True  # both engines' EAGLE-3 switch
    eagle.pop(AUX_KEY, None)
    values.pop(AUX_KEY, None)
    if aux_layer_ids is not None:
        aux_layer_ids = validate_aux_layer_ids(aux_layer_ids, num_target_layers, source="aux_layer_ids")
        values[AUX_KEY] = aux_layer_ids  # vLLM: input to layer j
        eagle[AUX_KEY] = to_sglang_layer_ids(aux_layer_ids)  # SGLang: output of layer j
        values["num_aux_hidden_states"] = len(aux_layer_ids)
    values["eagle_config"] = eagle
    return values
