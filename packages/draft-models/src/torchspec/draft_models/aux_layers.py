"""Which target layers feed an EAGLE-3 draft.

Convention (both serving engines' default): the residual stream *entering* layers
``[2, L // 2, L - 3]`` of an ``L``-layer target, i.e. Hugging Face ``hidden_states[i]`` for those
``i`` (``hidden_states[0]`` is the embedding output). SGLang writes the same layers as "output of
layer ``i - 1``"; the converter translates when it writes config.json.

The ids are three distinct layers in ascending order, wherever they come from: vLLM and SGLang
append the captured states inside their layer loop, so in layer order (vLLM also drops repeats),
while training concatenates them in list order; ``[6, 3, 1]`` would train a draft whose ``fc``
inputs the engines feed permuted.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from torchspec.draft_models.errors import UserInputError

__all__ = [
    "CONFIG_KEY",
    "aux_layer_ids_from_config",
    "default_aux_layer_ids",
    "from_sglang_layer_ids",
    "select_aux_hidden_states",
    "to_sglang_layer_ids",
    "validate_aux_layer_ids",
]

# The key of the ids in a draft's config.json: vLLM reads it at the top level (input to layer j),
# SGLang inside ``eagle_config`` (output of layer j).
CONFIG_KEY = "eagle_aux_hidden_state_layer_ids"


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """``[2, L // 2, L - 3]``, the engines' own fallback, for targets of 7 layers or more; below that
    the rule repeats or reverses layers (``[2, 3, 3]`` for 6), so the three layers around the middle
    and the last one, ``[L // 2 - 1, L // 2, L - 1]``, are used. Exports always write the ids."""
    if num_layers < 3:
        raise UserInputError(
            f"the target has {num_layers} layers; an EAGLE-3 draft reads 3 distinct layers, use a target of at "
            "least 3 layers"
        )
    if num_layers < 7:
        return [num_layers // 2 - 1, num_layers // 2, num_layers - 1]
    return [2, num_layers // 2, num_layers - 3]


def to_sglang_layer_ids(layer_ids: Sequence[int]) -> list[int]:
    """Ids in the convention here and vLLM's (input to layer ``j``) -> SGLang's (output of layer ``j``)."""
    return [int(i) - 1 for i in layer_ids]


def from_sglang_layer_ids(layer_ids: Sequence[int]) -> list[int]:
    """SGLang's ids (output of layer ``j``) -> the convention here and vLLM's (input to layer ``j``)."""
    return [int(i) + 1 for i in layer_ids]


def validate_aux_layer_ids(
    layer_ids: Sequence[int], num_layers: int | None, source: str = "aux_layer_ids"
) -> list[int]:
    """Three distinct ids in ascending order, inside ``[0, num_layers)`` when ``num_layers`` is given
    (None: the target is not known yet, as when a config file is read)."""
    try:
        if isinstance(layer_ids, (str, bytes)) or any(isinstance(i, bool) for i in layer_ids):
            raise TypeError
        layer_ids = [operator.index(i) for i in layer_ids]
    except TypeError:
        raise UserInputError(f"{source} must list 3 integer layer ids (low, mid, high), got {layer_ids!r}") from None
    if len(layer_ids) != 3:
        raise UserInputError(f"{source} must list 3 layers (low, mid, high), got {layer_ids}")
    repeated = sorted({i for i in layer_ids if layer_ids.count(i) > 1})
    if repeated:
        raise UserInputError(
            f"{source} repeats layer {repeated[0]} in {layer_ids}: vLLM keeps one state per layer, so the draft's fc "
            "would get one input too few; list 3 distinct layers in ascending order"
        )
    if layer_ids != sorted(layer_ids):
        raise UserInputError(
            f"{source} must be strictly ascending, got {layer_ids} (the engines concatenate the states in layer "
            f"order); list them in ascending order: {sorted(layer_ids)}"
        )
    if num_layers is None:
        return layer_ids
    bad = [i for i in layer_ids if not 0 <= i < num_layers]
    if bad:
        raise UserInputError(
            f"{source} {layer_ids} has ids outside the target's {num_layers} layers; use ids in [0, {num_layers - 1}]"
        )
    return layer_ids


def aux_layer_ids_from_config(config_extra: dict, num_layers: int) -> list[int]:
    """The ids a draft config.json records (vLLM's input-to-layer convention), else the default."""
    vllm = config_extra.get(CONFIG_KEY)
    if vllm:
        return validate_aux_layer_ids(vllm, num_layers, source=CONFIG_KEY)
    sglang = (config_extra.get("eagle_config") or {}).get(CONFIG_KEY)
    if sglang:
        source = f"eagle_config.{CONFIG_KEY}"
        validate_aux_layer_ids(sglang, None, source=source)  # an order error quotes the ids as written
        return validate_aux_layer_ids(from_sglang_layer_ids(sglang), num_layers, source=source)
    return default_aux_layer_ids(num_layers)


def select_aux_hidden_states(hidden_states: Sequence[torch.Tensor], layer_ids: Sequence[int]) -> torch.Tensor:
    """Concatenate (low, mid, high) from a Hugging Face ``output_hidden_states`` tuple."""
    return torch.cat([hidden_states[i] for i in layer_ids], dim=-1)
