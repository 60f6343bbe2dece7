"""Aux-layer ids: the convention here (vLLM's: input to layer j) and SGLang's (output of layer j)."""

import pytest
import torch

from torchspec.draft_models.aux_layers import (
    aux_layer_ids_from_config,
    default_aux_layer_ids,
    from_sglang_layer_ids,
    select_aux_hidden_states,
    to_sglang_layer_ids,
    validate_aux_layer_ids,
)
from torchspec.draft_models.errors import UserInputError


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


def test_default_ids_are_three_distinct_ascending_layers_of_every_target():
    for num_layers in range(3, 200):
        ids = default_aux_layer_ids(num_layers)
        assert len(ids) == 3 and ids == sorted(set(ids)) and 0 <= ids[0] and ids[-1] < num_layers, (num_layers, ids)
        assert validate_aux_layer_ids(ids, num_layers) == ids
        if num_layers >= 7:  # where the engines' fallback (2, L // 2, L - 3) is already distinct, it stays
            assert ids == [2, num_layers // 2, num_layers - 3]


def test_small_targets_get_distinct_layers_where_the_engines_rule_repeats_them():
    # (2, L // 2, L - 3) gives [2, 1, 0], [2, 2, 1], [2, 2, 2], [2, 3, 3] here
    assert {n: default_aux_layer_ids(n) for n in range(3, 7)} == {
        3: [0, 1, 2],
        4: [1, 2, 3],
        5: [1, 2, 4],
        6: [2, 3, 5],
    }


def test_a_target_of_fewer_than_three_layers_has_no_aux_layers():
    with pytest.raises(UserInputError, match="the target has 2 layers; an EAGLE-3 draft reads 3 distinct layers"):
        default_aux_layer_ids(2)


@pytest.mark.parametrize(
    "ids, words",
    [
        ([6, 3, 1], "model.aux_layer_ids must be strictly ascending, got [6, 3, 1]"),
        ([6, 3, 1], "list them in ascending order: [1, 3, 6]"),
        ([1, 6, 3], "list them in ascending order: [1, 3, 6]"),
        ([2, 3, 3], "model.aux_layer_ids repeats layer 3 in [2, 3, 3]"),
        ([2, 2, 2], "repeats layer 2"),
    ],
)
def test_ids_out_of_order_or_repeated_are_refused_in_one_line(ids, words):
    # The engines capture in layer order (and vLLM drops repeats), training concatenates in list order.
    with pytest.raises(UserInputError) as raised:
        validate_aux_layer_ids(ids, 8, source="model.aux_layer_ids")
    assert words in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "extra, words",
    [
        (
            {"eagle_aux_hidden_state_layer_ids": [5, 4, 2]},
            "eagle_aux_hidden_state_layer_ids must be strictly ascending, got [5, 4, 2]",
        ),
        (
            {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [4, 3, 1]}},
            "eagle_config.eagle_aux_hidden_state_layer_ids must be strictly ascending, got [4, 3, 1]",
        ),
    ],
)
def test_a_config_recording_ids_out_of_order_is_refused_naming_its_key(extra, words):
    with pytest.raises(UserInputError, match="must be strictly ascending") as raised:
        aux_layer_ids_from_config(extra, 8)
    assert words in str(raised.value)
