"""The host-memory policy of CPU training processes: tcmalloc when the system has it, else glibc
with its mmap threshold pinned."""

import ctypes.util
import os
import platform
import subprocess
import sys

import pytest

from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.distributed.host_memory import (
    ALLOCATOR_ENV,
    find_tcmalloc,
    loaded_allocator,
    pin_malloc_mmap_threshold,
    tcmalloc_environment,
)

from trainer_test_helpers import assert_one_line_error

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


@pytest.fixture
def conda_tcmalloc(tmp_path):
    """An environment whose prefix holds a tcmalloc (conda's gperftools layout)."""
    library = tmp_path / "lib" / "libtcmalloc_minimal.so.4"
    library.parent.mkdir()
    library.write_bytes(b"")
    return {"CONDA_PREFIX": str(tmp_path), "PATH": os.environ.get("PATH", "")}, str(library)


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library found")
def test_the_mmap_threshold_is_pinned_where_malloc_is_glibcs_only():
    assert pin_malloc_mmap_threshold() is (platform.libc_ver()[0] == "glibc" and loaded_allocator() == "system")


def test_the_python_environments_own_tcmalloc_is_found_first(conda_tcmalloc):
    environ, library = conda_tcmalloc
    assert find_tcmalloc(environ) == library


@linux_only
def test_a_process_is_started_with_tcmalloc_preloaded_before_what_was_preloaded(conda_tcmalloc):
    environ, library = conda_tcmalloc
    started = tcmalloc_environment({**environ, "LD_PRELOAD": "/opt/libother.so"})
    assert started is not None and started["LD_PRELOAD"] == f"{library} /opt/libother.so"
    assert started["CONDA_PREFIX"] == environ["CONDA_PREFIX"]  # the rest of the environment is kept


@linux_only
def test_nothing_changes_when_tcmalloc_is_preloaded_already_or_the_system_allocator_is_asked_for(conda_tcmalloc):
    environ, _ = conda_tcmalloc
    assert tcmalloc_environment({**environ, "LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}) is None
    assert tcmalloc_environment({**environ, ALLOCATOR_ENV: "system"}) is None


def test_an_unknown_allocator_choice_is_one_line_naming_the_variable(conda_tcmalloc):
    environ, _ = conda_tcmalloc
    with pytest.raises(UserInputError, match=f"{ALLOCATOR_ENV}='jemalloc'; use tcmalloc .* or system"):
        tcmalloc_environment({**environ, ALLOCATOR_ENV: "jemalloc"})


@linux_only
@pytest.mark.skipif(find_tcmalloc() is None, reason="no tcmalloc on this machine (apt install libtcmalloc-minimal4)")
def test_a_process_started_with_that_environment_runs_on_tcmalloc():
    code = "from torchspec.trainer.distributed.host_memory import loaded_allocator; print(loaded_allocator())"
    started = subprocess.run(
        [sys.executable, "-c", code], env=tcmalloc_environment(), capture_output=True, text=True, check=True
    )
    assert started.stdout.strip() == "tcmalloc"
    assert loaded_allocator() in ("system", "tcmalloc", "jemalloc")


def test_train_with_an_unknown_allocator_stops_in_one_line_before_anything_is_written(tmp_path):
    environ = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    environ[ALLOCATOR_ENV] = "jemalloc"
    output_dir = tmp_path / "out"
    train = [sys.executable, "-m", "torchspec.trainer.cli", "train", "training.device=cpu"]
    done = subprocess.run(
        [*train, f"training.output_dir={output_dir}"],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert_one_line_error(done.returncode, done.stderr, f"{ALLOCATOR_ENV}='jemalloc'", "tcmalloc", "system")
    assert not output_dir.exists()
