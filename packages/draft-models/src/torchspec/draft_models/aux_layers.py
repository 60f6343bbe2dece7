"""Which target layers feed an EAGLE-3 draft.

Convention (both serving engines' default): the residual stream *entering* layers
``[2, L // 2, L - 3]`` of an ``L``-layer target, i.e. Hugging Face ``hidden_states[i]`` for those
``i`` (``hidden_states[0]`` is the embedding output). SGLang writes the same layers as "output of
layer ``i - 1``"; the converter translates when it writes config.json.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchspec.draft_models.errors import UserInputError

__all__ = [
    "aux_layer_ids_from_config",
    "default_aux_layer_ids",
    "from_sglang_layer_ids",
    "select_aux_hidden_states",
    "to_sglang_layer_ids",
    "validate_aux_layer_ids",
]


def default_aux_layer_ids(num_layers: int) -> list[int]:
    return [2, num_layers // 2, num_layers - 3]


def to_sglang_layer_ids(layer_ids: Sequence[int]) -> list[int]:
    """Ids in the convention here and vLLM's (input to layer ``j``) -> SGLang's (output of layer ``j``)."""
    return [int(i) - 1 for i in layer_ids]


def from_sglang_layer_ids(layer_ids: Sequence[int]) -> list[int]:
    """SGLang's ids (output of layer ``j``) -> the convention here and vLLM's (input to layer ``j``)."""
    return [int(i) + 1 for i in layer_ids]


def validate_aux_layer_ids(layer_ids: Sequence[int], num_layers: int, source: str = "aux_layer_ids") -> list[int]:
    layer_ids = [int(i) for i in layer_ids]
    if len(layer_ids) != 3:
        raise UserInputError(f"{source} must list 3 layers (low, mid, high), got {layer_ids}")
    bad = [i for i in layer_ids if not 0 <= i < num_layers]
    if bad:
        raise UserInputError(
            f"{source} {layer_ids} has ids outside the target's {num_layers} layers; use ids in [0, {num_layers - 1}]"
        )
    return layer_ids


def aux_layer_ids_from_config(config_extra: dict, num_layers: int) -> list[int]:
    """The ids a draft config.json records (vLLM's input-to-layer convention), else the default."""
    if config_extra.get("eagle_aux_hidden_state_layer_ids"):
        return validate_aux_layer_ids(config_extra["eagle_aux_hidden_state_layer_ids"], num_layers)
    sglang = (config_extra.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if sglang:
        return validate_aux_layer_ids(from_sglang_layer_ids(sglang), num_layers)
    return default_aux_layer_ids(num_layers)


def select_aux_hidden_states(hidden_states: Sequence[torch.Tensor], layer_ids: Sequence[int]) -> torch.Tensor:
    """Concatenate (low, mid, high) from a Hugging Face ``output_hidden_states`` tuple."""
    return torch.cat([hidden_states[i] for i in layer_ids], dim=-1)
