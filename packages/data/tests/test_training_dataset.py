"""build_training_dataset: rows, statistics, invalid records, and the tokenization cache."""

import json

import pytest

from torchspec.data import DataError, build_training_dataset, sample_conversations_path, tokenize_conversation
from torchspec.data import training_dataset as training_dataset_module

from data_test_helpers import CONVERSATION, load_tokenizer_with_template, write_jsonl

LONG_ANSWER = " ".join(f"word{i}" for i in range(80))
LONG_PROMPT = " ".join(f"item{i}" for i in range(80))
VALID = [
    CONVERSATION,
    [{"role": "user", "content": "Say many words."}, {"role": "assistant", "content": LONG_ANSWER}],  # truncated
    [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
    [{"role": "user", "content": "Only a question, never answered."}],  # no supervised token
    [{"role": "user", "content": LONG_PROMPT}, {"role": "assistant", "content": "ok"}],  # answer cut off
]
MAX_LENGTH = 64


@pytest.fixture
def data_file(tmp_path):
    lines = [{"conversations": c} for c in VALID[:2]]
    lines += ['{"conversations": [}', {"conversations": [{"role": "narrator", "content": "x"}]}]
    lines += [{"conversations": c} for c in VALID[2:]]
    return write_jsonl(tmp_path / "chats.jsonl", lines)


@pytest.fixture
def tokenizer(tokenizer_dir):
    return load_tokenizer_with_template(tokenizer_dir, "qwen")


@pytest.fixture
def map_calls(monkeypatch):
    """Counts the batches the tokenizing map function actually processes (0 on a cache hit)."""
    calls = []
    original = training_dataset_module._tokenize_batch

    def counting(batch, **kwargs):
        calls.append(len(batch["source"]))
        return original(batch, **kwargs)

    monkeypatch.setattr(training_dataset_module, "_tokenize_batch", counting)
    return calls


def test_rows_and_statistics(tmp_path, data_file, tokenizer):
    dataset, stats = build_training_dataset(data_file, tokenizer, "qwen", MAX_LENGTH, cache_dir=tmp_path / "cache")

    expected = [tokenize_conversation(c, tokenizer, "qwen") for c in VALID]
    kept = [
        {key: values[:MAX_LENGTH] for key, values in sample.items()}
        for sample in expected
        if any(sample["loss_mask"][:MAX_LENGTH])
    ]
    assert dataset.column_names == ["input_ids", "loss_mask"]
    assert dataset.to_list() == kept
    assert stats.read == 7 and stats.skipped_invalid == 2 and stats.dropped_no_supervised == 2 and stats.kept == 3
    assert stats.truncated == sum(
        len(s["input_ids"]) > MAX_LENGTH for s in expected if any(s["loss_mask"][:MAX_LENGTH])
    )
    assert stats.truncated >= 1
    assert stats.supervised_tokens == sum(sum(s["loss_mask"]) for s in kept)
    assert stats.total_tokens == sum(len(s["input_ids"]) for s in kept)
    assert stats.summary().startswith(
        "read 7 conversations: kept 3, skipped 2 invalid, dropped 2 with no supervised token"
    )


def test_invalid_records_fatal_on_request(tmp_path, data_file, tokenizer):
    with pytest.raises(DataError, match=rf"^{data_file}:3: invalid JSON .*\(2 invalid records; pass skip_invalid=True"):
        build_training_dataset(data_file, tokenizer, "qwen", MAX_LENGTH, cache_dir=tmp_path / "c", skip_invalid=False)


def test_records_the_template_cannot_render_are_counted(tmp_path, tokenizer):
    tool_chat = [
        {"role": "user", "content": "q"},
        {"role": "tool", "content": "t"},
        {"role": "assistant", "content": "a"},
    ]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"conversations": CONVERSATION}, {"conversations": tool_chat}])
    _, stats = build_training_dataset(path, tokenizer, "phi3", None, cache_dir=tmp_path / "c")
    assert (stats.kept, stats.skipped_invalid) == (1, 1)
    with pytest.raises(DataError, match=rf"{path}:2: message 1: template 'phi3' has no 'tool' role"):
        build_training_dataset(path, tokenizer, "phi3", None, cache_dir=tmp_path / "c", skip_invalid=False)


def test_nothing_usable_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chats.jsonl", ['{"broken', {"conversations": [{"role": "user", "content": "q"}]}])
    with pytest.raises(
        DataError, match=r"no usable training sample in .*kept 0.*first invalid record: .*:1: invalid JSON"
    ):
        build_training_dataset(path, tokenizer, "qwen", None, cache_dir=tmp_path / "c")


def test_attention_mask_and_hf_template(tmp_path, data_file, tokenizer):
    registry, _ = build_training_dataset(data_file, tokenizer, "qwen", MAX_LENGTH, cache_dir=tmp_path / "c")
    hf, _ = build_training_dataset(
        data_file, tokenizer, "hf", MAX_LENGTH, cache_dir=tmp_path / "c", return_attention_mask=True
    )
    assert hf.column_names == ["input_ids", "loss_mask", "attention_mask"]
    assert all(row["attention_mask"] == [1] * len(row["input_ids"]) for row in hf)
    assert hf.select_columns(["input_ids", "loss_mask"]).to_list() == registry.to_list()


def test_cache_hit_on_identical_inputs(tmp_path, data_file, tokenizer, map_calls):
    first, first_stats = build_training_dataset(data_file, tokenizer, "qwen", MAX_LENGTH, cache_dir=tmp_path / "c")
    assert map_calls
    map_calls.clear()
    second, second_stats = build_training_dataset(data_file, tokenizer, "qwen", MAX_LENGTH, cache_dir=tmp_path / "c")
    assert map_calls == []
    assert second.to_list() == first.to_list() and second_stats == first_stats
    assert {f["filename"] for f in second.cache_files} == {f["filename"] for f in first.cache_files}


def test_cache_miss_when_any_input_changes(tmp_path, data_file, tokenizer_dir, tokenizer, map_calls):
    def tokenized_again(path=data_file, tok=tokenizer, template="qwen", max_length=MAX_LENGTH, **options):
        map_calls.clear()
        build_training_dataset(path, tok, template, max_length, cache_dir=tmp_path / "c", **options)
        return bool(map_calls)

    assert tokenized_again()
    assert not tokenized_again()
    assert tokenized_again(max_length=MAX_LENGTH + 1)
    assert tokenized_again(template="phi4")
    assert tokenized_again(keep_reasoning=False)
    assert tokenized_again(system_prompt="Be nice.")
    assert tokenized_again(tok=load_tokenizer_with_template(tokenizer_dir, "llama3"))  # other chat_template
    grown = load_tokenizer_with_template(tokenizer_dir, "qwen")
    grown.add_tokens(["word1"])
    assert tokenized_again(tok=grown)
    assert tokenized_again(use_cache=False)
    with data_file.open("a") as out:
        out.write(json.dumps({"conversations": CONVERSATION}) + "\n")
    assert tokenized_again()
    assert not tokenized_again()


def test_two_processes_give_the_same_dataset(tmp_path, tokenizer):
    path = sample_conversations_path()
    one, one_stats = build_training_dataset(path, tokenizer, "qwen", 256, cache_dir=tmp_path / "one")
    two, two_stats = build_training_dataset(path, tokenizer, "qwen", 256, num_proc=2, cache_dir=tmp_path / "two")
    shards = [f["filename"] for f in two.cache_files if "/tokenized-" in f["filename"]]
    assert len(shards) == 2  # one shard per process
    assert two.to_list() == one.to_list() and two_stats == one_stats
