"""Sources: JSON Lines, JSON, Parquet, folders, save_to_disk, hub names; broken records by file and line."""

import json

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchspec.data import DataError, load_conversation_dataset, sample_conversations_path
from torchspec.data.loading import read_conversation_records

from data_test_helpers import write_jsonl

OPENAI = {"conversations": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2", "reasoning": "R2"}]}
MESSAGES = {"messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}]}


def contents(dataset):
    return [[m["content"] for m in conversation] for conversation in dataset["conversations"]]


def test_jsonl_with_both_shapes_and_the_messages_key(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [OPENAI, SHAREGPT, "", MESSAGES])
    dataset = load_conversation_dataset(path, cache_dir=tmp_path / "cache")
    assert contents(dataset) == [["Q1", "A1"], ["Q2", "A2"], ["Q3", "A3"]]
    assert dataset["conversations"][1][1] == {"role": "assistant", "content": "A2", "reasoning_content": "R2"}
    assert dataset["source"] == [f"{path}:1", f"{path}:2", f"{path}:4"]  # line 3 is blank


def test_custom_prompt_key(tmp_path):
    record = {"dialog": OPENAI["conversations"], "conversations": "not this one"}
    path = write_jsonl(tmp_path / "chats.jsonl", [record])
    assert contents(load_conversation_dataset(path, prompt_key="dialog", cache_dir=tmp_path / "c")) == [["Q1", "A1"]]


def test_json_array_parquet_and_folders(tmp_path):
    folder = tmp_path / "data"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps([OPENAI, SHAREGPT]))
    write_jsonl(folder / "nested" / "b.jsonl", [MESSAGES])
    table = pa.Table.from_pylist([OPENAI])
    pq.write_table(table, folder / "c.parquet")
    (folder / "notes.txt").write_text("ignored")
    dataset = load_conversation_dataset(folder, cache_dir=tmp_path / "cache")
    # Files in sorted path order: a.json, c.parquet, nested/b.jsonl.
    assert contents(dataset) == [["Q1", "A1"], ["Q2", "A2"], ["Q1", "A1"], ["Q3", "A3"]]
    assert dataset["source"][2] == f"{folder / 'c.parquet'}[0]"


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    plain = datasets.Dataset.from_list([{"messages": MESSAGES["messages"], "id": 7}])
    plain.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": plain, "test": plain}).save_to_disk(str(tmp_path / "dict"))
    assert contents(load_conversation_dataset(tmp_path / "single", cache_dir=tmp_path / "c")) == [["Q3", "A3"]]
    assert contents(load_conversation_dataset(tmp_path / "dict", split="test", cache_dir=tmp_path / "c")) == [
        ["Q3", "A3"]
    ]
    with pytest.raises(DataError, match=r"has no split 'validation'; pass split= one of \['test', 'train'\]"):
        load_conversation_dataset(tmp_path / "dict", split="validation")


def test_in_memory_dataset(tmp_path):
    dataset = datasets.Dataset.from_list([SHAREGPT, {"conversations": [{"from": "robot", "value": "x"}]}])
    loaded = load_conversation_dataset(dataset, cache_dir=tmp_path / "cache")
    assert contents(loaded) == [["Q2", "A2"]] and loaded["source"] == ["dataset[0]"]
    with pytest.raises(DataError, match=r"^dataset\[1\]: message 0: unknown role 'robot'"):
        load_conversation_dataset(dataset, cache_dir=tmp_path / "cache", skip_invalid=False)


def test_malformed_line_is_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [OPENAI, '{"conversations": [', SHAREGPT])
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON \(.* at column \d+\); fix or delete the line"):
        load_conversation_dataset(path, skip_invalid=False, cache_dir=tmp_path / "cache")
    assert contents(load_conversation_dataset(path, cache_dir=tmp_path / "cache")) == [["Q1", "A1"], ["Q2", "A2"]]


def test_invalid_records_name_the_line_and_the_problem(tmp_path):
    bad_role = {"conversations": [{"role": "narrator", "content": "x"}]}
    no_key = {"text": "hello"}
    path = write_jsonl(tmp_path / "chats.jsonl", [OPENAI, bad_role, no_key])
    with pytest.raises(DataError, match=rf"{path}:2: message 0: unknown role 'narrator'.*\(2 invalid records"):
        load_conversation_dataset(path, skip_invalid=False, cache_dir=tmp_path / "cache")
    records = read_conversation_records(path, cache_dir=tmp_path / "cache")
    assert (
        records["error"][2]
        == f"{path}:3: no 'conversations' key (keys: ['text']); set prompt_key to the messages column"
    )


def test_broken_json_document_is_fatal_with_its_line(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text('[\n  {"conversations": []},\n  oops\n]')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_conversation_dataset(path, cache_dir=tmp_path / "cache")


def test_edited_file_is_reloaded(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [OPENAI])
    assert contents(load_conversation_dataset(path, cache_dir=tmp_path / "cache")) == [["Q1", "A1"]]
    write_jsonl(path, [MESSAGES])
    assert contents(load_conversation_dataset(path, cache_dir=tmp_path / "cache")) == [["Q3", "A3"]]


def test_missing_paths_and_unreachable_hub_names(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file or directory"):
        load_conversation_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory holds no .jsonl, .json, .parquet files"):
        load_conversation_dataset(tmp_path / "empty")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # A hub name is tried only in its explicit form, and offline that is one line too.
    with pytest.raises(DataError, match="no such file or directory: no-such-org/no-such-dataset; .* write hf://"):
        load_conversation_dataset("no-such-org/no-such-dataset", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="^hf://datasets/no-such-org/no-such-dataset: cannot load this hub dataset"):
        load_conversation_dataset("hf://datasets/no-such-org/no-such-dataset", cache_dir=tmp_path / "cache")


def test_bundled_samples_are_valid_and_varied(tmp_path):
    path = sample_conversations_path()
    assert path.stat().st_size < 1_500_000
    dataset = load_conversation_dataset(path, skip_invalid=False, cache_dir=tmp_path)
    conversations = dataset["conversations"]
    assert 300 <= len(conversations) <= 600
    assert any(c[0]["role"] == "system" for c in conversations)
    assert any(c[0]["role"] != "system" for c in conversations)
    assert any(m["reasoning_content"] for c in conversations for m in c)
    assert all(sum(m["role"] == "assistant" for m in c) >= 2 for c in conversations)
