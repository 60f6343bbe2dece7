"""Speculative decoding reproduces the target's greedy output exactly, and its sampling distribution."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from torchspec.draft_models import AutoEagle3DraftModel, SpeculativeGenerator, target_greedy_generate
from torchspec.draft_models.speculative import rejection_sample, top_p_filter

from draft_helpers import EAGLE3_1_VARIANTS, build_draft, explicit_fc, explicit_next_hidden


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and several threads spin against each other on a
    busy machine (one sampled generation took ~0.27 s instead of ~0.01 s on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("target")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _favour_two_tokens(target, draft, seed=0):
    """Make greedy acceptance common without training. Random weights agree on the argmax about once
    in 97 tokens, so nearly every round accepts 0 drafts and an accepted-count check compares lists
    of zeros. Give target and draft the same two favourite tokens ``a`` and ``b`` (lm_head rows
    ``+w`` and ``-w``, an independent random ``w`` for each model, large enough to beat every other
    row): each then picks ``a`` or ``b`` by the sign of a projection of its own hidden state, so a
    drafted token is accepted about half the time and rounds accept anything from 0 to K drafts.
    The output is then almost constant, hence the unmodified target is tested too. Returns a
    modified copy of the target; the draft is changed in place."""
    target = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(seed)
    last = draft.config.draft_vocab_size - 2
    a, b = (int(draft.draft_to_target_ids()[i]) for i in (1, last))
    with torch.no_grad():
        w = torch.randn(target.config.hidden_size, generator=generator)
        target.lm_head.weight[a], target.lm_head.weight[b] = w, -w
        u = 5 * torch.randn(draft.config.hidden_size, generator=generator)  # outweighs the other rows (std 0.2)
        draft.lm_head.weight[1], draft.lm_head.weight[last] = u, -u
    return target


@torch.no_grad()
def _reference_greedy_rounds(draft, target, prompt, k, max_new_tokens, aux_layer_ids):
    """Greedy speculative decoding written without any cache: every draft step re-runs the draft over
    the whole prefix, and every verification re-runs the target over prompt + accepted + chain.

    Draft rows follow EAGLE-3: row ``t`` (RoPE position ``t``) reads the target's aux hidden states
    at ``t`` and the token at ``t + 1`` and predicts the token at ``t + 2``. The chain then appends
    rows that read the draft's own output of the row before (pre-norm; normed under norm_output)
    and the token just drafted.
    Returns the generated tokens, the accepted drafts per round and every round's drafted chain."""
    offset = draft.d2t if draft.d2t is not None else 0
    to_target = torch.arange(draft.config.draft_vocab_size) + offset
    sequence = list(prompt)
    sequence.append(int(target(torch.tensor([sequence])).logits[0, -1].argmax()))
    accepted_per_round, chains = [], []
    while len(sequence) - len(prompt) < max_new_tokens:
        # aux states of the verified tokens; the last token (the previous bonus) is not verified yet
        states = target(torch.tensor([sequence[:-1]]), output_hidden_states=True).hidden_states
        hidden = explicit_fc(draft, torch.cat([states[i] for i in aux_layer_ids], dim=-1))
        tokens, chain = sequence[1:], []
        for _ in range(k):
            out, _, _ = draft.backbone(
                draft.embed_input_ids(torch.tensor([tokens])),
                hidden,
                None,
                torch.arange(len(tokens))[None],
                use_cache=False,
            )
            chain.append(int(to_target[draft.compute_logits(out[0, -1]).argmax()]))
            hidden = torch.cat([hidden, explicit_next_hidden(draft, out[:, -1:])], dim=1)
            tokens = tokens + chain[-1:]
        choices = target(torch.tensor([sequence + chain])).logits[0, len(sequence) - 1 :].argmax(-1).tolist()
        accepted = 0
        while accepted < k and chain[accepted] == choices[accepted]:
            accepted += 1
        accepted_per_round.append(accepted)
        chains.append(chain)
        sequence += chain[:accepted] + [choices[accepted]]
    return sequence[len(prompt) :][:max_new_tokens], accepted_per_round, chains


@pytest.mark.parametrize("favourites", [False, True], ids=["random", "two-favourites"])
@pytest.mark.parametrize(
    "kind, draft_vocab, k, variant, favour_seed",
    [
        ("llama", 97, 3, "eagle3", 0),
        ("mla", 97, 1, "eagle3", 0),
        ("llama", 40, 5, "eagle3", 2),  # seed 0 accepts no whole chain of 5 here
        ("mla", 40, 4, "eagle3", 0),
        ("llama", 40, 4, "all", 0),
        ("mla", 97, 3, "fc_norm", 0),
        ("mla", 40, 4, "norm_output", 0),
    ],
)
def test_output_equals_target_greedy(tiny_target, tmp_path, kind, draft_vocab, k, variant, favour_seed, favourites):
    """Token for token, the generator matches greedy decoding, and every round drafts the chain and
    accepts the number of tokens that a cache-free re-implementation does (EAGLE-3.1 options included)."""
    draft = build_draft(kind, draft_vocab_size=draft_vocab, **EAGLE3_1_VARIANTS[variant])
    draft.load_embedding(tiny_target.get_input_embeddings().weight)
    target = _favour_two_tokens(tiny_target, draft, favour_seed) if favourites else tiny_target
    draft.save_pretrained(tmp_path)
    draft = AutoEagle3DraftModel.from_pretrained(tmp_path)
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    max_new_tokens = 24
    expected, _ = target_greedy_generate(target, prompt, max_new_tokens=max_new_tokens)
    aux_layer_ids = [2, 3, 5]  # the default for the 6-layer target, where [2, L // 2, L - 3] repeats a layer
    reference_tokens, reference_rounds, reference_chains = _reference_greedy_rounds(
        draft, target, prompt, k, max_new_tokens, aux_layer_ids
    )
    assert reference_tokens == expected  # the reference itself is greedy decoding
    if favourites:  # rounds that accept the whole chain and rounds that stop short of it
        assert max(reference_rounds) == k and min(reference_rounds) < k
    else:  # random drafts are rejected almost always; the drafted chains carry this case
        assert len(set(map(tuple, reference_chains))) > len(reference_chains) // 2

    generator = SpeculativeGenerator(draft, target, num_draft_tokens=k)
    assert generator.aux_layer_ids == aux_layer_ids
    chains, draft_chain = [], generator._draft_chain

    def recording_chain(*args):  # watches the chains; changes nothing
        chain, probs, cache = draft_chain(*args)
        chains.append(chain[0].tolist())
        return chain, probs, cache

    generator._draft_chain = recording_chain
    result = generator.generate(prompt, max_new_tokens=max_new_tokens)
    assert result.tokens == expected
    assert chains == reference_chains  # RoPE positions, aux rows and the draft cache all line up
    assert result.accepted_per_round == reference_rounds
    rounds = len(reference_rounds)
    assert result.rounds == rounds
    assert result.acceptance_length == pytest.approx(sum(a + 1 for a in reference_rounds) / rounds)
    assert result.position_acceptance() == pytest.approx(
        [sum(a >= i for a in reference_rounds) / rounds for i in range(1, k + 1)]
    )


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


# The tiny target's logits have a standard deviation of about 0.1, so T = 0.03 gives next-token
# distributions of a realistic shape: the top token ~50%, a few more of 5-20%, a long thin tail.
TEMPERATURE = 0.03
SAMPLING_PROMPT = [4, 8, 15]
NEW_TOKENS = 3


@torch.no_grad()
def _target_sampling_distribution(target, prompt, temperature, depth, top_p=1.0):
    """The exact law of ``depth`` tokens sampled from the target alone: the joint ``P(x1 .. xd)`` as a
    ``[V] * depth`` tensor, by running the target on every prefix (97 ** (depth - 1) of them), and
    the conditionals: ``conditionals[d][i]`` is the next-token law after the generated prefix whose
    tokens, read as base-V digits, give ``i``."""
    vocab = target.config.vocab_size
    prefixes = torch.tensor([prompt])
    joint, conditionals = torch.ones(1, dtype=torch.float64), []
    for d in range(depth):
        probs = torch.softmax(target(prefixes).logits[:, -1].double() / temperature, dim=-1)
        probs = top_p_filter(probs, top_p)
        conditionals.append(probs)
        joint = (joint[:, None] * probs).reshape(-1)
        if d + 1 < depth:
            next_tokens = torch.arange(vocab).repeat(len(prefixes))[:, None]
            prefixes = torch.cat([prefixes.repeat_interleave(vocab, dim=0), next_tokens], dim=1)
    return joint.reshape([vocab] * depth), conditionals


def _assert_sampled_from(samples, probs, what, n_sd=4.5, min_cell=0.02):
    """``samples`` ``[n, d]`` were drawn from ``probs`` (``[V] * d``).

    Cells: every outcome of probability >= ``min_cell`` on its own, all the others pooled in one. A
    cell's count is Binomial(n, p), so its share may miss p by ``n_sd`` standard deviations,
    ``sqrt(p (1 - p) / n)``, plus one sample for discreteness. For a correct sampler the exact
    binomial probability of missing that band is 7e-6 for large counts and at most 4e-5 for the
    smallest cells here (n * p ~ 8, where the upper tail is heavier than the normal's), so at most
    3e-3 over the ~70 cells of all views in a test: the tolerance follows from the sample count
    alone, and the fixed seeds make the outcome reproducible anyway."""
    n, depth = samples.shape
    index = torch.zeros(n, dtype=torch.long)
    for j in range(depth):
        index = index * probs.shape[j] + samples[:, j]
    flat = probs.reshape(-1)
    counts = torch.bincount(index, minlength=flat.numel()).double()
    big = flat >= min_cell
    expected = torch.cat([flat[big], flat[~big].sum()[None]])
    observed = torch.cat([counts[big], counts[~big].sum()[None]]) / n
    allowed = n_sd * (expected * (1 - expected) / n).sqrt() + 1 / n
    worst = int(((observed - expected).abs() / allowed).argmax())
    assert (observed - expected).abs().le(allowed).all(), (
        f"{what}, {n} samples: a cell of probability {expected[worst]:.4f} got share {observed[worst]:.4f} "
        f"(allowed +-{allowed[worst]:.4f})"
    )


def _assert_target_distribution(samples, joint):
    """Views of the generated tokens ``x1 x2 x3`` against the target's exact law: the joint (spread
    thin: most of it lands in the pooled cell), each token's marginal and each adjacent pair (few,
    large cells: sharp), and x2 given the likeliest x1 and x3 given the likeliest (x1, x2) (what
    each draft position is verified against, given its context)."""
    depth = joint.dim()

    def law_of(positions):
        return joint.sum(dim=[i for i in range(depth) if i not in positions]) if len(positions) < depth else joint

    _assert_sampled_from(samples, joint, "joint law")
    for j in range(depth):
        _assert_sampled_from(samples[:, [j]], law_of([j]), f"x{j + 1}")
    for j in range(depth - 1):
        _assert_sampled_from(samples[:, j : j + 2], law_of([j, j + 1]), f"(x{j + 1}, x{j + 2})")
    for j in range(1, depth):
        prefix_law = law_of(list(range(j)))
        prefix = torch.tensor(torch.unravel_index(prefix_law.argmax(), prefix_law.shape))
        rows = (samples[:, :j] == prefix).all(dim=1)
        conditional = law_of(list(range(j + 1)))[tuple(prefix)]
        what = f"x{j + 1} given x1..x{j} = {prefix.tolist()}"
        _assert_sampled_from(samples[rows][:, [j]], conditional / conditional.sum(), what)


def _sample(generator, count):
    """``count`` generations of NEW_TOKENS tokens ``[count, NEW_TOKENS]``, and all their rounds' accepted counts."""
    results = [generator.generate(SAMPLING_PROMPT, NEW_TOKENS) for _ in range(count)]
    return torch.tensor([r.tokens for r in results]), [a for r in results for a in r.accepted_per_round]


def _use_close_proposal(generator, conditionals, mix=0.6, seed=0):
    """Replace the draft by a proposal close to the target: ``q = mix * p + (1 - mix) * r``, where
    ``p`` is the target's exact law for the context being drafted and ``r`` a fixed random law, so
    most drafts are accepted, whole chains often, and the bonus token is exercised. The state the
    generator hands back between rounds (its draft cache) is used to carry the verified tokens, and
    checked against the rows handed in."""
    vocab, prompt = generator.vocab_size, SAMPLING_PROMPT
    rng = torch.Generator().manual_seed(seed)
    r = torch.softmax(2 * torch.randn(vocab, generator=rng, dtype=torch.float64), dim=-1)

    def chain(aux, new_tokens, start, verified):
        verified = prompt[:1] if start == 0 else verified
        assert len(verified) == start + 1 and aux.shape[1] == new_tokens.shape[1]
        verified = verified + new_tokens[0].tolist()  # rows start.. carry the tokens at start + 1 ..
        tokens, probs = [], []
        for _ in range(generator.num_draft_tokens):
            generated = verified[len(prompt) :] + tokens
            q = r
            if len(generated) < len(conditionals):  # deeper drafts are never looked at
                index = 0
                for token in generated:
                    index = index * vocab + token
                q = mix * conditionals[len(generated)][index] + (1 - mix) * r
            tokens.append(int(torch.multinomial(q, 1, generator=rng)))
            probs.append(q.float())
        return torch.tensor([tokens]), probs, verified

    generator._draft_chain = chain


@pytest.fixture(scope="module")
def target_law(tiny_target):
    return _target_sampling_distribution(tiny_target, SAMPLING_PROMPT, TEMPERATURE, NEW_TOKENS)


def test_sampling_with_a_random_draft_follows_the_target(tiny_target, target_law):
    """A real EAGLE-3 draft with random weights (pruned vocab: its proposals reach the target vocab
    through d2t) proposes tokens unrelated to the target's; the rejection rule must still make the
    output follow the target's sampling law softmax(logits / T)."""
    draft = build_draft("llama", draft_vocab_size=40)
    draft.load_embedding(tiny_target.get_input_embeddings().weight)
    with torch.no_grad():  # logits of std ~0.1 like the target's: proposals spread over a few tokens
        draft.lm_head.weight.mul_(0.1)

    def make():
        return SpeculativeGenerator(draft, tiny_target, num_draft_tokens=2, temperature=TEMPERATURE, seed=7)

    samples, accepted = _sample(make(), 1500)
    _assert_target_distribution(samples, target_law[0])
    # mostly rejected (the residual max(0, p - q) decides), yet accepted often enough to matter
    assert 0.02 < sum(a > 0 for a in accepted) / len(accepted) < 0.2
    assert torch.equal(_sample(make(), 20)[0], samples[:20])  # seeded


@pytest.mark.parametrize("k", [1, 2])
def test_sampling_with_a_close_proposal_follows_the_target(tiny_target, target_law, k):
    """Most drafts accepted: the accept branch, the bonus token after a whole chain (k = 1) and a
    rejection after an accepted draft (k = 2) all have to keep the target's law."""
    generator = SpeculativeGenerator(
        build_draft("llama"), tiny_target, num_draft_tokens=k, temperature=TEMPERATURE, seed=k
    )
    _use_close_proposal(generator, target_law[1])
    samples, accepted = _sample(generator, 1200)
    _assert_target_distribution(samples, target_law[0])
    # whole chains were accepted often, so the bonus token (k = 1) and deep drafts (k = 2) were used
    assert accepted.count(k) > 0.3 * len(accepted) and accepted.count(0) > 0.1 * len(accepted)


def test_sampling_without_the_rejection_rule_is_caught(tiny_target, target_law, monkeypatch):
    """The check above has teeth: accepting every draft yields the proposal's law, not the target's."""
    from torchspec.draft_models import speculative

    monkeypatch.setattr(speculative, "rejection_sample", lambda p, q, drafted, generator=None: (True, drafted))
    generator = SpeculativeGenerator(
        build_draft("llama"), tiny_target, num_draft_tokens=2, temperature=TEMPERATURE, seed=2
    )
    _use_close_proposal(generator, target_law[1])
    samples, _ = _sample(generator, 600)
    with pytest.raises(AssertionError, match="samples: a cell of probability"):
        _assert_target_distribution(samples, target_law[0])


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))
    torch.testing.assert_close(top_p_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))  # reached exactly
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([0.0, 1.0, 0.0, 0.0]))  # at least one
    assert top_p_filter(probs, 1.0) is probs
    rows = torch.stack([probs, probs.flip(0)])  # row by row over the last dimension
    torch.testing.assert_close(top_p_filter(rows, 0.7)[1], top_p_filter(probs.flip(0), 0.7))


def _random_small_draft(tiny_target):
    draft = build_draft("llama", draft_vocab_size=40)
    draft.load_embedding(tiny_target.get_input_embeddings().weight)
    with torch.no_grad():  # logits of std ~0.1 like the target's: proposals spread over a few tokens
        draft.lm_head.weight.mul_(0.1)
    return draft


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_top_p_sampling_follows_the_targets_nucleus(tiny_target, draft_sampling):
    """Top-p on the target (and on a sampling draft); "greedy" is vLLM's default draft at T > 0: the
    argmax proposed, verified as a one-hot proposal (accepted with probability p(x))."""
    top_p = 0.6
    joint, _ = _target_sampling_distribution(tiny_target, SAMPLING_PROMPT, TEMPERATURE, NEW_TOKENS, top_p=top_p)
    generator = SpeculativeGenerator(
        _random_small_draft(tiny_target),
        tiny_target,
        num_draft_tokens=2,
        temperature=TEMPERATURE,
        seed=6,
        top_p=top_p,
        draft_sampling=draft_sampling,
    )
    samples, accepted = _sample(generator, 500)
    _assert_target_distribution(samples, joint)
    assert any(a > 0 for a in accepted)
    # the nucleus is smaller than the full law's support: tokens outside it never appear
    assert joint[tuple(samples.T)].gt(0).all()


def test_sampling_options_are_checked(tiny_target):
    draft = build_draft("llama")
    with pytest.raises(ValueError, match="top_p"):
        SpeculativeGenerator(draft, tiny_target, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="draft_sampling"):
        SpeculativeGenerator(draft, tiny_target, temperature=1.0, draft_sampling="beam")
