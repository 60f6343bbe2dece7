"""Pruned draft vocabulary: selection rules, invariants, counts, coverage and the file format."""

from collections import Counter

import datasets
import pytest
import torch
from safetensors.torch import save_file

from torchspec.data import (
    DataError,
    VocabMapping,
    build_training_dataset,
    build_vocab_mapping,
    count_supervised_tokens,
    coverage_report,
    sample_conversations_path,
)

from data_test_helpers import load_tokenizer_with_template


def check_invariants(mapping: VocabMapping):
    assert mapping.d2t.dtype == torch.int64 and mapping.t2d.dtype == torch.bool
    assert mapping.t2d.sum() == mapping.draft_vocab_size
    target_ids = torch.arange(mapping.draft_vocab_size) + mapping.d2t
    assert mapping.t2d[target_ids].all()
    assert (target_ids[1:] > target_ids[:-1]).all()


@pytest.fixture(scope="module")
def sample_dataset(tokenizer_dir, tmp_path_factory):
    tokenizer = load_tokenizer_with_template(tokenizer_dir, "qwen")
    dataset, _ = build_training_dataset(
        sample_conversations_path(), tokenizer, "qwen", 512, cache_dir=tmp_path_factory.mktemp("cache")
    )
    return dataset, len(tokenizer)


def test_counts_match_a_plain_python_count(sample_dataset):
    dataset, vocab_size = sample_dataset
    expected = Counter(token for row in dataset for token, flag in zip(row["input_ids"], row["loss_mask"]) if flag)
    counts = count_supervised_tokens(dataset, vocab_size, batch_size=100)
    assert counts.shape == (vocab_size,) and counts.dtype == torch.int64
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)
    assert torch.equal(count_supervised_tokens(dataset.to_list(), vocab_size), counts)  # plain iterable too


def test_most_frequent_supervised_tokens_are_kept(sample_dataset):
    dataset, vocab_size = sample_dataset
    counts = count_supervised_tokens(dataset, vocab_size)
    mapping = build_vocab_mapping(dataset, vocab_size, 200)
    check_invariants(mapping)
    kept = set(mapping.draft_to_target_ids().tolist())
    threshold = min(counts[i] for i in kept)
    # Nothing outside the draft vocab is more frequent than anything inside it.
    assert all(counts[i] <= threshold for i in range(vocab_size) if i not in kept)
    assert torch.equal(build_vocab_mapping(counts, vocab_size, 200).d2t, mapping.d2t)


def test_ties_go_to_lower_ids_and_unseen_ids_fill_from_the_bottom():
    counts = torch.zeros(12, dtype=torch.long)
    counts[[9, 4, 7]] = torch.tensor([5, 3, 3])
    assert build_vocab_mapping(counts, 12, 2).draft_to_target_ids().tolist() == [4, 9]
    filled = build_vocab_mapping(counts, 12, 6)
    check_invariants(filled)
    assert filled.draft_to_target_ids().tolist() == [0, 1, 2, 4, 7, 9]
    assert filled.d2t.tolist() == [0, 0, 0, 1, 3, 4]


def test_full_size_draft_is_the_identity():
    mapping = build_vocab_mapping(torch.arange(10), 10, 10)
    assert mapping.d2t.tolist() == [0] * 10 and mapping.t2d.all()


def test_save_and_load_round_trip(tmp_path):
    mapping = build_vocab_mapping(torch.tensor([0, 7, 1, 0, 9, 3, 0, 2]), 8, 4)
    path = tmp_path / "vocab_mapping.safetensors"
    mapping.save(path)
    loaded = VocabMapping.load(path)
    assert torch.equal(loaded.d2t, mapping.d2t) and torch.equal(loaded.t2d, mapping.t2d)
    assert (loaded.vocab_size, loaded.draft_vocab_size) == (8, 4)


def test_load_rejects_foreign_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        VocabMapping.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a safetensors vocab mapping"):
        VocabMapping.load(tmp_path / "junk.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="not a vocab mapping file"):
        VocabMapping.load(tmp_path / "other.safetensors")


def test_inconsistent_mappings_are_rejected():
    with pytest.raises(DataError, match="inconsistent vocab mapping"):
        VocabMapping(torch.tensor([0, 2]), torch.tensor([True, True, False, False]), 2, 4)


@pytest.mark.parametrize(
    ("draft", "match"), [(0, "must be positive"), (-3, "must be positive"), (11, "exceeds the target vocab_size=10")]
)
def test_bad_draft_sizes(draft, match):
    with pytest.raises(DataError, match=match):
        build_vocab_mapping(torch.ones(10, dtype=torch.long), 10, draft)


def test_token_ids_beyond_the_vocab_are_reported():
    rows = datasets.Dataset.from_list([{"input_ids": [1, 20], "loss_mask": [1, 1]}])
    with pytest.raises(DataError, match="token id 20 is outside vocab_size=10"):
        count_supervised_tokens(rows, 10)


def test_coverage_report_against_brute_force():
    counts = torch.tensor([5, 0, 1, 9, 3, 2])
    report = coverage_report(counts, [1, 2, 4, 6])
    total = 20
    assert report == [(1, 9 / total), (2, 14 / total), (4, 19 / total), (6, 1.0)]
    with pytest.raises(DataError, match="no supervised tokens"):
        coverage_report(torch.zeros(4, dtype=torch.long), [2])
    with pytest.raises(DataError, match="exceeds"):
        coverage_report(counts, [7])
