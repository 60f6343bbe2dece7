"""Read conversation records from files, folders, ``save_to_disk`` datasets or the hub, normalized.

Every source becomes one Arrow-backed ``datasets.Dataset`` with three columns:

- ``conversations``: the normalized messages (``role``, ``content``, ``reasoning_content``)
- ``source``: where the record came from, ``file:line`` for JSON Lines, ``file[index]`` elsewhere
- ``error``: empty, or why the record is unusable (malformed JSON, unknown role, ...)

Invalid records are kept with their error so that callers can count them, skip them or fail on them.
Local files are parsed here (so a broken line is reported by file and line) and written through
``Dataset.from_generator``, fingerprinted by the files' contents: a second load of unchanged files reads
the cached Arrow table, an edited file is re-read.

Nothing goes to the network unless asked for: a path that is not on disk is an error, and only the
explicit ``hf://datasets/NAME`` form loads hub dataset ``NAME`` with ``datasets.load_dataset``. (A
mistyped local path used to be tried as a hub name and wait on the network before failing.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from torchspec.data.conversation import normalize_conversation
from torchspec.data.errors import DataError

__all__ = ["HUB_PREFIX", "SUPPORTED_SUFFIXES", "load_conversation_dataset", "read_conversation_records"]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
# The one spelling that reaches the Hugging Face hub: hf://datasets/ORG/NAME.
HUB_PREFIX = "hf://datasets/"
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
# Bump when normalization changes, so cached records are rebuilt.
_NORMALIZATION_VERSION = 1
_PROMPT_KEY_ALIASES = ("conversations", "messages")

_RECORD_FEATURES = datasets.Features(
    {
        "conversations": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.Value("string"),
                "reasoning_content": datasets.Value("string"),
            }
        ),
        "source": datasets.Value("string"),
        "error": datasets.Value("string"),
    }
)


def load_conversation_dataset(
    path: str | os.PathLike | datasets.Dataset,
    prompt_key: str = "conversations",
    *,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    skip_invalid: bool = True,
) -> datasets.Dataset:
    """Load conversations from ``path`` and normalize them to OpenAI role/content messages.

    ``path``: a ``.jsonl``/``.json``/``.parquet`` file, a directory of them (searched recursively), a
    directory written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, ``hf://datasets/NAME``
    for a hub dataset, or a ``datasets.Dataset``. ``prompt_key`` names the column holding the messages
    (``messages`` is accepted when the default is not present). Returns columns ``conversations`` and
    ``source``; invalid records are dropped, or raise ``DataError`` when ``skip_invalid=False``. A
    source whose records are all invalid (e.g. none has ``prompt_key``) raises ``DataError`` either way.
    """
    records = read_conversation_records(path, prompt_key, split=split, cache_dir=cache_dir)
    errors = records.data.column("error").to_pylist()
    invalid = [i for i, error in enumerate(errors) if error]
    if invalid and not skip_invalid:
        raise DataError(f"{errors[invalid[0]]} ({len(invalid)} invalid records; pass skip_invalid=True to skip them)")
    if invalid and len(invalid) == len(errors):  # skipping them all would hide the cause behind "no data"
        raise DataError(f"{errors[0]} (all {len(errors)} records are invalid)")
    if invalid:
        invalid_set = set(invalid)
        records = records.select([i for i in range(len(records)) if i not in invalid_set])
    return records.remove_columns("error")


def read_conversation_records(
    path: str | os.PathLike | datasets.Dataset,
    prompt_key: str = "conversations",
    *,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """All records of ``path`` with ``conversations``, ``source`` and ``error`` columns (see module doc)."""
    cache_dir = str(cache_dir) if cache_dir is not None else None
    if isinstance(path, datasets.Dataset):
        return _normalize_dataset(path, prompt_key, "dataset", cache_dir)
    if isinstance(path, datasets.DatasetDict):
        return _normalize_dataset(_pick_split(path, split, "the DatasetDict"), prompt_key, "dataset", cache_dir)

    if str(path).startswith(HUB_PREFIX):
        return _hub_records(str(path).removeprefix(HUB_PREFIX), prompt_key, split, cache_dir)
    local = Path(path).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, str(local))
        return _normalize_dataset(loaded, prompt_key, str(local), cache_dir)
    if local.exists():
        files = _data_files(local)
        fingerprint = _hash(
            {
                "files": [[str(f.resolve()), _file_digest(f)] for f in files],
                "prompt_key": prompt_key,
                "version": _NORMALIZATION_VERSION,
            }
        )
        gen_kwargs: dict[str, Any] = {"files": [str(f) for f in files], "prompt_key": prompt_key}
        try:
            return datasets.Dataset.from_generator(
                _generate_records,
                features=_RECORD_FEATURES,
                cache_dir=cache_dir,
                gen_kwargs=gen_kwargs,
                fingerprint=fingerprint,
            )
        except datasets.exceptions.DatasetGenerationError as error:
            if isinstance(error.__cause__, DataError):  # a whole-file problem; datasets wraps it
                raise error.__cause__ from None
            raise
        except ValueError:
            # datasets refuses to build a table of zero rows ('Instruction "train" corresponds to no data').
            if next(_generate_records(**gen_kwargs), None) is None:
                raise DataError(
                    f"{path}: no records in {'the file' if local.is_file() else 'its files'} (empty); "
                    f"add conversations, one JSON object per line with a '{prompt_key}' list of messages"
                ) from None
            raise
    hint = f"; for the Hugging Face hub dataset {path}, write {HUB_PREFIX}{path}" if _HUB_NAME.match(str(path)) else ""
    raise DataError(f"no such file or directory: {path}{hint}")


def _hub_records(name: str, prompt_key: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    """The records of hub dataset ``name`` (asked for explicitly as ``hf://datasets/NAME``)."""
    try:
        loaded = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as error:  # offline, unknown name, missing split...: all mean "cannot load this"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"{HUB_PREFIX}{name}: cannot load this hub dataset ({type(error).__name__}: {first_line}); "
            "check the name and the network, or pass a local .jsonl/.json/.parquet file or directory"
        ) from error
    return _normalize_dataset(loaded, prompt_key, f"{HUB_PREFIX}{name}", cache_dir)


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


def _pick_split(dataset_dict: datasets.DatasetDict, split: str, where: str) -> datasets.Dataset:
    if split not in dataset_dict:
        raise DataError(f"{where} has no split {split!r}; pass split= one of {sorted(dataset_dict)}")
    return dataset_dict[split]


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [path]
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix in SUPPORTED_SUFFIXES
        and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: directory holds no {', '.join(SUPPORTED_SUFFIXES)} files")
    return files


def _generate_records(files: list[str], prompt_key: str) -> Iterator[dict]:
    for file in files:
        suffix = Path(file).suffix
        if suffix == ".parquet":
            yield from _parquet_records(file, prompt_key)
        elif suffix == ".jsonl":
            yield from _json_lines_records(file, prompt_key)
        else:
            yield from _json_records(file, prompt_key)


def _json_lines_records(file: str, prompt_key: str) -> Iterator[dict]:
    with open(file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            source = f"{file}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield _invalid(source, f"invalid JSON ({error.msg} at column {error.colno}); fix or delete the line")
                continue
            yield _record(record, prompt_key, source)


def _json_records(file: str, prompt_key: str) -> Iterator[dict]:
    with open(file, encoding="utf-8") as handle:
        text = handle.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values, one per line: JSON Lines under a .json name
            yield from _json_lines_records(file, prompt_key)
            return
        raise DataError(f"{file}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(document, list):
        raise DataError(
            f"{file}: expected a JSON array of records (or JSON Lines), got a JSON {type(document).__name__}"
        )
    for index, record in enumerate(document):
        yield _record(record, prompt_key, f"{file}[{index}]")


def _parquet_records(file: str, prompt_key: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield _record(record, prompt_key, f"{file}[{index}]")
            index += 1


def _record(record, prompt_key: str, source: str) -> dict:
    try:
        return {
            "conversations": normalize_conversation(_messages_of(record, prompt_key)),
            "source": source,
            "error": "",
        }
    except DataError as error:
        return _invalid(source, str(error))


def _invalid(source: str, message: str) -> dict:
    return {"conversations": [], "source": source, "error": f"{source}: {message}"}


def _messages_of(record, prompt_key: str):
    if isinstance(record, list):  # a bare list of messages
        return record
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object with a '{prompt_key}' key, got {type(record).__name__}")
    keys = [prompt_key] + [k for k in _PROMPT_KEY_ALIASES if k != prompt_key and prompt_key in _PROMPT_KEY_ALIASES]
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    raise DataError(f"no '{prompt_key}' key (keys: {sorted(record)}); set prompt_key to the messages column")


def _normalize_dataset(
    dataset: datasets.Dataset, prompt_key: str, origin: str, cache_dir: str | None
) -> datasets.Dataset:
    columns = [k for k in (prompt_key, *_PROMPT_KEY_ALIASES) if k in dataset.column_names]
    if not columns:
        raise DataError(f"{origin}: no '{prompt_key}' column (columns: {dataset.column_names}); set prompt_key")
    # datasets' own fingerprint of the loaded data (a hash of its files or of the transforms that built it).
    fingerprint = _hash({"data": dataset._fingerprint, "prompt_key": columns[0], "version": _NORMALIZATION_VERSION})
    cache_file = str(Path(cache_dir) / f"records-{fingerprint}.arrow") if cache_dir is not None else None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return dataset.map(
        _normalize_batch,
        batched=True,
        with_indices=True,
        input_columns=[columns[0]],
        fn_kwargs={"prompt_key": columns[0], "origin": origin},
        remove_columns=dataset.column_names,
        features=_RECORD_FEATURES,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file,
        desc="Normalizing conversations",
    )


def _normalize_batch(messages: list, indices: list[int], prompt_key: str, origin: str) -> dict:
    records = [_record({prompt_key: m}, prompt_key, f"{origin}[{i}]") for m, i in zip(messages, indices)]
    return {key: [r[key] for r in records] for key in _RECORD_FEATURES}


def _file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]
