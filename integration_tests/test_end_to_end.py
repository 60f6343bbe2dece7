"""Train on the embedded default -> export -> from_pretrained -> real speculative decoding.

Margins were measured on this setup (2 CPU cores, fp32); the numbers are in each test's comment.
The untrained draft is the same architecture with the run's initial weights; its acceptance
length is 1.0 (only the bonus token is ever accepted). Acceptance length counts the bonus token.
"""

import pytest
import torch

from torchspec.draft_models import AutoEagle3DraftModel
from torchspec.trainer.commands.evaluate import evaluate_draft

from e2e_helpers import (
    PRUNED_ALT_AUX,
    SAMPLES,
    export,
    load_weights,
    prune_after_training,
    read_config,
    train_default,
    untrained_draft,
)

pytestmark = pytest.mark.slow

PROMPTS, NEW_TOKENS = 6, 48


def _evaluate(draft_dir, target):
    return evaluate_draft(str(draft_dir), str(target), SAMPLES, num_prompts=PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def target(default_target):
    return default_target


@pytest.fixture(scope="module", params=["llama", "mla"])
def trained(request, default_target, mla_target, trained_run, tmp_path_factory):
    """The default run of each draft against its default target: the Llama draft and the Qwen3
    target, the MLA draft and the DeepSeek-V3-style target (configs/default_*.yaml)."""
    arch = request.param
    target = default_target if arch == "llama" else mla_target
    run = trained_run(arch)
    root = tmp_path_factory.mktemp(f"e2e-{arch}")
    return dict(
        arch=arch,
        target=target,
        root=root,
        run=run,
        untrained=untrained_draft(arch, target, root / "untrained_hf"),
        exported=export(run, root / "run_hf"),
    )


def test_trained_draft_is_accepted_far_more_than_an_untrained_one(trained):
    target = trained["target"]
    # That vLLM loads and serves these exports is tested in test_engine.py, by vLLM.
    draft = AutoEagle3DraftModel.from_pretrained(trained["exported"])
    assert draft.config.architectures[0] == (
        "LlamaForCausalLMEagle3" if trained["arch"] == "llama" else "Eagle3DeepseekV2ForCausalLM"
    )
    before, after = _evaluate(trained["untrained"], target), _evaluate(trained["exported"], target)
    print(
        f"\n{trained['arch']}: acceptance untrained {before.acceptance_length:.3f}, trained "
        f"{after.acceptance_length:.3f}, "
        f"positions {after.position_acceptance}"
    )
    assert before.identical_to_target and after.identical_to_target
    # measured (6 prompts x 48 tokens, K=4): untrained 1.00 (llama), 1.03 (mla); after 80 steps (TTT
    # length 4) llama 2.16, mla 2.06 against the DeepSeek-V3-style target as built on one box, 1.66
    # against the same recipe built from a cold cache on another box (the code that had landed before
    # measured 1.66 there too: it is the built target, not the training). Hence a margin of 0.5.
    assert before.acceptance_length < 1.2
    assert after.acceptance_length > before.acceptance_length + 0.5, (before.acceptance_length, after.acceptance_length)


def test_post_training_pruning_keeps_acceptance(trained, tmp_path):
    target = trained["target"]
    out = prune_after_training(trained["run"], tmp_path / "pruned_hf", target)
    full, pruned = _evaluate(trained["exported"], target), _evaluate(out, target)
    print(
        f"\n{trained['arch']}: acceptance full vocab {full.acceptance_length:.3f}, pruned to 600 "
        f"{pruned.acceptance_length:.3f}"
    )
    assert pruned.identical_to_target
    # measured: identical acceptance (llama 2.16, mla 2.06); the 600 most frequent supervised tokens
    # cover nearly all of this data's assistant tokens
    assert pruned.acceptance_length > full.acceptance_length - 0.2, (full.acceptance_length, pruned.acceptance_length)


def test_train_time_vocab_pruning(target, trained_run, tmp_path):
    exported = export(trained_run("llama", *PRUNED_ALT_AUX), tmp_path / "hf")
    config, weights = read_config(exported), load_weights(exported)
    assert config["draft_vocab_size"] == 600 and weights["d2t"].dtype == torch.int64
    assert weights["lm_head.weight"].shape[0] == 600
    result = _evaluate(exported, target)
    print(f"\ntrain-time pruned (600): acceptance {result.acceptance_length:.3f}")
    assert result.identical_to_target
    assert result.acceptance_length > 2.0, result.acceptance_length  # measured 3.08; untrained 1.00


def test_resume_mid_run_then_export_matches_the_uninterrupted_run(tmp_path):
    steps, every = 12, 6
    train_default("llama", tmp_path / "straight", steps, f"checkpoint.save_interval={every}")

    class Interrupted(Exception):
        pass

    def stop_after_first_save(step, record):
        if step == every:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_default(
            "llama",
            tmp_path / "resumed",
            steps,
            f"checkpoint.save_interval={every}",
            step_callback=stop_after_first_save,
        )
    train_default("llama", tmp_path / "resumed", steps, f"checkpoint.save_interval={every}", "checkpoint.resume=auto")
    a = load_weights(export(tmp_path / "straight", tmp_path / "a", include_embeddings=True))
    b = load_weights(export(tmp_path / "resumed", tmp_path / "b", include_embeddings=True))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
