"""Speculative decoding reproduces the target's greedy output exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from torchspec.draft_models import AutoEagle3DraftModel, SpeculativeGenerator, target_greedy_generate
from torchspec.draft_models.speculative import rejection_sample

from draft_helpers import build_draft


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("target")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind, draft_vocab, k", [("llama", 97, 3), ("mla", 97, 1), ("llama", 40, 5), ("mla", 40, 4)])
def test_output_equals_target_greedy(tiny_target, tmp_path, kind, draft_vocab, k):
    draft = build_draft(kind, draft_vocab_size=draft_vocab)
    draft.load_embedding(tiny_target.get_input_embeddings().weight)
    draft.save_pretrained(tmp_path)
    draft = AutoEagle3DraftModel.from_pretrained(tmp_path)
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    expected, _ = target_greedy_generate(tiny_target, prompt, max_new_tokens=24)
    result = SpeculativeGenerator(draft, tiny_target, num_draft_tokens=k).generate(prompt, max_new_tokens=24)
    assert result.tokens == expected
    assert all(0 <= a <= k for a in result.accepted_per_round)
    # every round produced accepted + 1 tokens, except that the last may be cut at max_new_tokens
    assert sum(a + 1 for a in result.accepted_per_round) + 1 >= len(result.tokens)
    assert 1.0 <= result.acceptance_length <= k + 1
    shares = result.position_acceptance()
    assert len(shares) == k and all(shares[i] >= shares[i + 1] for i in range(k - 1))


def test_an_oracle_draft_is_fully_accepted(tiny_target):
    """A draft whose proposals are the target's own greedy tokens is accepted every time, so the
    acceptance length is K + 1: checks the verification bookkeeping, independent of any training."""
    draft = build_draft("llama")
    draft.load_embedding(tiny_target.get_input_embeddings().weight)
    prompt = [5, 17, 33, 2, 61]
    expected, _ = target_greedy_generate(tiny_target, prompt, max_new_tokens=40)
    generator = SpeculativeGenerator(draft, tiny_target, num_draft_tokens=3)
    sequence = prompt + expected + [0] * 8  # the future the target will choose

    def oracle_chain(aux, new_tokens, start, prefix_cache):
        # rows start.. carry the tokens at sequence indices start+1 ..; the chain continues after them
        first = start + new_tokens.shape[1] + 1
        return torch.tensor([sequence[first : first + 3]]), None, prefix_cache

    generator._draft_chain = oracle_chain
    result = generator.generate(prompt, max_new_tokens=40)
    assert result.tokens == expected
    assert result.accepted_per_round[:-1] == [3] * (len(result.accepted_per_round) - 1)


def test_stops_at_eos(tiny_target):
    draft = build_draft("mla")
    draft.load_embedding(tiny_target.get_input_embeddings().weight)
    prompt = [1, 2, 3, 4]
    expected, _ = target_greedy_generate(tiny_target, prompt, max_new_tokens=30)
    eos = expected[6]
    result = SpeculativeGenerator(draft, tiny_target, num_draft_tokens=4).generate(prompt, 30, eos_token_id=eos)
    assert result.tokens == expected[: expected.index(eos) + 1]


def test_bad_aux_layers_are_refused(tiny_target):
    with pytest.raises(ValueError, match="outside the target's 6 layers"):
        SpeculativeGenerator(build_draft("llama"), tiny_target, aux_layer_ids=[1, 3, 9])


def test_rejection_sampling_reproduces_the_target_distribution():
    """Draw a drafted token from q, verify it against p; the result must be distributed as p."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    samples = 40000
    drafted = torch.multinomial(q, samples, replacement=True, generator=generator)
    for token in drafted.tolist():
        counts[rejection_sample(p, q, token, generator)[1]] += 1
    # 4 standard errors of a binomial share at n = 40000 is at most 0.01
    torch.testing.assert_close(counts / samples, p, atol=0.01, rtol=0)


def test_sampling_at_temperature_is_seeded_and_well_formed(tiny_target):
    draft = build_draft("llama", draft_vocab_size=40)
    draft.load_embedding(tiny_target.get_input_embeddings().weight)
    runs = [SpeculativeGenerator(draft, tiny_target, num_draft_tokens=3, temperature=0.8, seed=7).generate([4, 8, 15], 20)
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 20
    assert all(0 <= t < 97 for t in runs[0].tokens)
    assert all(0 <= a <= 3 for a in runs[0].accepted_per_round)
