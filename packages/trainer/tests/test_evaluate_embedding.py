"""Which embedding table `trainer:evaluate` gives the draft: the one a serving engine would. vLLM
(`_maybe_share_embeddings`, llama_eagle3 `load_weights`) keeps the draft's own embed_tokens when the
folder holds one and takes the target's otherwise; SGLang keeps the draft's own when its hidden size
differs from the target's."""

import pytest
import torch
from safetensors import safe_open

from torchspec.trainer.commands.evaluate import evaluate_draft, load_for_evaluation

from trainer_test_helpers import save_small_llama_draft, save_tiny_qwen3

TARGET_HIDDEN = 64


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny untrained Qwen3 target with a local tokenizer (evaluate_draft renders prompts with it)."""
    from torchspec.data import build_local_tokenizer

    folder = tmp_path_factory.mktemp("target")
    tokenizer = build_local_tokenizer(folder, vocab_size=320)
    save_tiny_qwen3(folder, num_layers=6, vocab=len(tokenizer), hidden=TARGET_HIDDEN)
    return folder


def _save_draft(folder, target_dir, hidden_size: int, include_embeddings: bool):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(target_dir).vocab_size
    # its random embed_tokens differs from the target's
    save_small_llama_draft(folder, vocab, hidden_size, TARGET_HIDDEN, seed=1, include_embeddings=include_embeddings)
    return folder


def _table_in_file(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return handle.get_tensor("embed_tokens.weight")


@pytest.mark.parametrize(
    "hidden_size, include_embeddings, expected",
    [(32, True, "own"), (TARGET_HIDDEN, True, "own"), (TARGET_HIDDEN, False, "target")],
    ids=["narrower-own", "same-width-own", "same-width-none"],
)
def test_the_draft_gets_the_table_vllm_would_give_it(tmp_path, target_dir, hidden_size, include_embeddings, expected):
    folder = _save_draft(tmp_path / "draft", target_dir, hidden_size, include_embeddings)
    draft, target = load_for_evaluation(str(folder), str(target_dir))
    table = _table_in_file(folder) if expected == "own" else target.get_input_embeddings().weight
    assert torch.equal(draft.embed_tokens.weight, table)


def test_a_narrower_draft_without_its_table_is_refused(tmp_path, target_dir):
    folder = _save_draft(tmp_path / "draft", target_dir, 32, include_embeddings=False)
    with pytest.raises(ValueError, match="no embed_tokens.weight .* export the draft with its own embedding"):
        load_for_evaluation(str(folder), str(target_dir))


def test_evaluate_runs_a_draft_of_another_hidden_size(tmp_path, target_dir):
    from torchspec.data import sample_conversations_path

    folder = _save_draft(tmp_path / "draft", target_dir, 32, include_embeddings=True)
    result = evaluate_draft(
        str(folder),
        str(target_dir),
        str(sample_conversations_path()),
        num_prompts=2,
        max_new_tokens=6,
        num_draft_tokens=3,
    )
    assert result.num_prompts == 2 and result.identical_to_target
