"""The one way anything of this project is published: whole or not at all, and durable.

Files: written to a temporary name beside the destination, flushed and fsynced, renamed over the
destination, then the folder is fsynced (a crash after the rename can otherwise lose the rename
itself on ext4/xfs). Folders (checkpoints, exports, dump shards): every file in the staging folder is
fsynced, then the staging folder is renamed into place. Replacing an existing folder is an atomic
exchange where the kernel supports it (``renameat2(RENAME_EXCHANGE)``, Linux >= 3.15), so at every
instant the destination is either the old folder or the new one; elsewhere the old folder is moved
aside first and :func:`recover_replaced_dir` puts it back if the process died in between (or
deletes it if the process died after the new folder was in place).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "fsync_dir",
    "fsync_tree",
    "make_staging_dir",
    "publish_dir",
    "recover_replaced_dir",
    "remove_abandoned_staging",
    "write_file_atomic",
]

_ASIDE_TAG = "old"
_STAGING_TAG = "tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (creations, renames) durable. File systems that cannot
    fsync a folder (some network mounts) are skipped: there is nothing more to be done there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file under ``root`` and every folder, deepest first."""
    root = Path(root)
    folders = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        folders += [Path(dirpath) / name for name in dirnames]
    for folder in reversed(folders):
        fsync_dir(folder)


def write_file_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers (and a crash) see the old content or the new, never
    a part; the temporary file is removed if the write fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _aside_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{_ASIDE_TAG}-{os.getpid()}")


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder ``staging`` to ``final`` (same file system), replacing any folder
    there. Durable: the staging folder's files are fsynced before it becomes visible."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    if not final.exists():
        os.replace(staging, final)
        fsync_dir(final.parent)
        return
    if _exchange(staging, final):
        fsync_dir(final.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous folder
        return
    aside = _aside_path(final)
    os.replace(final, aside)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_replaced_dir(final: str | os.PathLike) -> Path | None:
    """Where a process died between moving ``final`` aside and renaming its replacement in (only
    possible without an atomic exchange), put the previous folder back. Returns the folder restored,
    or None. Where it died after the rename, before deleting the previous folder, delete it (the new
    one is in place). Set-aside folders of processes that still run are left alone."""
    final = Path(final)
    # The name is matched literally: a folder called "run[1]" is not a pattern.
    dead_asides = [
        aside
        for aside in sorted(final.parent.glob(f".{glob.escape(final.name)}.{_ASIDE_TAG}-*"))
        if (pid := aside.name.rsplit("-", 1)[-1]).isdigit() and not _process_alive(int(pid))
    ]
    if final.exists():
        for aside in dead_asides:
            shutil.rmtree(aside, ignore_errors=True)
        return None
    if dead_asides:
        os.replace(dead_asides[0], final)
        fsync_dir(final.parent)
        return final
    return None


def make_staging_dir(final: str | os.PathLike) -> Path:
    """A new empty folder beside ``final`` to build it in (``.NAME.tmp-PID-XXXXXXXX``), for
    :func:`publish_dir`; :func:`remove_abandoned_staging` knows its name."""
    final = Path(final)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{_STAGING_TAG}-{os.getpid()}-", dir=final.parent))


def remove_abandoned_staging(final: str | os.PathLike) -> None:
    """Delete the staging folders of ``final`` whose process no longer runs on this host (what a
    killed writer leaves behind); those of live processes stay."""
    final = Path(final)
    for leftover in final.parent.glob(f".{glob.escape(final.name)}.{_STAGING_TAG}-*"):
        pid = leftover.name.rsplit(f".{_STAGING_TAG}-", 1)[-1].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (glibc >= 2.28), or None. Looked up in the symbols the process already
    has, not by file name: ``ctypes.util.find_library`` runs ldconfig or a compiler, and finds
    nothing in a container without them."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with ``renameat2``; False where the system has no such call."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
