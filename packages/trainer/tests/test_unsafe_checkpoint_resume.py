"""Resume and continual training from a crafted checkpoint: refused in one line, the payload never runs."""

import random
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from torchspec.draft_models import UnsafeCheckpointError
from torchspec.trainer.loop.checkpoint import Checkpointer
from torchspec.trainer.loop.states import ModelState

from crafted_checkpoints import CodeRunningPayload as Payload
from crafted_checkpoints import rewrite_dcp_metadata
from trainer_test_helpers import SmallCheckpointModel as Small
from trainer_test_helpers import save_small_checkpoint as save
from trainer_test_helpers import small_states
from trainer_test_helpers import trained_small_model as trained


def _refused(err, file_part, marker):
    message = str(err.value)
    assert "\n" not in message, message
    assert file_part in message and "outside the allow-list (posix.system)" in message and "refused" in message, message
    assert isinstance(err.value, ValueError)
    assert not marker.exists(), "the payload ran"


def _crafted_metadata(tmp_path):
    model, optimizer = trained(seed=0)
    path = save(Checkpointer(tmp_path / "run"), 5, model, optimizer)
    rewrite_dcp_metadata(
        path, lambda metadata: setattr(metadata, "planner_data", {"model.fc.weight": Payload(tmp_path / "MARKER")})
    )
    return path


@pytest.mark.parametrize("mode", ["resume", "continual_training"])
def test_crafted_metadata_is_refused(tmp_path, mode):
    path = _crafted_metadata(tmp_path)
    fresh, fresh_optimizer = trained(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError) as err:
        if mode == "resume":
            Checkpointer(tmp_path / "run").load(path, small_states(fresh, fresh_optimizer))
        else:
            Checkpointer(tmp_path / "run").load(path, {"model": ModelState(fresh)})
    _refused(err, str(path / ".metadata"), tmp_path / "MARKER")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_crafted_optimizer_item_is_refused(tmp_path):
    model, optimizer = trained(seed=0)
    path = save(Checkpointer(tmp_path / "run"), 5, model, optimizer)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    optimizer_state["param_groups"][0]["lr"] = Payload(tmp_path / "MARKER")  # a BytesIO item in the .distcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))
    fresh, fresh_optimizer = trained(seed=1)
    with pytest.raises(UnsafeCheckpointError) as err:
        Checkpointer(tmp_path / "run").load(path, small_states(fresh, fresh_optimizer))
    _refused(err, f"{path} (.distcp entry 'optimizer.param_groups.0.lr')", tmp_path / "MARKER")


def test_crafted_rng_state_is_refused(tmp_path):
    model, optimizer = trained(seed=0)
    path = save(Checkpointer(tmp_path / "run"), 5, model, optimizer)
    rng_file = path / "rng_state_rank0.pt"
    torch.save(
        {"python": random.getstate(), "torch": torch.get_rng_state(), "x": Payload(tmp_path / "MARKER")}, rng_file
    )
    with pytest.raises(UnsafeCheckpointError) as err:
        Checkpointer(tmp_path / "run").load(path, small_states(Small()))
    _refused(err, str(rng_file), tmp_path / "MARKER")


def test_the_saved_rng_state_loads_weights_only(tmp_path):
    model, optimizer = trained(seed=0)
    path = save(Checkpointer(tmp_path / "run"), 5, model, optimizer)
    state = torch.load(path / "rng_state_rank0.pt", weights_only=True)
    assert set(state) >= {"python", "torch"}
