"""The TTT attention pattern against an explicit attention over the unrolled sequence."""

import pytest
import torch

from torchspec.draft_models import Eagle3Model, step0_loss_mask
from torchspec.draft_models.ttt_attention import TTTMask, ttt_attention

from draft_helpers import build_draft, make_batch


def _unrolled_reference(queries, keys, values, padding, scale):
    """Attention over the sequence of all steps laid end to end, with the mask written out as
    rules over (step, position) pairs and a plain softmax, one query at a time."""
    steps, (batch, heads, seq_len, _) = len(queries), queries[0].shape
    outs = []
    for k in range(steps):
        out = torch.zeros(batch, heads, seq_len, values[0].shape[-1], dtype=torch.float64)
        for b in range(batch):
            for t in range(seq_len):
                visible = [(0, s) for s in range(t + 1) if padding[b, s]] + [(j, t) for j in range(1, k + 1)]
                key = torch.stack([keys[j][b, :, s] for j, s in visible], dim=1).double()  # [H, n, D]
                value = torch.stack([values[j][b, :, s] for j, s in visible], dim=1).double()
                scores = torch.einsum("hd,hnd->hn", queries[k][b, :, t].double(), key) * scale
                out[b, :, t] = torch.einsum("hn,hnd->hd", scores.softmax(-1), value)
        outs.append(out)
    return outs


@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_cached_suffix_attention_equals_unrolled_full_mask(backend):
    torch.manual_seed(0)
    batch, heads, seq_len, dim, steps = 2, 3, 7, 8, 4
    padding = torch.ones(batch, seq_len, dtype=torch.bool)
    padding[1, 5:] = False
    queries = [torch.randn(batch, heads, seq_len, dim) for _ in range(steps)]
    keys = [torch.randn(batch, heads, seq_len, dim) for _ in range(steps)]
    values = [torch.randn(batch, heads, seq_len, dim + 2) for _ in range(steps)]  # MLA: v dim != qk dim
    expected = _unrolled_reference(queries, keys, values, padding, scale=0.3)

    mask = TTTMask(padding, backend)
    cache_keys = cache_values = None
    with torch.no_grad():  # flex_attention has no CPU backward
        for k in range(steps):
            out, cache_keys, cache_values = ttt_attention(
                queries[k], keys[k], values[k], mask, cache_keys, cache_values, True, 0.3
            )
            assert len(cache_keys) == len(cache_values) == k + 1
            torch.testing.assert_close(out.double(), expected[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_dim, value_dim, kv_heads", [(8, 8, 2), (8, 6, 4), (6, 8, 1)])
def test_sdpa_gradients_equal_the_unrolled_reference(key_dim, value_dim, kv_heads):
    """Backward of the causal-plus-diagonal split (flash kernel + closed-form diagonal) against
    autograd through the explicit per-query softmax, for grouped heads and unequal head sizes."""
    torch.manual_seed(1)
    batch, heads, seq_len, steps = 2, 4, 6, 4
    padding = torch.ones(batch, seq_len, dtype=torch.bool)
    padding[0, 4:] = False

    def leaves(shape):
        return [torch.randn(*shape, requires_grad=True) for _ in range(steps)]

    queries = leaves((batch, heads, seq_len, key_dim))
    keys = leaves((batch, kv_heads, seq_len, key_dim))
    values = leaves((batch, kv_heads, seq_len, value_dim))
    out_weights = [torch.randn(batch, heads, seq_len, value_dim, dtype=torch.float64) for _ in range(steps)]

    group = heads // kv_heads
    expected = _unrolled_reference(
        queries,
        [k.repeat_interleave(group, 1) for k in keys],
        [v.repeat_interleave(group, 1) for v in values],
        padding,
        scale=0.4,
    )
    expected_grads = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(expected, out_weights)), queries + keys + values
    )
    mask, cache_keys, cache_values, outs = TTTMask(padding, "sdpa"), None, None, []
    for k in range(steps):
        out, cache_keys, cache_values = ttt_attention(
            queries[k], keys[k], values[k], mask, cache_keys, cache_values, True, 0.4
        )
        outs.append(out)
    for out, reference in zip(outs, expected):
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(outs, out_weights)), queries + keys + values)
    for index, (actual, reference) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-5, msg=f"input {index}")


def test_grouped_query_attention_shares_kv_heads():
    torch.manual_seed(0)
    padding = torch.ones(1, 5, dtype=torch.bool)
    query = torch.randn(1, 4, 5, 8)
    key, value = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, _, _ = ttt_attention(query, key, value, TTTMask(padding), None, None, True, 0.5)
    repeated, _, _ = ttt_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), TTTMask(padding), None, None, True, 0.5
    )
    torch.testing.assert_close(out, repeated)


def test_without_cache_attention_is_plain_causal():
    torch.manual_seed(0)
    padding = torch.ones(1, 6, dtype=torch.bool)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    out, cache_keys, cache_values = ttt_attention(q, k, v, TTTMask(padding), None, None, False, 0.5)
    assert cache_keys is None and cache_values is None
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    torch.testing.assert_close(out, expected)


def test_sdpa_and_flex_give_the_same_ttt_losses(draft_kind):
    draft = build_draft(draft_kind)
    batch = make_batch()
    loss_mask = step0_loss_mask(batch["token_loss_mask"])
    outputs = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex_attention"):
            model = Eagle3Model(draft, length=4, attention_backend=backend)
            outputs[backend] = model(
                batch["input_ids"],
                batch["hidden_states"],
                loss_mask,
                batch["attention_mask"],
                target_hidden=batch["target_hidden"],
                target_head_weight=batch["target_head_weight"],
            )
    torch.testing.assert_close(outputs["sdpa"].losses, outputs["flex_attention"].losses, rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs["sdpa"].correct, outputs["flex_attention"].correct)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of sdpa, flex_attention"):
        Eagle3Model(build_draft("llama"), attention_backend="flash")


def test_flex_attention_compiles_once_for_every_ttt_step_and_sequence_length(monkeypatch):
    """The compiled flex kernel sees the same key length at every TTT step (the diagonal keys are
    merged outside it) and dynamic sequence lengths, so a run compiles one graph, not one per step
    and length (torch's recompile limit would otherwise send it back to eager flex)."""
    from torchspec.draft_models import ttt_attention as module

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(module, "_flex_attention_for", lambda device: module._compiled_flex_attention(counting_backend))
    torch._dynamo.reset()
    draft = build_draft("llama")
    model = Eagle3Model(draft, length=4, attention_backend="flex_attention")
    with torch.no_grad():
        for seq_len in (19, 37, 53):  # lengths that equal no model dimension (duck sizing would tie them)
            batch = make_batch(seq_len=seq_len)
            model(
                batch["input_ids"],
                batch["hidden_states"],
                step0_loss_mask(batch["token_loss_mask"]),
                batch["attention_mask"],
                target_hidden=batch["target_hidden"],
                target_head_weight=batch["target_head_weight"],
            )
    assert len(graphs) == 1
