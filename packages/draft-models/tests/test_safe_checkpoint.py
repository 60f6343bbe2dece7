"""Crafted checkpoints must be refused without running their payload; genuine ones still load."""

import pickle
import random
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from torchspec.draft_models import UnsafeCheckpointError, load_dcp, load_torch, read_dcp_metadata
from torchspec.draft_models.safe_checkpoint import DCP_METADATA_ALLOWED_GLOBALS

from crafted_checkpoints import CodeRunningPayload as Payload
from crafted_checkpoints import plant_pickled_tensor, rewrite_dcp_metadata


def _save_dcp(state, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))


def _genuine(path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, "step": 4}
    _save_dcp(state, path)
    return state


def _assert_refused(err, file_part, global_name, marker):
    message = str(err.value)
    assert "\n" not in message, message
    assert file_part in message and global_name in message and "refused" in message, message
    assert not marker.exists(), "the payload ran"


def test_genuine_dcp_checkpoint_loads(tmp_path):
    state = _genuine(tmp_path / "ckpt")
    metadata = read_dcp_metadata(tmp_path / "ckpt")
    assert set(metadata.state_dict_metadata) == {"model.w", "model.b", "step"}
    target = {"model": {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(target, tmp_path / "ckpt")
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and torch.equal(
        target["model"]["b"], state["model"]["b"]
    )
    assert target["step"] == 4  # a BytesIO item, read weights-only


def test_crafted_metadata_is_refused_where_plain_dcp_would_run_it(tmp_path):
    path = tmp_path / "ckpt"
    _genuine(path)
    marker = tmp_path / "MARKER"
    rewrite_dcp_metadata(path, lambda m: setattr(m, "planner_data", {"x": Payload(marker)}))

    # The threat is real: torch's own reader runs the payload.
    FileSystemReader(str(path)).read_metadata()
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError) as err:
        read_dcp_metadata(path)
    _assert_refused(err, str(path / ".metadata"), "posix.system", marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_dcp({"model": {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}}, path)
    _assert_refused(err, str(path / ".metadata"), "posix.system", marker)
    assert isinstance(err.value, ValueError)


def test_metadata_pointing_outside_the_folder_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    _genuine(path)

    def escape(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = "../../elsewhere.distcp"

    rewrite_dcp_metadata(path, escape)
    with pytest.raises(UnsafeCheckpointError, match="outside its checkpoint folder"):
        read_dcp_metadata(path)


def test_crafted_bytes_item_in_distcp_is_refused(tmp_path):
    path, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    _save_dcp({"model": {"w": torch.zeros(2, 3)}, "step": Payload(marker)}, path)  # saving never runs it
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_dcp({"model": {"w": torch.zeros(2, 3)}, "step": 0}, path)
    _assert_refused(err, f"{path} (.distcp entry 'step')", "posix.system", marker)


def test_crafted_tensor_item_in_distcp_is_refused(tmp_path):
    path, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    _genuine(path)
    plant_pickled_tensor(path, "model.w", Payload(marker))
    with pytest.raises(UnsafeCheckpointError) as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_dcp({"model": {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}}, path)
    _assert_refused(err, f"{path} (.distcp data)", "posix.system", marker)


@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_crafted_torch_file_is_refused(tmp_path, fmt):
    file, marker = tmp_path / "rng_state_rank0.pt", tmp_path / "MARKER"
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "extra": Payload(marker)}
    if fmt == "torch.save":
        torch.save(state, file)
    else:
        file.write_bytes(pickle.dumps(state))
    with pytest.raises(UnsafeCheckpointError) as err:
        load_torch(file)
    _assert_refused(err, str(file), "posix.system", marker)


def test_genuine_torch_file_loads(tmp_path):
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    torch.save(state, tmp_path / "rng.pt")
    loaded = load_torch(tmp_path / "rng.pt")
    assert loaded["python"] == state["python"] and torch.equal(loaded["torch"], state["torch"])


def test_allow_list_is_metadata_only():
    assert all(
        name.startswith(("torch.distributed.checkpoint.", "torch.", "pathlib."))
        for name in DCP_METADATA_ALLOWED_GLOBALS
    )
    assert not {"builtins.eval", "builtins.getattr", "posix.system", "os.system"} & DCP_METADATA_ALLOWED_GLOBALS
