"""Bad inputs to torchspec-data, one row a case: every user mistake is one ``DataError`` line naming
the file (or key) and the fix, and leaves no result behind.

The package has no command line; its entry points are ``build_training_dataset`` (the trainer's and
the converter's data path) and ``load_conversation_dataset`` (``trainer:evaluate``'s). "Nothing
written" means: the data folder is as it was and no finished dataset (``kept-*.arrow``, what a later
call would load as the result) exists in the cache. Add a row here with every new input or option.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import pytest

from torchspec.data import DataError, build_training_dataset, load_conversation_dataset

from data_test_helpers import load_tokenizer_with_template, write_jsonl

GOOD = {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}


@dataclass
class Case:
    id: str
    # Writes the input under the data folder; returns the path argument and extra keyword arguments.
    make: Callable[[Path], tuple[str, dict]]
    words: list[str]  # each must be in the message; "{path}" stands for the path argument
    call: str = "build"  # "build": build_training_dataset, "load": load_conversation_dataset
    kwargs: dict = field(default_factory=dict)


def _file(name: str, text: str) -> Callable[[Path], tuple[str, dict]]:
    def make(folder: Path):
        (folder / name).write_text(text)
        return str(folder / name), {}

    return make


def _records(name: str, records: list) -> Callable[[Path], tuple[str, dict]]:
    return lambda folder: (str(write_jsonl(folder / name, records)), {})


def _empty_folder(folder: Path):
    (folder / "chats").mkdir()
    (folder / "chats" / "notes.txt").write_text("not data\n")
    return str(folder / "chats"), {}


def _saved_without_split(folder: Path):
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(folder / "saved"))
    return str(folder / "saved"), {}


CASES = [
    Case("missing-file", lambda folder: (str(folder / "chats.jsonl"), {}), ["no such file or directory: {path}"]),
    Case(
        "hub-name-without-prefix",
        lambda folder: ("some-org/some-chats", {}),
        ["no such file or directory: some-org/some-chats", "write hf://datasets/some-org/some-chats"],
    ),
    Case(
        "empty-jsonl", _file("chats.jsonl", ""), ["{path}: no records in the file (empty)", "one JSON object per line"]
    ),
    Case("blank-lines-only", _file("chats.jsonl", "\n  \n\n"), ["{path}: no records in the file (empty)"]),
    Case("empty-json-array", _file("chats.json", "[]"), ["{path}: no records"]),
    Case("empty-jsonl-via-load", _file("chats.jsonl", ""), ["{path}: no records in the file (empty)"], call="load"),
    Case("folder-without-data-files", _empty_folder, ["{path}: directory holds no .jsonl, .json, .parquet files"]),
    Case("unsupported-suffix", _file("chats.txt", "hello\n"), ["{path}: unsupported file type '.txt'", ".jsonl"]),
    Case("broken-json-document", _file("chats.json", '[{"conversations": [}\n'), ["{path}:1: invalid JSON"]),
    Case(
        "json-document-not-an-array",
        _file("chats.json", json.dumps(GOOD)),
        ["{path}: expected a JSON array of records", "got a JSON dict"],
    ),
    Case(
        "wrong-prompt-key",
        _records("chats.jsonl", [GOOD, GOOD]),
        ["{path}:1: no 'msgs' key", "keys: ['conversations']", "set prompt_key"],
        kwargs={"prompt_key": "msgs"},
    ),
    Case(
        "wrong-prompt-key-via-load",
        _records("chats.jsonl", [GOOD, GOOD]),
        ["{path}:1: no 'msgs' key", "keys: ['conversations']", "all 2 records are invalid"],
        call="load",
        kwargs={"prompt_key": "msgs"},
    ),
    Case(
        "every-line-malformed",
        _file("chats.jsonl", '{"conversations": [}\nnot json\n'),
        ["no usable training sample in {path}", "{path}:1: invalid JSON", "fix or delete the line"],
    ),
    Case(
        "no-supervised-token",
        _records("chats.jsonl", [{"conversations": [{"role": "user", "content": "Q"}]}]),
        ["no usable training sample in {path}", "dropped 1 with no supervised token"],
    ),
    Case("saved-dataset-without-the-split", _saved_without_split, ["{path} has no split 'train'", "['validation']"]),
    Case(
        "unknown-template",
        _records("chats.jsonl", [GOOD]),
        ["unknown chat template 'qween'", "use one of", "qwen"],
        kwargs={"template": "qween"},
    ),
    Case("zero-workers", _records("chats.jsonl", [GOOD]), ["num_proc must be >= 1, got 0"], kwargs={"num_proc": 0}),
]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_data_error_line(case, tmp_path, tokenizer_dir, monkeypatch):
    def no_network(*args, **kwargs):  # only hf://datasets/NAME may reach the hub
        raise AssertionError(f"datasets.load_dataset{args} was called")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    folder, cache = tmp_path / "data", tmp_path / "cache"
    folder.mkdir()
    path, kwargs = case.make(folder)
    before = _snapshot(folder)
    kwargs = {**kwargs, **case.kwargs}
    with pytest.raises(DataError) as raised:
        if case.call == "load":
            load_conversation_dataset(path, cache_dir=cache, **kwargs)
        else:
            tokenizer = load_tokenizer_with_template(tokenizer_dir, "qwen")
            build_training_dataset(path, tokenizer, kwargs.pop("template", "qwen"), 64, cache_dir=cache, **kwargs)
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message, message
    for words in case.words:
        assert words.replace("{path}", path) in message, message
    assert _snapshot(folder) == before
    assert not (cache.exists() and list(cache.rglob("kept-*.arrow")))


def test_only_the_explicit_hub_form_reaches_the_hub(tmp_path, monkeypatch):
    """hf://datasets/NAME is the one way to the hub: NAME goes to datasets.load_dataset as is."""
    calls = []

    def fake_load_dataset(name, split, cache_dir):
        calls.append((name, split))
        return datasets.Dataset.from_list([GOOD])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_conversation_dataset("hf://datasets/some-org/some-chats", cache_dir=tmp_path)
    assert calls == [("some-org/some-chats", "train")]
    assert loaded["source"] == ["hf://datasets/some-org/some-chats[0]"]


def test_data_error_is_a_torchspec_error():
    from torchspec.draft_models.errors import TorchSpecError, UserInputError

    assert issubclass(DataError, UserInputError) and issubclass(DataError, TorchSpecError)
    assert issubclass(DataError, ValueError)
