"""atomic.py: files and folders are published whole or not at all, and nothing is left behind."""

import builtins
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import torchspec.draft_models.atomic as atomic
from torchspec.draft_models.atomic import publish_dir, recover_replaced_dir, write_file_atomic

from crafted_checkpoints import FullDiskFile


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


# --- files ------------------------------------------------------------------------------------------


def test_write_file_atomic_replaces_the_content(tmp_path):
    target = tmp_path / "state.json"
    write_file_atomic(target, "first")
    write_file_atomic(target, b"second \xe2\x9c\x93")
    assert target.read_bytes() == b"second \xe2\x9c\x93"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_write_that_fails_half_way_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old content")
    # The disk fills up after 3 bytes of the new content.
    monkeypatch.setattr(atomic, "open", lambda path, mode: FullDiskFile(builtins.open(path, mode), 3), raising=False)
    with pytest.raises(OSError, match="No space left"):
        write_file_atomic(target, "new content, longer")
    assert target.read_text() == "old content"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_rename_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(PermissionError):
        write_file_atomic(target, "content")
    assert os.listdir(tmp_path) == []


# --- folders ----------------------------------------------------------------------------------------


def test_publish_dir_onto_an_absent_folder(tmp_path):
    staging = _folder(tmp_path / ".staging", {"a.txt": "A", "sub/b.txt": "B"})
    publish_dir(staging, tmp_path / "export")
    assert _tree(tmp_path / "export") == {"a.txt": "A", "sub/b.txt": "B"}
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("exchange", ["renameat2", "aside"])
def test_publish_dir_replaces_an_existing_folder_and_leaves_nothing_behind(tmp_path, monkeypatch, exchange):
    if exchange == "aside":  # a kernel or file system without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = _folder(tmp_path / "export", {"old.txt": "old", "sub/gone.txt": "x"})
    staging = _folder(tmp_path / ".staging", {"new.txt": "new", "sub/kept.txt": "y"})
    publish_dir(staging, final)
    assert _tree(final) == {"new.txt": "new", "sub/kept.txt": "y"}
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging, no folder set aside


def test_the_aside_path_puts_the_old_folder_back_when_the_new_one_cannot_be_moved_in(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = _folder(tmp_path / "export", {"old.txt": "old"})
    staging = _folder(tmp_path / ".staging", {"new.txt": "new"})
    real_replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # staging -> final
            raise OSError(5, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(OSError, match="Input/output error"):
        publish_dir(staging, final)
    assert _tree(final) == {"old.txt": "old"} and _tree(staging) == {"new.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == [".staging", "export"]


def test_the_atomic_exchange_does_not_depend_on_finding_libc_by_name(tmp_path, monkeypatch):
    """ctypes.util.find_library runs ldconfig or a compiler to find libc, and finds nothing in a
    container without them: the exchange must not silently turn into the move-aside path there."""
    import ctypes.util

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (moves.append(dst), real_replace(src, dst)))
    final = _folder(tmp_path / "export", {"old.txt": "old"})
    publish_dir(_folder(tmp_path / ".staging", {"new.txt": "new"}), final)
    assert _tree(final) == {"new.txt": "new"}
    assert moves == [], "the old folder was moved aside: no atomic exchange"


# --- a publish killed half-way ----------------------------------------------------------------------

_KILLED_PUBLISH = textwrap.dedent(
    """
    import os, shutil, sys
    import torchspec.draft_models.atomic as atomic

    atomic._exchange = lambda a, b: False  # the move-aside path, the one with a window
    stop_at = sys.argv[3]
    real_replace, real_rmtree, moves = os.replace, shutil.rmtree, []

    def stop(where):
        print(where, flush=True)
        if sys.argv[4] == "die":
            os._exit(9)
        sys.stdin.readline()  # stay alive until the test lets go
        os._exit(9)

    def replace(src, dst):
        real_replace(src, dst)
        moves.append(dst)
        if stop_at == "after-aside" and len(moves) == 1:
            stop("aside")

    def rmtree(path, *args, **kwargs):
        if stop_at == "before-cleanup":
            stop("published")
        real_rmtree(path, *args, **kwargs)

    atomic.os.replace = replace
    atomic.shutil.rmtree = rmtree
    atomic.publish_dir(sys.argv[1], sys.argv[2])
    """
)


def _publish_in_a_child(tmp_path, stop_at: str, then: str, name: str = "export") -> subprocess.Popen:
    """Publish over ``tmp_path / name`` in a child process that stops at ``stop_at`` and then dies or
    waits (until its stdin closes)."""
    final = _folder(tmp_path / name, {"old.txt": "old"})
    staging = _folder(tmp_path / ".staging", {"new.txt": "new"})
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PUBLISH, str(staging), str(final), stop_at, then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() in ("aside", "published")
    return child


def test_a_publish_killed_after_moving_the_old_folder_aside_is_recovered(tmp_path):
    child = _publish_in_a_child(tmp_path, "after-aside", "die")
    assert child.wait(timeout=60) == 9
    final = tmp_path / "export"
    assert not final.exists()  # the window: neither old nor new at the final path
    assert recover_replaced_dir(final) == final
    assert _tree(final) == {"old.txt": "old"}
    assert sorted(os.listdir(tmp_path)) == [".staging", "export"]
    assert recover_replaced_dir(final) is None  # nothing more to do


def test_the_folder_set_aside_by_a_live_process_is_left_alone(tmp_path):
    child = _publish_in_a_child(tmp_path, "after-aside", "wait")
    try:
        final = tmp_path / "export"
        assert recover_replaced_dir(final) is None  # its publish may still finish
        assert not final.exists() and len(os.listdir(tmp_path)) == 2  # staging and the aside folder
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert recover_replaced_dir(final) == final  # once it is dead
    assert _tree(final) == {"old.txt": "old"}


def test_a_publish_killed_after_its_rename_leaves_no_old_folder_after_recovery(tmp_path):
    """The new folder is in place; the old one, set aside, was still to be deleted."""
    child = _publish_in_a_child(tmp_path, "before-cleanup", "die")
    assert child.wait(timeout=60) == 9
    final = tmp_path / "export"
    assert _tree(final) == {"new.txt": "new"} and len(os.listdir(tmp_path)) == 2
    assert recover_replaced_dir(final) is None
    assert _tree(final) == {"new.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_recovery_reads_folder_names_literally(tmp_path):
    """A glob pattern built from the name must not read ``[`` or ``*`` as wildcards."""
    child = _publish_in_a_child(tmp_path, "after-aside", "die", name="run[1]")
    assert child.wait(timeout=60) == 9
    final = tmp_path / "run[1]"
    assert recover_replaced_dir(final) == final
    assert _tree(final) == {"old.txt": "old"}
