"""`converter:export` of a crafted checkpoint: refused in one line, the payload never runs."""

from torchspec.converter.cli import main
from torchspec.draft_models import UnsafeCheckpointError
from torchspec.draft_models.checkpoint_layout import TrainingCheckpoint

from converter_helpers import tiny_draft, write_training_checkpoint
from crafted_checkpoints import CodeRunningPayload as Payload
from crafted_checkpoints import plant_pickled_tensor, rewrite_dcp_metadata


def _one_line_refusal(err: str, file_part: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and file_part in lines[0], err
    assert "outside the allow-list (posix.system)" in lines[0] and "refused" in lines[0], err
    return lines[0]


def test_export_refuses_a_crafted_metadata_file(tmp_path, capsys):
    path = write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    marker = tmp_path / "MARKER"
    rewrite_dcp_metadata(path, lambda m: setattr(m.storage_meta, "modules", [Payload(marker)]))

    assert main(["export", "--input", str(path), "--output", str(tmp_path / "out")]) == 2
    _one_line_refusal(capsys.readouterr().err, str(path / ".metadata"))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_crafted_tensor_in_the_data_file(tmp_path, capsys):
    path = write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    marker = tmp_path / "MARKER"
    plant_pickled_tensor(path, "model.fc.weight", Payload(marker))
    assert main(["export", "--input", str(path), "--output", str(tmp_path / "out")]) == 2
    _one_line_refusal(capsys.readouterr().err, str(path))
    assert not marker.exists()


def test_the_checkpoint_api_raises_a_value_error(tmp_path):
    path = write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    marker = tmp_path / "MARKER"
    rewrite_dcp_metadata(path, lambda m: setattr(m, "planner_data", Payload(marker)))
    checkpoint = TrainingCheckpoint.open(path)  # config.json is JSON; nothing pickled read yet
    try:
        checkpoint.weight_names()
    except UnsafeCheckpointError as err:
        assert isinstance(err, ValueError) and "\n" not in str(err)
    else:
        raise AssertionError("the crafted metadata was read")
    assert not marker.exists()


def test_a_genuine_checkpoint_still_exports(tmp_path, capsys):
    path = write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    assert main(["export", "--input", str(path), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
