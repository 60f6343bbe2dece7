"""One training run per output folder: a second run is refused while the first holds the folder."""

import os
import signal
import subprocess
import sys

import pytest

from torchspec.trainer.config import ConfigError
from torchspec.trainer.run_lock import OutputDirLock

HOLD = """
import sys, time
from torchspec.trainer.run_lock import OutputDirLock
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
