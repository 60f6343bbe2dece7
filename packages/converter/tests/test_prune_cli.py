"""--prune-vocab and --analyze-vocab through torchspec-data on the bundled sample conversations."""

import pytest
import torch

from torchspec.converter.cli import main
from torchspec.data import (
    build_local_tokenizer,
    build_training_dataset,
    count_supervised_tokens,
    sample_conversations_path,
)
from torchspec.draft_models import AutoEagle3DraftModel, LlamaEagle3Config

from converter_helpers import write_training_checkpoint


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_local_tokenizer(path)
    return path


def _draft(vocab):
    torch.manual_seed(0)
    config = LlamaEagle3Config(
        hidden_size=16, vocab_size=vocab, num_attention_heads=2, intermediate_size=32, torch_dtype="float32"
    )
    return AutoEagle3DraftModel.from_config(config)


def test_prune_vocab_keeps_the_most_frequent_supervised_tokens(tmp_path, tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    draft = _draft(len(tokenizer))
    write_training_checkpoint(draft, tmp_path / "run")
    data = str(sample_conversations_path())
    code = main(
        [
            "export",
            "--input",
            str(tmp_path / "run"),
            "--output",
            str(tmp_path / "out"),
            "--prune-vocab",
            "--draft-vocab-size",
            "300",
            "--dataset-path",
            data,
            "--tokenizer",
            str(tokenizer_dir),
            "--chat-template",
            "qwen",
            "--include-embeddings",
        ]
    )
    assert code == 0, capsys.readouterr().err
    pruned = AutoEagle3DraftModel.from_pretrained(tmp_path / "out")
    dataset, _ = build_training_dataset(data, tokenizer, "qwen", 2048)
    counts = count_supervised_tokens(dataset, len(tokenizer))
    kept = pruned.draft_to_target_ids()
    assert kept.numel() == 300 and torch.equal(kept, kept.sort().values)
    # every kept token is at least as frequent as every dropped one
    dropped = torch.ones(len(tokenizer), dtype=torch.bool)
    dropped[kept] = False
    assert counts[kept].min() >= counts[dropped].max()
    torch.testing.assert_close(pruned.lm_head.weight, draft.lm_head.weight[kept])


def test_analyze_vocab_prints_coverage_and_exports_nothing(tmp_path, tokenizer_dir, capsys):
    write_training_checkpoint(_draft(2048), tmp_path / "run")
    code = main(
        [
            "export",
            "--input",
            str(tmp_path / "run"),
            "--analyze-vocab",
            "--dataset-path",
            str(sample_conversations_path()),
            "--tokenizer",
            str(tokenizer_dir),
            "--chat-template",
            "qwen",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "1000" in out and "2000" in out and "%" in out
    assert not (tmp_path / "run_hf").exists()
