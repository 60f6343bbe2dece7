"""The training-checkpoint layout every reader shares: names, completeness, the newest checkpoint."""

import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchspec.draft_models.checkpoint_layout import (
    COMPLETE_MARKER,
    CheckpointNotFoundError,
    TrainingCheckpoint,
    checkpoint_name,
    find_latest,
    is_complete,
    list_checkpoints,
    resolve_checkpoint,
)
from torchspec.draft_models.errors import UserInputError

from draft_helpers import build_draft


def _checkpoint(output_dir, step, complete=True, draft=None):
    """A folder as the trainer leaves it (DCP state under "model", the draft config, the marker)."""
    path = output_dir / checkpoint_name(step)
    draft = draft or build_draft("llama")
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save({"model": draft.state_dict()}, checkpoint_id=str(path))
    draft.config.save_pretrained(path)
    if complete:
        (path / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    return path


def test_names_and_completeness(tmp_path):
    assert checkpoint_name(42) == "iter_0000042" and checkpoint_name(12345678) == "iter_12345678"
    done, unfinished = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 9, complete=False)
    (tmp_path / ".tmp_iter_0000011").mkdir()  # a save interrupted before the rename
    assert is_complete(done) and not is_complete(unfinished)
    assert list_checkpoints(tmp_path) == [(2, done)]
    assert find_latest(tmp_path) == done and find_latest(tmp_path / "missing") is None


def test_the_newest_goes_by_step_not_by_the_latest_file(tmp_path):
    _checkpoint(tmp_path, 3)
    newest = _checkpoint(tmp_path, 12)
    (tmp_path / "latest").write_text("iter_0000003\n")  # e.g. a kill between the rename and this file
    assert resolve_checkpoint(tmp_path) == newest


@pytest.mark.parametrize(
    "setup, words",
    [
        (
            lambda root: root / "nope",
            ["training.resume", "nope does not exist", "iter_XXXXXXX folder or a training output_dir"],
        ),
        (lambda root: _checkpoint(root, 5, complete=False), ["iter_0000005 is incomplete", "not fully written"]),
        (lambda root: (root / "empty").mkdir() or root / "empty", ["empty holds no complete checkpoint"]),
    ],
    ids=["missing", "incomplete", "no-checkpoint"],
)
def test_resolve_errors_name_the_path_and_the_fix(tmp_path, setup, words):
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_checkpoint(setup(tmp_path), what="training.resume")
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_training_checkpoint_reads_one_tensor_at_a_time(tmp_path):
    draft = build_draft("mla", draft_vocab_size=40)
    checkpoint = TrainingCheckpoint.open(_checkpoint(tmp_path, 1, draft=draft).parent)
    assert checkpoint.config.draft_vocab_size == 40
    assert set(checkpoint.weight_names()) == set(draft.state_dict())
    assert checkpoint.tensor_info("fc.weight") == (tuple(draft.fc.weight.shape), torch.float32)
    assert torch.equal(checkpoint.load_tensor("d2t"), draft.d2t)
    (checkpoint.path / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="is incomplete: no config.json"):
        TrainingCheckpoint.open(checkpoint.path)


@pytest.mark.parametrize("ids, words", [([5, 4, 2], "ascending order: [2, 4, 5]"), ([2, 4, 4], "repeats layer 4")])
def test_aux_layers_json_out_of_order_is_refused_naming_the_file(tmp_path, ids, words):
    path = _checkpoint(tmp_path, 1)
    (path / "aux_layers.json").write_text(json.dumps({"aux_layer_ids": ids, "num_target_layers": 8}))
    with pytest.raises(UserInputError) as err:
        TrainingCheckpoint.open(path)
    message = str(err.value)
    assert str(path / "aux_layers.json") in message and words in message and "\n" not in message


def test_best_json_is_read_in_both_layouts(tmp_path):
    from torchspec.draft_models.checkpoint_layout import BestCheckpoint, read_best

    assert read_best(tmp_path) is None
    (tmp_path / "best.json").write_text(
        json.dumps({"checkpoint": "iter_0000040", "step": 40, "metric": "real_acceptance_length", "value": 2.5})
    )
    assert read_best(tmp_path) == BestCheckpoint("iter_0000040", 40, "real_acceptance_length", 2.5)
    # As written before torchspec-trainer 0.8.0: picked by the simulated acceptance, no metric named.
    (tmp_path / "best.json").write_text(json.dumps({"checkpoint": "iter_0000020", "step": 20, "acceptance_length": 3}))
    assert read_best(tmp_path) == BestCheckpoint("iter_0000020", 20, "acceptance_length", 3.0)
    for damaged in ("{", "[]", '{"step": 2}', '{"checkpoint": "iter_0000002", "value": "high"}'):
        (tmp_path / "best.json").write_text(damaged)
        assert read_best(tmp_path) is None, damaged
