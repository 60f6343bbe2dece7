"""Reading checkpoints someone else wrote without running code from them.

Drafts, training checkpoints and dumps travel between teams, and pickle runs whatever callable a
file names. Every pickle TorchSpec reads goes through one of these loaders:

* ``read_dcp_metadata`` / ``load_dcp``: a ``torch.distributed.checkpoint`` folder. Its ``.metadata``
  (``FileSystemReader.read_metadata`` would ``pickle.load`` it) is read by an unpickler that resolves
  only ``DCP_METADATA_ALLOWED_GLOBALS`` and torch's dtype/layout/memory-format constants, and that
  sets state only on objects the file itself created (never on an allowed class, function or shared
  Enum member, which would change them for the whole process); its ``_StorageInfo`` entries must
  name plain files inside the folder. Tensors in ``*.distcp`` are read by DCP itself with
  ``torch.load(weights_only=True)``; non-tensor items (``BytesIO`` entries such as optimizer
  hyperparameters), which DCP's default planner reads with ``weights_only=False``, are read here with
  ``weights_only=True``.
* ``load_torch``: a ``torch.save`` file, always ``weights_only=True`` (tensors, numbers, strings and
  containers of them).

Anything else is refused before it is built: ``UnsafeCheckpointError``, one line naming the file and
the global it tried to load (or the object it tried to change). So is a checkpoint file
(``.metadata``, ``*.distcp``, a ``torch.save`` file) that is a symbolic link or not a regular file.
``safetensors``, JSON and YAML (``SafeLoader``) files carry no code.

A file cut short or corrupted (an interrupted copy, download or save) is a different problem with a
different fix: ``DamagedCheckpointError``, one line naming the file. ``load_dcp`` checks that every
``.distcp`` file the metadata points at is there and long enough before DCP reads anything, and
``open_safetensors`` wraps ``safetensors.safe_open``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import pathlib
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from torchspec.draft_models.errors import UserInputError

__all__ = [
    "DCP_METADATA_ALLOWED_GLOBALS",
    "DamagedCheckpointError",
    "UnsafeCheckpointError",
    "load_dcp",
    "load_torch",
    "open_safetensors",
    "read_dcp_metadata",
    "safe_dcp_planner",
    "safe_dcp_reader",
]


class UnsafeCheckpointError(UserInputError):
    """A checkpoint file that would run code when loaded (or points outside its folder); nothing of
    it was built. One line naming the file."""


class DamagedCheckpointError(UserInputError):
    """A checkpoint file that is missing, cut short or corrupt, so it cannot be read (nothing of it
    was loaded). One line naming the file."""


def _damaged(file: str | os.PathLike, detail: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"{file} is damaged or truncated ({detail}); copy, download or save it again")


def _lstat_plain_file(file: str | os.PathLike) -> os.stat_result:
    """``os.lstat(file)`` of a checkpoint item, refused unless a regular file: a symbolic link would
    let the checkpoint read any file of the machine (and a FIFO or device would block the read)."""
    status = os.lstat(file)
    if stat.S_ISLNK(status.st_mode):
        raise UnsafeCheckpointError(
            f"{file} is a symbolic link; the checkpoint is refused because its files must be plain files (replace "
            "the link with a copy of the file it points at if you trust it)"
        )
    if not stat.S_ISREG(status.st_mode):
        raise UnsafeCheckpointError(f"{file} is not a regular file; the checkpoint is refused")
    return status


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"

#: What a DCP ``.metadata`` pickle may name (``module.name``), besides ``torch.<dtype>``,
#: ``torch.<layout>`` and ``torch.<memory_format>`` constants. All are dataclasses, an enum, or
#: constructors of plain values; none reads, writes or runs anything.
DCP_METADATA_ALLOWED_GLOBALS = frozenset(
    {
        f"{_DCP_METADATA}.Metadata",
        f"{_DCP_METADATA}.TensorStorageMetadata",
        f"{_DCP_METADATA}.BytesStorageMetadata",
        f"{_DCP_METADATA}.ChunkStorageMetadata",
        f"{_DCP_METADATA}.TensorProperties",
        f"{_DCP_METADATA}.StorageMeta",
        f"{_DCP_METADATA}.MetadataIndex",
        f"{_DCP_METADATA}._MEM_FORMAT_ENCODING",  # TensorProperties' memory format, an Enum
        f"{_DCP_FILESYSTEM}._StorageInfo",  # storage_data: file name, offset, length
        "torch.Size",
        "torch.serialization._get_layout",  # looks a torch.layout up by name
        "pathlib.PosixPath",  # StorageMeta.checkpoint_id
        "pathlib.PurePosixPath",
        "pathlib._local.PosixPath",  # Python >= 3.13 spells the module so
        "pathlib._local.PurePosixPath",
    }
)

_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


def _refusal(file: str | os.PathLike, global_name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{file} contains a pickled object outside the allow-list ({global_name}); the checkpoint is refused "
        "because loading it could run code"
    )


def _resolve_allowed(module: str, name: str) -> Any | None:
    """The object ``module.name`` stands for if the allow-list admits it, else None (never imports)."""
    full = f"{module}.{name}"
    if module == "torch" and isinstance(vars(torch).get(name), _TORCH_CONSTANTS):  # vars: no lazy imports
        return vars(torch)[name]
    if full not in DCP_METADATA_ALLOWED_GLOBALS:
        return None
    if module.startswith("pathlib"):
        return getattr(pathlib, name)
    if full == "torch.Size":
        return torch.Size
    if full == "torch.serialization._get_layout":
        from torch.serialization import _get_layout

        return _get_layout
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata

    return getattr(dcp_metadata if module == _DCP_METADATA else dcp_filesystem, name)


@functools.cache
def _dcp_dataclasses() -> frozenset[type]:
    """The metadata types a ``.metadata`` may create with NEWOBJ and then fill in with BUILD."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata

    return frozenset(
        {
            dcp_metadata.Metadata,
            dcp_metadata.TensorStorageMetadata,
            dcp_metadata.BytesStorageMetadata,
            dcp_metadata.ChunkStorageMetadata,
            dcp_metadata.TensorProperties,
            dcp_metadata.StorageMeta,
            dcp_metadata.MetadataIndex,
            dcp_filesystem._StorageInfo,
        }
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"the function {getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} it did not create"


# The pure-Python unpickler, not pickle.Unpickler: the C one gives no hook between reading an opcode
# and changing the object it targets, and the allow-list alone does not stop a file from setting
# attributes on the allowed classes themselves (BUILD on a class is setattr on the class).
_PurePythonUnpickler = pickle._Unpickler
_Handler = Callable[[Any], None]
_BASE_DISPATCH: dict[int, _Handler] = dict(_PurePythonUnpickler.dispatch)
# Opcodes that fill in the object under their operands, and the one type each may fill.
_FILLED_BY = {
    pickle.SETITEM[0]: dict,
    pickle.SETITEMS[0]: dict,
    pickle.APPEND[0]: list,
    pickle.APPENDS[0]: list,
    pickle.ADDITEMS[0]: set,
}
_TAKES_MARK = {pickle.SETITEMS[0], pickle.APPENDS[0], pickle.ADDITEMS[0]}
_CREATING = (
    pickle.EMPTY_DICT,
    pickle.DICT,
    pickle.EMPTY_LIST,
    pickle.LIST,
    pickle.EMPTY_SET,
    pickle.NEWOBJ,
    pickle.NEWOBJ_EX,
)


class _MetadataUnpickler(_PurePythonUnpickler):
    """Resolves only the allow-list, and changes only objects this load created.

    Every object a pickle fills in (BUILD, SETITEM(S), APPEND(S), ADDITEMS) must be a container or a
    DCP dataclass instance that this file itself created (EMPTY_DICT, LIST, ..., NEWOBJ of a DCP
    dataclass). Everything else that can reach the stack is shared by the whole process: the allowed
    classes and functions from ``find_class``, the Enum members and layouts that REDUCE returns.
    """

    dispatch: ClassVar[dict[int, _Handler]] = dict(_BASE_DISPATCH)
    stack: list[Any]  # the base class's working state during load()
    metastack: list[list[Any]]

    def __init__(self, file, source: str | os.PathLike):
        super().__init__(file)
        self._source = source
        # id -> object for everything this load created; holding the objects keeps their ids unique.
        self._created: dict[int, Any] = {}

    def find_class(self, module: str, name: str) -> Any:  # every GLOBAL/STACK_GLOBAL/EXT comes here
        found = _resolve_allowed(module, name)
        if found is None:
            raise _refusal(self._source, f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _refusal(self._source, f"persistent id {pid!r}")

    def _load_creating(self, opcode: int) -> None:
        _BASE_DISPATCH[opcode](self)
        created = self.stack[-1]
        if type(created) in (dict, list, set) or type(created) in _dcp_dataclasses():
            self._created[id(created)] = created

    def _load_filling(self, opcode: int) -> None:
        # Under SETITEMS/APPENDS/ADDITEMS the target sits below the mark; otherwise below the operands.
        if opcode in _TAKES_MARK:
            stack, depth = (self.metastack[-1] if self.metastack else []), 1
        else:
            stack, depth = self.stack, 3 if opcode == pickle.SETITEM[0] else 2
        if len(stack) >= depth:  # else the base handler reports the short stack (damage)
            self._require_created(stack[-depth], frozenset({_FILLED_BY[opcode]}))
        _BASE_DISPATCH[opcode](self)

    def _load_build(self) -> None:
        if len(self.stack) >= 2:
            state, target = self.stack[-1], self.stack[-2]
            self._require_created(target, _dcp_dataclasses())
            if "__setstate__" not in vars(type(target)):  # TensorProperties decodes its own tuple state
                _check_dataclass_state(self._source, target, state)
        _BASE_DISPATCH[pickle.BUILD[0]](self)

    def _require_created(self, target: Any, types: frozenset[type]) -> None:
        if type(target) not in types or self._created.get(id(target)) is not target:
            raise UnsafeCheckpointError(
                f"{self._source} sets state on {_describe(target)}; the checkpoint is refused because loading "
                "it would change objects the whole process shares"
            )


def _with_opcode(handler: Callable[[_MetadataUnpickler, int], None], opcode: int) -> _Handler:
    return lambda unpickler: handler(unpickler, opcode)


for _op in _CREATING:
    _MetadataUnpickler.dispatch[_op[0]] = _with_opcode(_MetadataUnpickler._load_creating, _op[0])
for _code in _FILLED_BY:
    _MetadataUnpickler.dispatch[_code] = _with_opcode(_MetadataUnpickler._load_filling, _code)
_MetadataUnpickler.dispatch[pickle.BUILD[0]] = _MetadataUnpickler._load_build


def _check_dataclass_state(source: str | os.PathLike, target: Any, state: Any) -> None:
    """BUILD's state for a dataclass without ``__setstate__`` names only its fields: a ``dict``, or
    pickle's ``(dict or None, slot dict or None)``."""
    fields = {field.name for field in dataclasses.fields(target)}
    for part in state if isinstance(state, tuple) and len(state) == 2 else (state,):
        if part is None:
            continue
        if not isinstance(part, dict):
            raise UnsafeCheckpointError(
                f"{source} builds a {type(target).__qualname__} from a {type(part).__name__}, not a dict of its "
                "fields; the checkpoint is refused"
            )
        unknown = [name for name in part if name not in fields]
        if unknown:
            raise UnsafeCheckpointError(
                f"{source} sets {unknown[0]!r} on a {type(target).__qualname__}, which has no such field; the "
                "checkpoint is refused"
            )


def _plain_file_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _validated(metadata: Any, source: str | os.PathLike):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    def malformed(what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{source} is not well-formed DCP metadata ({what}); the checkpoint is refused")

    if not isinstance(metadata, Metadata):
        raise malformed(f"it holds a {type(metadata).__name__}, not a Metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not all(
        isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata)) for k, v in entries.items()
    ):
        raise malformed("state_dict_metadata is not a dict of tensor/bytes entries")
    storage = getattr(metadata, "storage_data", None)
    if storage is not None:
        if not isinstance(storage, dict):
            raise malformed("storage_data is not a dict")
        for info in storage.values():
            if not isinstance(info, _StorageInfo):
                raise malformed(f"a storage_data entry is a {type(info).__name__}")
            relative_path = getattr(info, "relative_path", None)
            if not _plain_file_name(relative_path):
                raise UnsafeCheckpointError(
                    f"{source} points at data outside its checkpoint folder ({relative_path!r}); the checkpoint "
                    "is refused"
                )
            if not all(type(getattr(info, key, None)) is int for key in ("offset", "length")):
                raise malformed("a storage_data entry's offset or length is not an integer")
    return metadata


def _load_metadata_stream(stream, source: str | os.PathLike):
    try:
        metadata = _MetadataUnpickler(stream, source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # cut short or corrupt (nothing outside the allow-list was built)
        raise _damaged(source, f"not readable as DCP metadata: {_first_line(err)}") from err
    return _validated(metadata, source)


def read_dcp_metadata(checkpoint: str | os.PathLike, rank: int | None = None):
    """The ``Metadata`` of the DCP folder ``checkpoint`` (``__{rank}.metadata`` with ``rank``), read
    through the allow-list; raises ``UnsafeCheckpointError``, ``FileNotFoundError``."""
    path = Path(checkpoint) / (".metadata" if rank is None else f"__{rank}.metadata")
    _lstat_plain_file(path)
    with open(path, "rb") as stream:
        return _load_metadata_stream(stream, path)


# --- torch.load -------------------------------------------------------------------------------------

_WEIGHTS_ONLY = "Weights only load failed"
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every GLOBAL/STACK_GLOBAL in the pickle(s) in ``data``, read statically."""
    found: list[str] = []
    offset = 0
    while offset < len(data):
        stream = io.BytesIO(data[offset:])
        memo: dict[int, Any] = {}
        pushed: list[Any] = []
        arg: Any  # a str or int for the opcodes read below
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                    found.append(f"{pushed[-2]}.{pushed[-1]}")
                elif op.name == "MEMOIZE" and pushed:
                    memo[len(memo)] = pushed[-1]
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and pushed:
                    memo[int(arg)] = pushed[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed.append(memo.get(int(arg)))
                elif isinstance(arg, str):
                    pushed.append(arg)
                elif op.name not in ("FRAME", "PROTO"):
                    pushed.append(None)
        except Exception:
            break
        if stream.tell() == 0:
            break
        offset += stream.tell()
    return found


def _disallowed_global(data: bytes, message: str) -> str:
    payloads = [data]
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                payloads = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        except zipfile.BadZipFile:
            pass
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # private API; only the message depends on it
        allowed = set()
    names = [name for payload in payloads for name in _pickle_globals(payload)]
    unsafe = [n for n in names if n not in allowed and (allowed or not n.startswith(("torch.", "collections.")))]
    match = _GLOBAL_IN_MESSAGE.search(message)  # the one torch stopped at comes first
    unsafe = list(dict.fromkeys(([match.group(1)] if match else []) + unsafe))
    if unsafe:
        return ", ".join(unsafe[:4]) + (", ..." if len(unsafe) > 4 else "")
    after = message.split("WeightsUnpickler error:")[1] if "WeightsUnpickler error:" in message else ""
    detail = next((line.strip() for line in after.splitlines() if line.strip()), "")
    return "a construct weights-only loading refuses" + (f": {detail}" if detail else "")


def _load_weights_only(source: str | os.PathLike, file: str | os.PathLike | io.BytesIO, **kwargs: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*weights_only Unpickler.*")
            return torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        if _WEIGHTS_ONLY not in str(err):
            raise
        if isinstance(file, io.BytesIO):
            data = file.getvalue()
        else:
            with open(file, "rb") as handle:
                data = handle.read()
        raise _refusal(source, _disallowed_global(data, str(err))) from None


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike):
    """``safetensors.safe_open(path, framework="pt")``; a file cut short or not in the format raises
    ``DamagedCheckpointError`` naming it (safetensors checks the header against the file size)."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise _damaged(path, f"not a readable safetensors file: {_first_line(err)}") from None
    with handle:
        yield handle


def load_torch(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``; a file naming anything else raises
    ``UnsafeCheckpointError`` (one line: the file and the global), as does a symbolic link."""
    _lstat_plain_file(path)
    return _load_weights_only(path, path, **kwargs)


# --- torch.distributed.checkpoint -------------------------------------------------------------------


@functools.cache
def _dcp_classes():
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """``FileSystemReader`` whose ``read_metadata`` goes through the allow-list."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self._get_metadata_path(kwargs.get("rank"))
            _lstat_plain_file(path)
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _load_metadata_stream(stream, path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """``DefaultLoadPlanner`` reading non-tensor (``BytesIO``) items with ``weights_only=True``."""

        def __init__(self, checkpoint: str | os.PathLike, **kwargs: Any):
            super().__init__(**kwargs)
            self._checkpoint = checkpoint

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            value.seek(0)
            loaded = _load_weights_only(f"{self._checkpoint} (.distcp entry {fqn!r})", value)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafeFileSystemReader, SafeLoadPlanner


def safe_dcp_reader(checkpoint: str | os.PathLike):
    """A ``FileSystemReader`` for ``checkpoint`` whose metadata goes through the allow-list."""
    return _dcp_classes()[0](str(checkpoint))


def safe_dcp_planner(checkpoint: str | os.PathLike, **kwargs: Any):
    """A ``DefaultLoadPlanner`` (same keyword arguments) that reads non-tensor items weights-only."""
    return _dcp_classes()[1](checkpoint, **kwargs)


def _unwrap(err: BaseException, checkpoint: str | os.PathLike) -> BaseException | None:
    """The refusal or damage inside DCP's ``CheckpointException`` (it wraps every rank's failure), if any."""
    for failure in getattr(err, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, (UnsafeCheckpointError, DamagedCheckpointError)):
            return inner
        if isinstance(inner, pickle.UnpicklingError) and _WEIGHTS_ONLY in str(inner):  # a tensor item
            name = _GLOBAL_IN_MESSAGE.search(str(inner))
            return _refusal(
                f"{checkpoint} (.distcp data)", name.group(1) if name else "a construct weights-only loading refuses"
            )
        # torch.load's zip reader on an item whose bytes are cut or garbled (the sizes looked right).
        if isinstance(inner, EOFError) or (isinstance(inner, RuntimeError) and "PytorchStreamReader" in str(inner)):
            return _damaged(f"{checkpoint} (.distcp data)", _first_line(inner))
    return None


def _check_data_files(checkpoint: str | os.PathLike, metadata: Any) -> None:
    """Every ``.distcp`` file the metadata points at exists and reaches its last item's end: an
    interrupted copy or save leaves files short, which DCP would report as a zip-reader traceback."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, end in sorted(needed.items()):
        file = Path(checkpoint) / name
        try:
            size = _lstat_plain_file(file).st_size
        except FileNotFoundError:
            raise _damaged(file, "the file is missing; .metadata lists data in it") from None
        if size < end:
            raise _damaged(file, f"{size} bytes, but .metadata places data up to byte {end}")


def load_dcp(state_dict: dict[str, Any], checkpoint: str | os.PathLike, **planner_kwargs: Any) -> None:
    """``dcp.load(state_dict, checkpoint_id=checkpoint)`` through the safe reader and planner.

    The metadata and the data files' sizes are checked before DCP starts, so a refusal is raised here
    as ``UnsafeCheckpointError`` and a short file as ``DamagedCheckpointError`` rather than wrapped per
    rank; so is a refusal or damage found while reading the data files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    _check_data_files(checkpoint, read_dcp_metadata(checkpoint))
    try:
        dcp.load(
            state_dict,
            storage_reader=safe_dcp_reader(checkpoint),
            planner=safe_dcp_planner(checkpoint, **planner_kwargs),
        )
    except CheckpointException as err:
        refusal = _unwrap(err, checkpoint)
        if refusal is not None:
            raise refusal from None
        raise
