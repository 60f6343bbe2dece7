import json
import subprocess
import sys
import textwrap

import pytest
import torch

from torchspec.trainer.loop.checkpoint import COMPLETE_MARKER, Checkpointer, find_latest, is_complete, list_checkpoints
from torchspec.trainer.loop.states import ModelState

from trainer_test_helpers import SMALL_AUX_LAYERS, small_states
from trainer_test_helpers import SmallCheckpointModel as Small
from trainer_test_helpers import save_small_checkpoint as save
from trainer_test_helpers import trained_small_model as trained


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path):
    model, optimizer = trained(seed=0)
    checkpointer = Checkpointer(tmp_path)
    torch.manual_seed(123)
    path = save(checkpointer, 5, model, optimizer, {"config.json": lambda p: p.write_text("{}")})
    after_save = torch.rand(3)
    assert path == tmp_path / "iter_0000005" and is_complete(path)
    assert (tmp_path / "latest").read_text().strip() == "iter_0000005"
    assert (path / "config.json").is_file() and (path / "rng_state_rank0.pt").is_file()

    other, other_optimizer = trained(seed=1)
    torch.manual_seed(999)
    states = small_states(other, other_optimizer)
    Checkpointer(tmp_path).load(path, states)
    assert states["train"].step == 5 and states["train"].aux_layer_ids == SMALL_AUX_LAYERS
    assert json.loads((path / "trainer_state.json").read_text()) == {
        "step": 5,
        "train": {"step": 5, "best": None, "stale_evaluations": 0, "aux_layer_ids": SMALL_AUX_LAYERS, "world_size": 1},
    }
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    for group_a, group_b in zip(
        optimizer.state_dict()["state"].values(), other_optimizer.state_dict()["state"].values()
    ):
        assert torch.equal(group_a["exp_avg"], group_b["exp_avg"]) and torch.equal(
            group_a["exp_avg_sq"], group_b["exp_avg_sq"]
        )
    assert torch.equal(torch.rand(3), after_save)  # the RNG continues where the save left it


def test_weights_only_load_leaves_the_optimizer_alone(tmp_path):
    model, optimizer = trained(seed=0)
    path = save(Checkpointer(tmp_path), 1, model, optimizer)
    fresh = Small()
    torch.manual_seed(7)
    expected_rng = torch.rand(3)
    torch.manual_seed(7)
    Checkpointer(tmp_path).load(path, {"model": ModelState(fresh)})
    assert torch.equal(torch.rand(3), expected_rng)  # only what was asked for: the RNG was not restored
    assert torch.equal(fresh.fc.weight, model.fc.weight) and torch.equal(fresh.d2t, model.d2t)


def test_a_failure_midway_leaves_nothing_resume_would_pick(tmp_path):
    model, optimizer = trained()
    checkpointer = Checkpointer(tmp_path)
    good = save(checkpointer, 10, model, optimizer)

    def explode(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save(checkpointer, 20, model, optimizer, {"config.json": explode})
    assert not (tmp_path / "iter_0000020").exists()
    assert (tmp_path / ".tmp_iter_0000020").exists()  # the debris is under the temporary name only
    assert find_latest(tmp_path) == good
    assert (tmp_path / "latest").read_text().strip() == good.name

    # The next attempt at the same step starts clean and succeeds.
    again = save(checkpointer, 20, model, optimizer)
    assert find_latest(tmp_path) == again and not (tmp_path / ".tmp_iter_0000020").exists()


KILLER = textwrap.dedent(
    """
    import os, sys, torch
    from torch import nn
    from torchspec.trainer.loop.checkpoint import Checkpointer
    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    point = sys.argv[2]
    def die(path):
        if point == "extras":
            os._exit(9)
    checkpointer = Checkpointer(sys.argv[1])
    from torchspec.trainer.loop.states import ModelState, OptimizerState
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    checkpointer.save(1, states, {"config.json": lambda p: p.write_text("{}")})
    if point == "marker":
        import torchspec.trainer.loop.checkpoint as module
        real = module.write_file_atomic
        def write(path, data):
            if path.name == "COMPLETE":
                os._exit(9)
            real(path, data)
        module.write_file_atomic = write
    checkpointer.save(2, states, {"config.json": die})
    """
)


@pytest.mark.parametrize("point", ["extras", "marker"])
def test_a_process_killed_during_save_leaves_the_previous_checkpoint_latest(tmp_path, point):
    script = tmp_path / "kill.py"
    script.write_text(KILLER)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), point], capture_output=True, timeout=120, check=False
    )
    assert result.returncode == 9, result.stderr.decode()[-2000:]
    assert find_latest(tmp_path / "out") == tmp_path / "out" / "iter_0000001"
    assert not (tmp_path / "out" / "iter_0000002").exists()
    Checkpointer(tmp_path / "out").clean_stale()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["iter_0000001", "latest"]


def _full_disk_for(monkeypatch, staging_name: str, where: str) -> None:
    """Make the disk fill up while checkpoint ``staging_name`` is written: in DCP's data files, in a
    file rank 0 writes, or in the COMPLETE marker."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    from crafted_checkpoints import FullDiskFile

    if where == "dcp-data":
        real_create_stream = FileSystem.create_stream

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with real_create_stream(self, path, mode) as stream:
                yield FullDiskFile(stream, room=500) if staging_name in str(path) and "w" in mode else stream

        monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    elif where == "complete-marker":
        import torchspec.draft_models.atomic as atomic_module

        def full_at_the_marker(path, mode="r", *args, **kwargs):
            handle = open(path, mode, *args, **kwargs)
            return FullDiskFile(handle, room=0) if ".COMPLETE.tmp" in str(path) and "w" in mode else handle

        monkeypatch.setattr(atomic_module, "open", full_at_the_marker, raising=False)


@pytest.mark.parametrize("where", ["dcp-data", "rank0-file", "complete-marker"])
def test_a_full_disk_fails_the_save_in_one_line_and_the_previous_checkpoint_stays_latest(tmp_path, monkeypatch, where):
    import errno

    from torchspec.trainer.config import ConfigError

    model, optimizer = trained()
    checkpointer = Checkpointer(tmp_path)
    good = save(checkpointer, 10, model, optimizer)
    _full_disk_for(monkeypatch, ".tmp_iter_0000020", where)

    def fill_up(path):
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    files = {"config.json": fill_up} if where == "rank0-file" else None
    with pytest.raises(ConfigError) as raised:
        save(checkpointer, 20, model, optimizer, files)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        f"training.output_dir {tmp_path}: saving checkpoint iter_0000020 failed (No space left on device); "
    )
    assert f"{good} is still the latest complete checkpoint and checkpoint.resume=auto continues from it" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000010", "latest"]  # no partial folder left
    assert find_latest(tmp_path) == good and (tmp_path / "latest").read_text().strip() == good.name
    monkeypatch.undo()
    assert save(checkpointer, 20, model, optimizer) == tmp_path / "iter_0000020"  # space again: saves work


def test_find_latest_ignores_incomplete_folders(tmp_path):
    model, optimizer = trained()
    checkpointer = Checkpointer(tmp_path)
    save(checkpointer, 3, model, optimizer)
    newest = save(checkpointer, 4, model, optimizer)
    assert find_latest(tmp_path) == newest
    (newest / COMPLETE_MARKER).unlink()  # e.g. a copy interrupted by hand
    assert find_latest(tmp_path) == tmp_path / "iter_0000003"
    (tmp_path / ".tmp_iter_0000009").mkdir()
    (tmp_path / "iter_12").mkdir()
    assert find_latest(tmp_path) == tmp_path / "iter_0000003"
    assert find_latest(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpointer.load(newest, small_states(model, optimizer))


def test_retention_keeps_the_last_k_and_the_best(tmp_path):
    model, optimizer = trained()
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    first = save(checkpointer, 1, model, optimizer)
    checkpointer.mark_best(first, {"step": 1, "acceptance_length": 2.5})
    for step in range(2, 6):
        save(checkpointer, step, model, optimizer)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 4, 5]
    assert json.loads((tmp_path / "best.json").read_text()) == {
        "checkpoint": "iter_0000001",
        "step": 1,
        "acceptance_length": 2.5,
    }
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert (tmp_path / "latest").read_text().strip() == "iter_0000005"


def test_the_shared_layout_reads_what_the_checkpointer_writes(tmp_path):
    """The readers (resume, continual training, the converter) go through draft_models.checkpoint_layout."""
    from torchspec.draft_models.checkpoint_layout import TrainingCheckpoint, resolve_checkpoint

    model, optimizer = trained()
    path = save(Checkpointer(tmp_path), 7, model, optimizer, {"config.json": lambda p: p.write_text("{}")})
    assert resolve_checkpoint(tmp_path) == path

    reader = TrainingCheckpoint.__new__(TrainingCheckpoint)
    reader.path = path
    assert sorted(reader.weight_names()) == ["d2t", "fc.bias", "fc.weight", "head.weight"]
    assert torch.equal(reader.load_tensor("fc.weight"), model.fc.weight.detach())


def _schedule(total_steps: int):
    from torchspec.trainer.loop.lr_schedule import WarmupDecaySchedule, build_lr_scheduler

    model, optimizer = trained()
    return model, optimizer, build_lr_scheduler(optimizer, WarmupDecaySchedule(total_steps, 2, "cosine", 0.1))


def test_the_lr_schedule_state_is_its_position_and_the_shape_comes_from_the_config():
    from torchspec.trainer.loop.states import LRScheduleState

    _, optimizer, scheduler = _schedule(10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state = json.loads(json.dumps(LRScheduleState(scheduler).state_dict()))  # as trainer_state.json keeps it
    assert "lr_lambdas" not in state and state["last_epoch"] == 4

    # The same config: the rates continue exactly.
    _, same_optimizer, same = _schedule(10)
    LRScheduleState(same).load_state_dict(state)
    assert same.last_epoch == 4 and same.get_last_lr() == scheduler.get_last_lr()
    for _ in range(3):
        for s, o in ((scheduler, optimizer), (same, same_optimizer)):
            o.step()
            s.step()
        assert same.get_last_lr() == scheduler.get_last_lr()

    # A config that trains longer: the position from the checkpoint, the longer schedule's rates.
    _, longer_optimizer, longer = _schedule(40)
    LRScheduleState(longer).load_state_dict(state)
    longer_optimizer.step()
    longer.step()
    assert longer.get_last_lr() == [0.1 * longer.lr_lambdas[0](5)]
    assert longer.lr_lambdas[0].total_steps == 40


def test_a_checkpoint_written_before_0_4_0_still_resumes(tmp_path):
    """torchspec-trainer 0.3.0 kept the train state's entries at the top of trainer_state.json and
    recorded the LR schedule's shape (LambdaLR's lr_lambdas) beside its position."""
    from torchspec.trainer.loop.states import LRScheduleState

    model, optimizer, scheduler = _schedule(10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    path = save(Checkpointer(tmp_path), 3, model, optimizer)
    legacy = {
        "step": 3,
        "lr_scheduler": scheduler.state_dict(),  # with "lr_lambdas": [{"total_steps": 10, ...}]
        "data": {"epoch": 0, "step_in_epoch": 3},
        "best": {"step": 2, "acceptance_length": 1.5, "checkpoint": "iter_0000002"},
        "aux_layer_ids": SMALL_AUX_LAYERS,
        "world_size": 1,
    }
    assert legacy["lr_scheduler"]["lr_lambdas"][0]["total_steps"] == 10
    (path / "trainer_state.json").write_text(json.dumps(legacy))

    other, other_optimizer, other_scheduler = _schedule(10)
    states = {**small_states(other, other_optimizer), "lr_scheduler": LRScheduleState(other_scheduler)}
    Checkpointer(tmp_path).load(path, states)
    assert states["train"].step == 3 and states["train"].best == legacy["best"]
    assert other_scheduler.last_epoch == 3 and other_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(other.fc.weight, model.fc.weight)


def test_a_checkpoint_of_other_aux_layers_or_without_a_component_is_one_config_error(tmp_path):
    from torchspec.trainer.config import ConfigError
    from torchspec.trainer.loop.states import TrainState

    model, optimizer = trained()
    path = save(Checkpointer(tmp_path), 2, model, optimizer)
    states = {"train": TrainState([0, 1, 3])}
    with pytest.raises(ConfigError) as err:
        Checkpointer(tmp_path).load(path, states, source="checkpoint.resume")
    assert str(err.value) == (
        f"checkpoint.resume {path}: the checkpoint was trained on aux layers [0, 1, 2], this run uses [0, 1, 3]; "
        "set model.aux_layer_ids=[0, 1, 2]"
    )
    assert states["train"].step == 0
    with pytest.raises(ConfigError, match=r"trainer_state.json has no 'data' state to restore"):
        Checkpointer(tmp_path).load(path, {"data": TrainState([0, 1, 2])}, source="checkpoint.resume")


# --- rollback: a save never deletes what it just wrote, and `latest` is always the newest -------------


def _latest_file(output_dir):
    latest = output_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def test_a_save_older_than_the_folders_newest_is_refused_and_deletes_nothing(tmp_path):
    """A run resumed from iter_2 into the folder that holds iter_3..5 (keep_last=2): its first save
    would be the oldest by step, and retention by step would delete it at once while `latest`
    named it. The save is refused in one line instead, and nothing in the folder is touched."""
    from torchspec.trainer.config import ConfigError

    model, optimizer = trained()
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    for step in (3, 4, 5):
        save(checkpointer, step, model, optimizer)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError) as raised:
        save(checkpointer, 2, model, optimizer)
    message = str(raised.value)
    assert "\n" not in message
    assert f"training.output_dir {tmp_path} holds iter_0000005, newer than iter_0000002" in message
    assert "set training.output_dir to a new folder" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before == ["iter_0000004", "iter_0000005", "latest"]
    assert _latest_file(tmp_path) == find_latest(tmp_path).name == "iter_0000005"


def test_latest_and_find_latest_never_disagree(tmp_path):
    """Whatever order saves come in (retention, a best checkpoint kept, a step saved again, an
    older step refused), the `latest` file names what find_latest (resume: auto, export) picks."""
    import random

    from torchspec.trainer.config import ConfigError

    model, optimizer = trained()
    rng = random.Random(0)
    for keep_last in (None, 1, 2, 3):
        output_dir = tmp_path / f"keep{keep_last}"
        checkpointer = Checkpointer(output_dir, keep_last=keep_last)
        for _ in range(12):
            step = rng.randint(1, 9)
            try:
                path = save(checkpointer, step, model, optimizer)
            except ConfigError:
                pass
            else:
                if rng.random() < 0.3:
                    checkpointer.mark_best(path, {"step": step, "acceptance_length": 2.0})
                assert path.is_dir()  # a save never deletes what it just wrote
            assert _latest_file(output_dir) == find_latest(output_dir).name, (keep_last, step)


def test_every_file_of_a_checkpoint_is_fsynced_before_its_complete_marker(tmp_path, monkeypatch):
    """A crash after COMPLETE is durable must not leave a checkpoint whose side files
    (trainer_state.json, config.json, rng files, ...) are empty or missing: each is fsynced first."""
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    model, optimizer = trained()
    files = {
        name: (lambda p: p.write_text("{}"))
        for name in ("config.json", "aux_layers.json", "training_config.yaml", "vocab_mapping.safetensors")
    }
    path = save(Checkpointer(tmp_path), 3, model, optimizer, files)
    monkeypatch.undo()

    staging = str(tmp_path / ".tmp_iter_0000003")
    marker = next(i for i, p in enumerate(synced) if os.path.basename(p).startswith(".COMPLETE.tmp"))
    before = {os.path.relpath(p, staging) for p in synced[:marker] if p.startswith(staging + os.sep)}
    expected = {p.name for p in path.iterdir() if p.name != COMPLETE_MARKER}
    assert expected >= {"trainer_state.json", "rng_state_rank0.pt", ".metadata", *files}
    assert expected <= before, sorted(expected - before)
    assert staging in synced[:marker]  # the folder's entries too


def test_a_checkpoint_moved_aside_by_a_killed_same_step_save_is_put_back(tmp_path):
    """Where the kernel has no atomic exchange, replacing iter_N moves the old folder aside first;
    a run killed right then leaves no iter_N. The next run's clean_stale puts it back."""
    import os

    model, optimizer = trained()
    checkpointer = Checkpointer(tmp_path)
    path = save(checkpointer, 5, model, optimizer)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.replace(path, tmp_path / f".iter_0000005.old-{int(dead.stdout)}")
    assert find_latest(tmp_path) is None
    checkpointer.clean_stale()
    assert find_latest(tmp_path) == path and sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "latest"]
