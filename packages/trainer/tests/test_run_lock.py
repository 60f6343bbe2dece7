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
