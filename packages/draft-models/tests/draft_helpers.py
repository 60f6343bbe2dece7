import contextlib

import torch

from torchspec.draft_models import AutoEagle3DraftModel, DeepseekEagle3Config, LlamaEagle3Config, step0_loss_mask

VOCAB = 97


def tiny_llama_config(**overrides):
    values = dict(
        hidden_size=32,
        vocab_size=VOCAB,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,  # deliberately != hidden_size / heads
        intermediate_size=48,
        max_position_embeddings=64,
        torch_dtype="float32",
    )
    values.update(overrides)
    return LlamaEagle3Config(**values)


def tiny_mla_config(**overrides):
    values = dict(
        hidden_size=32,
        vocab_size=VOCAB,
        num_attention_heads=4,
        intermediate_size=48,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        max_position_embeddings=64,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        torch_dtype="float32",
    )
    values.update(overrides)
    return DeepseekEagle3Config(**values)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (norm weights included) so that tests can tell layers apart."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if param.ndim == 1 else 0.0))
    return model


def pruned_mapping(vocab: int, draft_vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    kept = torch.randperm(vocab, generator=generator)[:draft_vocab].sort().values
    d2t = kept - torch.arange(draft_vocab)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[kept] = True
    return d2t, t2d


def build_draft(kind: str, seed: int = 0, **overrides):
    config = tiny_llama_config(**overrides) if kind == "llama" else tiny_mla_config(**overrides)
    model = randomize(AutoEagle3DraftModel.from_config(config), seed)
    if config.is_vocab_pruned:
        model.set_vocab_mapping(*pruned_mapping(config.vocab_size, config.draft_vocab_size, seed))
    return model


# Each EAGLE-3.1 variant tested: config overrides by name.
EAGLE3_1_VARIANTS = {
    "eagle3": {},
    "fc_norm": {"fc_norm": True},
    "norm_before_fc": {"norm_before_fc": True},
    "norm_output": {"norm_output": True},
    "all": {"fc_norm": True, "norm_before_fc": True, "norm_output": True},
}


def explicit_rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def explicit_fc(draft, aux):
    """``fc`` over the aux hidden states, written from vLLM's ``combine_hidden_states``: one norm over
    the concatenation (norm_before_fc), then one norm per aux state (fc_norm), then the matmul."""
    config, eps = draft.config, draft.config.rms_norm_eps
    if config.norm_before_fc:
        aux = explicit_rms_norm(aux, draft.input_norm.weight, eps)
    if config.fc_norm:
        width = config.target_hidden_size
        aux = torch.cat(
            [explicit_rms_norm(aux[..., i * width : (i + 1) * width], draft.fc_norm[i].weight, eps) for i in range(3)],
            -1,
        )
    return aux @ draft.fc.weight.T


def explicit_next_hidden(draft, prenorm):
    """What the engines feed the next draft step: vLLM's ``aux_output`` (post-norm under norm_output)."""
    if draft.config.norm_output:
        return explicit_rms_norm(prenorm, draft.norm.weight, draft.config.rms_norm_eps)
    return prenorm


def make_batch(batch=2, seq_len=12, target_hidden=32, vocab=VOCAB, seed=0, pad_last=3):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    if pad_last:
        attention_mask[-1, seq_len - pad_last :] = 0
    return dict(
        input_ids=input_ids,
        hidden_states=torch.randn(batch, seq_len, 3 * target_hidden, generator=generator),
        attention_mask=attention_mask,
        target_hidden=torch.randn(batch, seq_len, target_hidden, generator=generator),
        target_head_weight=torch.randn(vocab, target_hidden, generator=generator),
        token_loss_mask=(torch.rand(batch, seq_len, generator=generator) > 0.3).long() * attention_mask,
    )


def explicit_ttt_attention(query, key, value, mask, cache_keys, cache_values, use_cache, scale):
    """``ttt_attention`` written out: one softmax over the concatenated cache, the mask built from the
    rules (step-0 keys: causal and not padding; a later step's key: the query's own position)."""
    assert use_cache, "the TTT reference always extends the cache"
    cache_keys, cache_values = [*(cache_keys or []), key], [*(cache_values or []), value]
    group = query.shape[1] // key.shape[1]
    keys = torch.cat(cache_keys, 2).repeat_interleave(group, 1)
    values = torch.cat(cache_values, 2).repeat_interleave(group, 1)
    seq_len = query.shape[2]
    key_step, key_pos = torch.arange(keys.shape[2]) // seq_len, torch.arange(keys.shape[2]) % seq_len
    query_pos = torch.arange(seq_len)[:, None]
    step0 = (key_step == 0) & (key_pos <= query_pos) & mask.padding[:, None, None, key_pos]
    visible = step0 | ((key_step > 0) & (key_pos == query_pos))  # [B, 1, T, steps * T]
    scores = (query @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ values, cache_keys, cache_values


@contextlib.contextmanager
def plain_formulas(draft):
    """Run ``draft`` with its norms, MLP and TTT attention replaced by the plain formulas above, under
    autograd: a reference independent of the hand-written backward passes (projections, RoPE and
    embeddings stay the draft's own; their tests are elsewhere)."""
    import torchspec.draft_models.deepseek as deepseek
    import torchspec.draft_models.llama as llama
    from torchspec.draft_models.layers import GatedMLP, RMSNorm

    patched = []
    for module in draft.modules():
        if isinstance(module, RMSNorm):
            module.forward = lambda x, m=module: explicit_rms_norm(x, m.weight, m.eps)
        elif isinstance(module, GatedMLP):
            module.forward = lambda x, m=module: m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
        else:
            continue
        patched.append(module)
    originals = {llama: llama.ttt_attention, deepseek: deepseek.ttt_attention}
    try:
        for namespace in originals:
            namespace.ttt_attention = explicit_ttt_attention
        yield draft
    finally:
        for namespace, original in originals.items():
            namespace.ttt_attention = original
        for module in patched:
            del module.forward


def reference_ttt(draft, batch, length, token_loss_mask, pruned=False):
    """The TTT objective written out row by row from the alignment rules in eagle3.py's docstring.

    Runs the draft one step at a time through its public pieces, its norms, MLP and attention as
    plain formulas under autograd (``plain_formulas``), and computes every loss with the full logits
    and an explicit softmax, without chunking or sorting.
    """
    with plain_formulas(draft):
        return _reference_ttt_rows(draft, batch, length, token_loss_mask, pruned)


def _reference_ttt_rows(draft, batch, length, token_loss_mask, pruned):
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    B, T = ids.shape
    target_logits = batch["target_hidden"] @ batch["target_head_weight"].T  # [B, T, V]
    draft_ids = draft.draft_to_target_ids()
    hidden = explicit_fc(draft, batch["hidden_states"])
    cache_k = cache_v = None
    loss_sums, counts, corrects = [], [], []
    for k in range(length):
        tokens = torch.zeros_like(ids)
        tokens[:, : T - 1 - k] = ids[:, k + 1 :]
        positions = torch.arange(T).expand(B, T) + k
        hidden, cache_k, cache_v = draft.backbone(
            draft.embed_input_ids(tokens), hidden, attn, positions, cache_k, cache_v
        )
        logits = draft.compute_logits(hidden)
        hidden = explicit_next_hidden(draft, hidden)
        total, count, correct = 0.0, 0, 0
        for b in range(B):
            for t in range(T):
                j = t + 1 + k  # target position
                if j >= T or not attn[b, j] or not attn[b, t] or t + k + 2 >= T or not token_loss_mask[b, t + k + 2]:
                    continue
                full = target_logits[b, j]
                if pruned and not draft.t2d[full.argmax()]:
                    continue
                p = torch.softmax(full[draft_ids], -1)
                total = total - (p * torch.log_softmax(logits[b, t], -1)).sum()
                count += 1
                correct += int(logits[b, t].argmax() == p.argmax())
        loss_sums.append(total)
        counts.append(count)
        corrects.append(correct)
    return loss_sums, counts, corrects


def forward_batch(model, batch, loss_mask=None, **kwargs):
    """``model`` on a :func:`make_batch` batch, the target given as hidden states and head weight."""
    if loss_mask is None:
        loss_mask = step0_loss_mask(batch["token_loss_mask"])
    return model(
        batch["input_ids"],
        batch["hidden_states"],
        loss_mask,
        batch["attention_mask"],
        target_hidden=batch["target_hidden"],
        target_head_weight=batch["target_head_weight"],
        **kwargs,
    )
