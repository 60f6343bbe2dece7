"""Crafted checkpoints must be refused without running their payload; genuine ones still load."""

import pathlib
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


# --- state set on something the file did not create -----------------------------------------------


def _push_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _build_and_pop(state: dict[str, str], as_slots: bool) -> bytes:
    """BUILD the object on top of the stack with ``state`` (as ``(None, state)`` when ``as_slots``:
    pickle then setattr's each item), then POP it, leaving the stack as it found it."""
    items = b"".join(pickle.UNICODE + f"{v}\n".encode() for kv in state.items() for v in kv)
    built = pickle.MARK + items + pickle.DICT
    if as_slots:
        built = pickle.NONE + built + pickle.TUPLE2
    return built + pickle.BUILD + pickle.POP


def _enum_member() -> bytes:
    return (
        _push_global("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")
        + pickle.INT
        + b"1\n"
        + pickle.TUPLE1
        + pickle.REDUCE
    )


def _targets():
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata
    from torch.serialization import _get_layout

    return {
        # The case: every Path in the process would render as the attacker's file.
        "path-class": (pathlib.PurePosixPath, _push_global("pathlib", "PurePosixPath"), {"_str": "/tmp/x"}, True),
        "dcp-class": (Metadata, _push_global("torch.distributed.checkpoint.metadata", "Metadata"), {"x": "y"}, True),
        # A function's attributes: _get_layout keeps its name -> layout table in one.
        "function": (_get_layout, _push_global("torch.serialization", "_get_layout"), {"cache": "z"}, False),
        # REDUCE of an Enum returns the shared member, not a new object.
        "enum-member": (_MEM_FORMAT_ENCODING(1), _enum_member(), {"_value_": "9"}, False),
    }


@pytest.mark.parametrize("case", ["path-class", "dcp-class", "function", "enum-member"])
def test_metadata_setting_state_on_a_shared_object_is_refused_and_changes_nothing(tmp_path, case):
    """A genuine .metadata behind a few opcodes that BUILD an allowed class, function or shared
    object before the real pickle starts: the prefix passes every check on globals."""
    victim, push, state, as_slots = _targets()[case]
    path = tmp_path / "ckpt"
    _genuine(path)
    metadata = path / ".metadata"
    metadata.write_bytes(push + _build_and_pop(state, as_slots) + metadata.read_bytes())
    before = dict(vars(victim))
    try:
        with pytest.raises(UnsafeCheckpointError) as err:
            read_dcp_metadata(path)
        assert dict(vars(victim)) == before
    finally:  # a failing run must not leave the process poisoned for the tests after it
        for key in set(vars(victim)) - set(before):
            delattr(victim, key)
        for key, value in before.items():
            if vars(victim).get(key, object()) is not value:
                setattr(victim, key, value)
    message = str(err.value)
    assert "\n" not in message and str(metadata) in message and "refused" in message, message
    assert str(pathlib.PurePosixPath("a") / "b") == "a/b"


def test_metadata_filling_a_class_as_a_dict_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    _genuine(path)
    metadata = path / ".metadata"
    setitem = pickle.UNICODE + b"k\n" + pickle.UNICODE + b"v\n" + pickle.SETITEM + pickle.POP
    metadata.write_bytes(_push_global("torch", "Size") + setitem + metadata.read_bytes())
    with pytest.raises(UnsafeCheckpointError, match="torch.Size"):
        read_dcp_metadata(path)


def test_genuine_metadata_with_every_kind_of_entry_loads(tmp_path):
    """Tensor and bytes entries, several chunks, storage_meta, planner_data: the dataclasses are
    built through NEWOBJ + BUILD, which must stay allowed on the instances the file creates."""
    path = tmp_path / "ckpt"
    state = {"a": torch.randn(3, 4), "b": {"c": torch.ones(2, dtype=torch.float16), "n": 3, "s": "text"}}
    _save_dcp(state, path)
    expected = FileSystemReader(str(path)).read_metadata()  # genuine, written by this test
    loaded = read_dcp_metadata(path)
    assert loaded.state_dict_metadata == expected.state_dict_metadata
    assert loaded.storage_data == expected.storage_data
    assert loaded.planner_data == expected.planner_data


# --- links ------------------------------------------------------------------------------------------


def _assert_link_refused(err, link):
    message = str(err.value)
    assert "\n" not in message and str(link) in message and "symbolic link" in message, message


def test_a_data_file_that_is_a_symbolic_link_is_refused(tmp_path):
    """A link would let the checkpoint read any file of the machine through torch.load."""
    path = tmp_path / "ckpt"
    _genuine(path)
    data = next(path.glob("*.distcp"))
    data.rename(tmp_path / "elsewhere")
    data.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_dcp({"model": {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}}, path)
    _assert_link_refused(err, data)


def test_metadata_that_is_a_symbolic_link_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    _genuine(path)
    (path / ".metadata").rename(tmp_path / "elsewhere")
    (path / ".metadata").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeCheckpointError) as err:
        read_dcp_metadata(path)
    _assert_link_refused(err, path / ".metadata")


def test_a_torch_file_that_is_a_symbolic_link_is_refused(tmp_path):
    torch.save({"torch": torch.get_rng_state()}, tmp_path / "elsewhere.pt")
    link = tmp_path / "rng_state_rank0.pt"
    link.symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_torch(link)
    _assert_link_refused(err, link)
