"""Eagle3Model: alignment, losses against a direct per-row formula, gradients (activation checkpointing is
the trainer's: packages/trainer/tests/test_activation_checkpointing.py)."""

import pytest
import torch

from torchspec.draft_models import Eagle3Model, step0_loss_mask
from torchspec.draft_models.loss import DenseTargetProbs, fused_forward_kl

from draft_helpers import EAGLE3_1_VARIANTS, build_draft, forward_batch, make_batch, reference_ttt


@pytest.mark.parametrize("variant", sorted(EAGLE3_1_VARIANTS))
@pytest.mark.parametrize("pruned", [False, True])
def test_losses_match_the_row_by_row_formula(draft_kind, pruned, variant):
    draft = build_draft(draft_kind, draft_vocab_size=40 if pruned else 97, **EAGLE3_1_VARIANTS[variant])
    batch = make_batch()
    length = 4
    model = Eagle3Model(draft, length=length, loss_chunk_elements=97 * 5)  # several chunks
    out = forward_batch(model, batch)
    loss_sums, counts, corrects = reference_ttt(draft, batch, length, batch["token_loss_mask"], pruned)
    assert out.counted.tolist() == counts
    assert out.counted_mask.sum().item() == sum(counts)
    torch.testing.assert_close(
        out.loss_sums, torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in loss_sums]), rtol=1e-4, atol=1e-4
    )
    assert out.correct.sum(dim=(1, 2)).tolist() == corrects
    torch.testing.assert_close(out.losses, out.loss_sums / out.counted.clamp(min=1))

    # Gradients of the chunked loss equal the gradients of the direct formula.
    decay = 0.8
    reference = sum(decay**k * loss_sums[k] / max(counts[k], 1) for k in range(length))
    expected = torch.autograd.grad(reference, [p for p in draft.parameters() if p.requires_grad], allow_unused=True)
    actual = torch.autograd.grad(
        out.total_loss(decay), [p for p in draft.parameters() if p.requires_grad], allow_unused=True
    )
    for (name, _), e, a in zip([(n, p) for n, p in draft.named_parameters() if p.requires_grad], expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5, msg=name)


def test_pruned_vocab_reports_and_excludes_positions_outside_the_draft_vocab():
    draft = build_draft("llama", draft_vocab_size=30)
    batch = make_batch(seq_len=16)
    model = Eagle3Model(draft, length=3)
    valid = model.target_in_draft_vocab(batch["target_hidden"], batch["target_head_weight"])
    expected_valid = draft.t2d[(batch["target_hidden"] @ batch["target_head_weight"].T).argmax(-1)]
    assert torch.equal(valid, expected_valid)
    assert 0 < valid.sum() < valid.numel()  # the test exercises both cases
    loss_mask = step0_loss_mask(torch.ones_like(batch["input_ids"]))
    out = forward_batch(model, batch, loss_mask)
    k, b, t = out.counted_mask.nonzero(as_tuple=True)
    assert valid[b, t + 1 + k].all()
    assert torch.equal(out.counted, model.count_positions(loss_mask, batch["attention_mask"], valid))


def test_dense_target_probs_equal_the_lazy_target(draft_kind):
    draft = build_draft(draft_kind)
    batch = make_batch()
    loss_mask = step0_loss_mask(batch["token_loss_mask"])
    model = Eagle3Model(draft, length=3)
    lazy = forward_batch(model, batch, loss_mask)
    probs = torch.softmax(batch["target_hidden"] @ batch["target_head_weight"].T, -1)
    dense = model(batch["input_ids"], batch["hidden_states"], loss_mask, batch["attention_mask"], target_probs=probs)
    torch.testing.assert_close(lazy.loss_sums, dense.loss_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(lazy.correct, dense.correct)


def test_alignment_counts_each_step_one_token_further():
    draft = build_draft("llama")
    model = Eagle3Model(draft, length=3)
    token_mask = torch.zeros(1, 10, dtype=torch.long)
    token_mask[0, 6] = 1  # one supervised token
    counted = model.counted_positions(step0_loss_mask(token_mask))
    # Token 6 is predicted by row 4 at step 0, row 3 at step 1, row 2 at step 2.
    assert [row.nonzero().flatten().tolist() for row in counted[:, 0]] == [[4], [3], [2]]


def test_loss_normalizer_divides_the_sums():
    draft = build_draft("mla")
    batch = make_batch()
    model = Eagle3Model(draft, length=2, loss_decay=0.5)
    out = forward_batch(model, batch, loss_normalizer=torch.tensor([100.0, 50.0]))
    torch.testing.assert_close(out.losses, out.loss_sums / torch.tensor([100.0, 50.0]))
    assert out.loss.item() == pytest.approx((out.losses[0] + 0.5 * out.losses[1]).item())
    assert out.total_loss(0.5) is out.loss
    with pytest.raises(ValueError, match="loss_decay=0.5"):
        out.total_loss(0.8)


def test_gradients_reach_every_trainable_parameter_and_not_the_frozen_embedding(draft_kind):
    draft = build_draft(draft_kind)
    draft.freeze_embedding()
    batch = make_batch()
    model = Eagle3Model(draft, length=3)
    out = forward_batch(model, batch)
    out.total_loss().backward()
    assert draft.embed_tokens.weight.grad is None
    for name, param in draft.named_parameters():
        if name != "embed_tokens.weight":
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_backbone_shapes_with_and_without_cache(draft_kind):
    draft = build_draft(draft_kind)
    B, T, H = 2, 6, 32
    embeds, hidden = torch.randn(B, T, H), draft.project_hidden_states(torch.randn(B, T, 3 * H))
    positions = torch.arange(T).expand(B, T)
    cache_k = cache_v = None
    for step in range(3):
        hidden, cache_k, cache_v = draft.backbone(
            embeds, hidden, None, positions + step, cache_k, cache_v, use_cache=True
        )
        assert hidden.shape == (B, T, H)
        assert len(cache_k) == len(cache_v) == step + 1
        kv_heads = 2 if draft_kind == "llama" else 4  # GQA keeps kv heads; MLA expands the shared key
        assert cache_k[-1].shape[:3] == (B, kv_heads, T)
    out, no_k, no_v = draft.backbone(embeds, hidden, None, positions, None, None, use_cache=False)
    assert out.shape == (B, T, H) and no_k is None and no_v is None
    assert draft.compute_logits(out).shape == (B, T, draft.config.draft_vocab_size)


def test_fused_loss_rejects_row_tables_of_another_shape():
    with pytest.raises(ValueError, match=r"must all be \[steps, 2\]"):
        fused_forward_kl(
            torch.randn(2, 4),
            torch.randn(5, 4),
            DenseTargetProbs(torch.rand(1, 3, 5)),
            torch.tensor([1, 2]),
            torch.zeros(1, 3, dtype=torch.long),
            torch.zeros(1, 3),
            torch.zeros(1, 3, dtype=torch.bool),
        )


def test_the_fused_loss_under_no_grad_gives_the_same_sums_and_no_graph():
    draft = build_draft("llama")
    batch = make_batch()
    model = Eagle3Model(draft, length=2)
    with torch.no_grad():
        out = forward_batch(model, batch)
    assert not out.loss.requires_grad and out.loss.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):  # autograd's own message
        out.loss.backward()
    with_grad = forward_batch(model, batch)
    torch.testing.assert_close(out.loss_sums, with_grad.loss_sums)
    assert torch.equal(out.correct, with_grad.correct)


@pytest.mark.parametrize("retain_graph", [False, True])
def test_a_second_backward_through_the_fused_loss_says_so(retain_graph):
    """The gradients are formed in forward and handed over by the first backward; a second one
    (an accumulation loop that reuses an output) has nothing left to give."""
    draft = build_draft("llama")
    out = forward_batch(Eagle3Model(draft, length=2), make_batch())
    out.loss.backward(retain_graph=retain_graph)
    with pytest.raises(RuntimeError) as err:
        out.loss.backward()
    message = str(err.value)
    assert "\n" not in message and "second backward" in message and "forward again" in message, message


# A bf16 TTT step keeps its activations in bf16 (8 significant bits, up to 2**-9 off per rounding) and
# chains them through every step, so errors add up over layers and steps. Against the fp64 formula
# on the same bf16 weights and inputs (length 3, both drafts) the measured errors are: per-step loss
# sums 8e-4 relative, the objective 2.3e-4, each parameter's gradient 0.4-2.3% of its norm. Bounds,
# about twice those: 4e-3, 1e-3 and 5%.
BF16_LOSS_BOUND, BF16_OBJECTIVE_BOUND, BF16_GRADIENT_BOUND = 4e-3, 1e-3, 0.05


def test_bf16_ttt_losses_and_gradients_match_the_fp64_formula(draft_kind):
    import copy

    draft = build_draft(draft_kind).to(torch.bfloat16)
    reference_draft = copy.deepcopy(draft).double()  # the same bf16-rounded weights, exactly
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in make_batch().items()}
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    length, decay = 3, 0.8

    out = forward_batch(Eagle3Model(draft, length=length, loss_decay=decay), batch)
    out.total_loss().backward()
    assert draft.lm_head.weight.grad.dtype == torch.bfloat16

    loss_sums, counts, _ = reference_ttt(reference_draft, batch64, length, batch["token_loss_mask"])
    objective = sum(decay**k * loss_sums[k] / max(counts[k], 1) for k in range(length))
    objective.backward()
    expected_sums = torch.stack(loss_sums).detach()
    assert ((out.loss_sums.double() - expected_sums).abs() <= BF16_LOSS_BOUND * expected_sums.abs()).all()
    assert abs(out.loss.double() - objective.detach()) <= BF16_OBJECTIVE_BOUND * objective.detach()
    for (name, param), reference in zip(draft.named_parameters(), reference_draft.parameters()):
        error = (param.grad.double() - reference.grad).norm() / reference.grad.norm()
        assert error <= BF16_GRADIENT_BOUND, f"{name}: {error:.4f}"


def test_a_batch_without_counted_rows_gives_zero_loss_and_zero_gradients():
    """Under data parallelism a rank can receive a micro-batch with nothing supervised; it must still
    produce a graph (zero gradients) so collective gradient reduction does not hang."""
    draft = build_draft("llama")
    batch = make_batch()
    out = forward_batch(Eagle3Model(draft, length=3), batch, torch.zeros_like(batch["input_ids"]))
    assert out.counted.tolist() == [0, 0, 0] and out.losses.tolist() == [0.0, 0.0, 0.0]
    out.total_loss().backward()
    assert draft.lm_head.weight.grad is not None and draft.lm_head.weight.grad.abs().sum() == 0


def test_fused_loss_over_several_vocabulary_blocks_matches_the_direct_formula():
    """A vocabulary longer than one CPU logits block (1024 rows) and not a multiple of it, several
    position chunks: loss, per-step sums, top-1 agreement and both gradients against the formula
    written with full logits and log_softmax in float64."""
    from torchspec.draft_models.loss import TargetFromHead

    torch.manual_seed(0)
    vocab, hidden_size, rows, steps = 2 * 1024 + 77, 16, 12, 3
    hidden = torch.randn(rows, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) * 0.3).requires_grad_()
    target_hidden, target_weight = torch.randn(1, 5, hidden_size), torch.randn(vocab, hidden_size) * 0.3
    positions = torch.tensor([0, 1, 2, 3, 4])
    row_index = torch.randint(0, rows, (steps, 5))
    counted = torch.rand(steps, 5) > 0.2
    row_weight = torch.rand(steps, 5) * counted

    loss, loss_sums, correct = fused_forward_kl(
        hidden,
        weight,
        TargetFromHead(target_hidden, target_weight),
        positions,
        row_index,
        row_weight,
        counted,
        chunk_elements=2 * vocab,  # two positions a chunk
    )
    loss.backward()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    p = torch.softmax(target_hidden[0].double() @ target_weight.double().T, -1)[positions]  # [5, V]
    log_q = torch.log_softmax(h64[row_index] @ w64.T, -1)  # [steps, 5, V]
    row_loss = -(p * log_q).sum(-1)
    expected = (row_weight.double() * row_loss).sum()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_sums.double(), (row_loss * counted).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(correct, (log_q.argmax(-1) == p.argmax(-1)) & counted)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_on_the_cpu_the_loss_takes_128_target_positions_at_a_time_at_large_vocabularies():
    """The CPU default chunk: 2**23 [rows, vocab] elements, never fewer than 128 rows (the logits
    buffer and one chunk of target probabilities are the loss's two vocabulary-sized buffers)."""
    from torchspec.draft_models.loss import TargetDistribution

    class CountingTarget(TargetDistribution):
        def __init__(self, vocab):
            self.vocab, self.chunks = vocab, []

        def probs(self, positions):
            self.chunks.append(positions.numel())
            return torch.full((positions.numel(), self.vocab), 1.0 / self.vocab)

    for vocab, expected in [(1 << 16, [128, 128, 44]), (1 << 14, [300])]:  # 128 rows; 512 rows > 300
        target = CountingTarget(vocab)
        positions = torch.arange(300)
        rows = torch.zeros(1, 300, dtype=torch.long)
        every_row = torch.ones(1, 300, dtype=torch.bool)  # positions no step counts are never computed
        fused_forward_kl(
            torch.randn(1, 4), torch.randn(vocab, 4), target, positions, rows, torch.zeros(1, 300), every_row
        )
        assert target.chunks == expected


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("target_kind", ["head", "dense"])
def test_nan_or_inf_in_rows_that_do_not_count_changes_nothing(poison, target_kind):
    """Rows the loss does not count (their weight is 0) and target positions no step counts may hold
    anything: padding, a dump's garbage. The loss, its per-step sums, top-1 agreement and both
    gradients equal those of the same rows holding finite values (0 * NaN would be NaN)."""
    from torchspec.draft_models.loss import TargetFromHead

    torch.manual_seed(0)
    vocab, hidden_size, steps, rows = 53, 8, 3, 12
    positions = torch.arange(7)
    counted = torch.rand(steps, 7) > 0.3
    counted[:, 6] = False  # a position no step counts
    counted[0, :6] = True
    # Counted rows read rows 0..5 of the hidden states; the rest point at rows 6..11 only.
    row_index = torch.where(counted, torch.randint(0, 6, (steps, 7)), torch.randint(6, rows, (steps, 7)))
    row_weight = torch.rand(steps, 7) * counted
    clean_hidden = torch.randn(rows, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.5
    target_hidden, target_weight = torch.randn(1, 7, hidden_size), torch.randn(vocab, hidden_size) * 0.5

    def run(hidden, target_states):
        hidden = hidden.clone().requires_grad_()
        head = weight.clone().requires_grad_()
        if target_kind == "head":
            target = TargetFromHead(target_states, target_weight)
        else:
            target = DenseTargetProbs(torch.softmax(target_states @ target_weight.T, -1))
        loss, sums, correct = fused_forward_kl(
            hidden, head, target, positions, row_index, row_weight, counted, chunk_elements=3 * vocab
        )
        loss.backward()
        return loss, sums, correct, hidden.grad, head.grad

    poisoned_hidden, poisoned_target = clean_hidden.clone(), target_hidden.clone()
    poisoned_hidden[6:] = poison
    poisoned_target[0, 6] = poison
    expected, actual = run(clean_hidden, target_hidden), run(poisoned_hidden, poisoned_target)
    for name, e, a in zip(["loss", "loss_sums", "correct", "hidden grad", "lm_head grad"], expected, actual):
        assert torch.isfinite(a.float()).all(), name
        assert torch.equal(a, e), name
