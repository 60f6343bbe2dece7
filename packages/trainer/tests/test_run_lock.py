"""One training run per output folder: a second run is refused while the first holds the folder."""

import os
import signal
import subprocess
import sys

import pytest

from torchspec.trainer.config import ConfigError
from torchspec.trainer.loop.run_lock import OutputDirLock

HOLD = """
import sys, time
from torchspec.trainer.loop.run_lock import OutputDirLock
lock = OutputDirLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(output_dir):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(output_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_is_refused_with_the_holders_pid(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(ConfigError) as err:
            OutputDirLock(tmp_path / "run").acquire()
        message = str(err.value)
        assert "\n" not in message and f"pid {holder.pid}" in message
        assert f"training.output_dir {tmp_path / 'run'} is in use by another training run" in message
        assert "choose another output_dir" in message
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_dies_with_its_process_even_on_kill_9(tmp_path):
    holder = _holder(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with OutputDirLock(tmp_path / "run"):  # no stale lock to clean up by hand
        pass


def test_released_on_exit_and_reacquirable_in_process(tmp_path):
    with OutputDirLock(tmp_path / "run"):
        pass
    lock = OutputDirLock(tmp_path / "run")
    lock.acquire()
    lock.release()


def test_training_refuses_a_folder_held_by_another_run_before_loading_anything(tmp_path, assets):
    from torchspec.trainer.config import load_config
    from torchspec.trainer.loop.run import train

    from trainer_test_helpers import small_overrides

    holder = _holder(tmp_path / "run")
    try:
        config = load_config(None, small_overrides(assets, tmp_path / "run"))
        with pytest.raises(ConfigError, match=f"in use by another training run \\(pid {holder.pid}"):
            train(config)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, inside):
    (tmp_path / "taken").write_text("not a folder")
    output_dir = tmp_path / "taken" / "run" if inside else tmp_path / "taken"
    with pytest.raises(ConfigError, match=f"training.output_dir {output_dir} cannot be written"):
        OutputDirLock(output_dir).acquire()


# --- the lock cannot be bypassed ------------------------------------------------------------------


def test_deleting_the_folder_does_not_free_it_for_a_second_run(tmp_path):
    """The hint of a resumed run says "to start over, delete it": deleting the folder of a live run
    must not hand it to a second run (the first would go on writing checkpoints beside it)."""
    import shutil

    holder = _holder(tmp_path / "run")
    try:
        shutil.rmtree(tmp_path / "run")
        with pytest.raises(ConfigError) as err:
            OutputDirLock(tmp_path / "run").acquire()
        message = str(err.value)
        assert "\n" not in message and f"in use by another training run (pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    with OutputDirLock(tmp_path / "run"):  # free once the holder is gone
        pass


@pytest.mark.parametrize("how", ["deleted", "recreated", "replaced"])
def test_the_holder_notices_that_its_folder_was_deleted_or_replaced(tmp_path, how):
    import shutil

    output_dir = tmp_path / "run"
    with OutputDirLock(output_dir) as lock:
        lock.check()  # its own folder: nothing to say
        if how == "replaced":
            (tmp_path / "other").mkdir()
            os.rename(output_dir, tmp_path / "old")
            os.rename(tmp_path / "other", output_dir)
        else:
            shutil.rmtree(output_dir)
            if how == "recreated":
                output_dir.mkdir()
        with pytest.raises(ConfigError) as err:
            lock.check()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"training.output_dir {output_dir} was deleted or replaced while this run used it")
    assert "stop a run before deleting its output_dir" in message


def test_a_flock_failure_other_than_held_is_one_line(tmp_path, monkeypatch):
    """Some network file systems answer flock with ENOLCK or EOPNOTSUPP instead of locking."""
    import errno

    import torchspec.trainer.loop.run_lock as run_lock

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with pytest.raises(ConfigError) as err:
        OutputDirLock(tmp_path / "run").acquire()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"training.output_dir {tmp_path / 'run'}: cannot lock ")
    assert os.strerror(errno.ENOLCK) in message and "file system that supports locks" in message


def test_the_public_trainer_api_takes_the_lock(tmp_path, assets):
    """`Trainer(config, ctx).fit()` without `train()`: refused while another run holds the folder;
    while the Trainer lives, nobody else gets the folder; close() hands it back."""
    from torchspec.trainer.config import load_config
    from torchspec.trainer.distributed.process_group import destroy_distributed, init_distributed
    from torchspec.trainer.loop.trainer import Trainer

    from trainer_test_helpers import small_overrides

    config = load_config(None, small_overrides(assets, tmp_path / "run", **{"training.max_steps": 1}))
    ctx = init_distributed("cpu")
    try:
        holder = _holder(tmp_path / "run")
        try:
            with pytest.raises(ConfigError, match=f"in use by another training run \\(pid {holder.pid}"):
                Trainer(config, ctx)
        finally:
            holder.kill()
            holder.wait()
        trainer = Trainer(config, ctx)
        try:
            with pytest.raises(ConfigError, match=f"in use by another training run \\(pid {os.getpid()}"):
                OutputDirLock(tmp_path / "run").acquire()
            assert trainer.fit().steps == 1
        finally:
            trainer.close()
        with OutputDirLock(tmp_path / "run"):
            pass
    finally:
        destroy_distributed()


def test_dump_states_takes_the_lock_on_the_dump_folder(tmp_path):
    """Two dumps into one folder would write the same shard files; the second is refused before it
    loads anything."""
    from torchspec.trainer.commands.dump_states import dump_states
    from torchspec.trainer.config import load_config

    dump = tmp_path / "dump"
    holder = _holder(dump)
    try:
        config = load_config(None, [f"target.dump_dir={dump}", f"model.target_model_path={tmp_path / 'missing'}"])
        with pytest.raises(ConfigError) as err:
            dump_states(config)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"target.dump_dir {dump} is in use by another run")
        assert f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()


def test_engine_shard_files_are_written_under_a_per_process_name(tmp_path, monkeypatch):
    """Two engines writing one shard never write the same temporary file."""
    import safetensors.torch
    import torch

    from torchspec.trainer.engine.worker import write_states_file

    written, real = [], safetensors.torch.save_file

    def recording(tensors, path):
        written.append(path)
        real(tensors, path)

    monkeypatch.setattr(safetensors.torch, "save_file", recording)
    out = tmp_path / "shards" / "shard-00000.safetensors"
    write_states_file({"a": torch.zeros(2)}, out)
    (partial,) = written
    assert str(os.getpid()) in partial and os.path.basename(partial).startswith(".")
    assert sorted(p.name for p in out.parent.iterdir()) == ["shard-00000.safetensors"]


def test_dump_states_refuses_a_folder_that_is_not_a_dump_without_writing_there(tmp_path):
    from torchspec.trainer.commands.dump_states import dump_states
    from torchspec.trainer.config import load_config

    busy = tmp_path / "busy"
    (busy / "something").mkdir(parents=True)
    config = load_config(None, [f"target.dump_dir={busy}", f"model.target_model_path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=f"target.dump_dir {busy} exists and is not a dump"):
        dump_states(config)
    assert sorted(p.name for p in busy.iterdir()) == ["something"]  # no lock file left in someone's folder


def test_an_unwritable_lock_folder_is_one_line(tmp_path, monkeypatch):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (runtime / "torchspec-locks").write_text("a file where the lock folder goes")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with pytest.raises(ConfigError) as err:
        OutputDirLock(tmp_path / "run").acquire()
    message = str(err.value)
    assert "\n" not in message and f"the lock folder {runtime / 'torchspec-locks'} cannot be created" in message
    assert "set XDG_RUNTIME_DIR" in message


def test_a_failure_under_the_lock_removes_the_folders_the_lock_created_and_nothing_else(tmp_path):
    with pytest.raises(RuntimeError):
        with OutputDirLock(tmp_path / "new" / "run"):
            raise RuntimeError("refused before writing")
    assert not (tmp_path / "new").exists()  # both folders the lock made are gone

    (tmp_path / "existing").mkdir()
    with pytest.raises(RuntimeError):
        with OutputDirLock(tmp_path / "existing"):
            raise RuntimeError("refused before writing")
    assert sorted(p.name for p in (tmp_path / "existing").iterdir()) == [".lock"]  # not ours to remove

    with pytest.raises(RuntimeError):
        with OutputDirLock(tmp_path / "written"):
            (tmp_path / "written" / "shard").write_text("work")
            raise RuntimeError("failed after writing")
    assert (tmp_path / "written" / "shard").read_text() == "work"  # written work is kept

    with OutputDirLock(tmp_path / "ok"):
        pass
    assert (tmp_path / "ok").is_dir()  # a run that ends well keeps its folder


def test_a_training_run_refused_while_building_leaves_no_output_folder(tmp_path, assets):
    from torchspec.trainer.config import load_config
    from torchspec.trainer.loop.run import train

    output_dir = tmp_path / "out"
    config = load_config(
        None, [f"model.target_model_path={tmp_path / 'no-such-target'}", f"training.output_dir={output_dir}"]
    )
    with pytest.raises(ConfigError):
        train(config)
    assert not output_dir.exists()
