"""Aux-layer ids: the convention here (vLLM's: input to layer j) and SGLang's (output of layer j)."""

import pytest
import torch

from torchspec.draft_models.aux_layers import (
    aux_layer_ids_from_config,
    default_aux_layer_ids,
    from_sglang_layer_ids,
    select_aux_hidden_states,
    to_sglang_layer_ids,
)


def test_the_two_conventions_differ_by_one_both_ways():
    assert to_sglang_layer_ids([1, 3, 6]) == [0, 2, 5]
    assert from_sglang_layer_ids(to_sglang_layer_ids([2, 4, 5])) == [2, 4, 5]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, [2, 4, 5]),  # the engines' shared default for 8 layers
        ({"eagle_aux_hidden_state_layer_ids": [1, 3, 6]}, [1, 3, 6]),  # vLLM's key, read as is
        ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 2, 5]}}, [1, 3, 6]),  # SGLang's, shifted
    ],
)
def test_ids_a_config_records(extra, expected):
    assert default_aux_layer_ids(8) == [2, 4, 5]
    assert aux_layer_ids_from_config(extra, 8) == expected


def test_ids_outside_the_target_are_refused():
    with pytest.raises(ValueError, match=r"outside the target's 8 layers; use ids in \[0, 7\]"):
        aux_layer_ids_from_config({"eagle_aux_hidden_state_layer_ids": [1, 3, 8]}, 8)


def test_selection_concatenates_low_mid_high_of_hidden_states():
    states = [torch.full((1, 2, 3), float(i)) for i in range(9)]  # embeddings + 8 layers
    selected = select_aux_hidden_states(states, [1, 3, 6])
    assert selected.shape == (1, 2, 9) and selected[0, 0].tolist() == [1.0] * 3 + [3.0] * 3 + [6.0] * 3
