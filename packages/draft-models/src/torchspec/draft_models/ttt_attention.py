"""The attention pattern of test-time training (TTT), shared by every draft architecture.

During TTT the draft is unrolled ``length`` times over the whole sequence. Step 0 is ordinary
causal attention over the step-0 keys. At step ``k`` the query of position ``t`` sees

* the step-0 keys of positions ``<= t`` (the context the target verified), and
* its own position's keys from steps ``1 .. k`` (the chain the draft itself produced),

which is exactly what a serving engine's draft sees when it extends one chain ``k`` tokens deep.
Keys and values of every step are kept in a cache (a list, one entry per step), and the mask over
the concatenated cache ``[step 0 | step 1 | ... | step k]`` is

    step-0 block: causal and key-padding      later blocks: the diagonal only

Two backends compute it:

* ``sdpa``: on CPU, step ``k`` is split into what it is: ordinary causal attention over the step-0
  keys (the fused flash kernel, which also returns its log-sum-exp) plus ``k`` diagonal keys, one
  dot product per query each, merged exactly through the log-sum-exp (:class:`_CausalPlusDiagonal`).
  Nothing of size ``T x T*(k+1)`` is built, no cache is concatenated, and backward saves only this
  step's tensors. Elsewhere, ``scaled_dot_product_attention`` over the concatenated cache with a
  boolean mask.
* ``flex_attention``: the same split, with flex over the step-0 keys (a causal, key-padding
  ``BlockMask`` of key length ``T`` at every step, so one compiled graph serves a run) and its
  differentiable log-sum-exp merged with the diagonal keys by plain autograd.

Without a cache (one step), both backends are plain causal attention with key padding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "DecodeMask", "TTTMask", "ttt_attention"]

ATTENTION_BACKENDS = ("sdpa", "flex_attention")


class TTTMask:
    """Key-padding information plus the masks each cache length needs, built once per batch."""

    def __init__(self, padding_mask: torch.Tensor, backend: str = "sdpa"):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.padding = padding_mask.bool()
        self.backend = backend
        self._masks: dict[int, object] = {}
        self._step0_bias: torch.Tensor | None = None
        self._step0_block_mask = None

    def step0_block_mask(self):
        if self._step0_block_mask is None:
            self._step0_block_mask = _step0_block_mask(self.padding)
        return self._step0_block_mask

    def step0_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive key-padding bias ``[B, 1, 1, T]`` for the causal step-0 attention (None: no padding)."""
        if bool(self.padding.all()):
            return None
        if self._step0_bias is None or self._step0_bias.dtype != dtype:
            bias = torch.zeros(self.padding.shape, dtype=dtype, device=self.padding.device)
            self._step0_bias = bias.masked_fill(~self.padding, float("-inf"))[:, None, None, :]
        return self._step0_bias

    @property
    def seq_len(self) -> int:
        return self.padding.shape[1]

    def for_cache(self, num_steps: int, query_len: int, key_len: int, device: torch.device):
        """The mask for queries of one step against ``num_steps`` cached steps."""
        if num_steps not in self._masks:
            build = _dense_mask if self.backend == "sdpa" else _block_mask
            self._masks[num_steps] = build(self.padding, num_steps)
        return self._masks[num_steps]


class DecodeMask:
    """Inference-time mask: the cache is one flat sequence (verified prefix, then the drafted chain),
    and each new query sees every cached key up to its own position."""

    backend = "sdpa"

    def for_cache(self, num_steps: int, query_len: int, key_len: int, device: torch.device):
        if query_len == 1:
            return None
        offset = key_len - query_len
        keys, queries = torch.arange(key_len, device=device), torch.arange(query_len, device=device)
        return keys[None, :] <= queries[:, None] + offset


def _dense_mask(padding: torch.Tensor, num_steps: int) -> torch.Tensor:
    seq_len = padding.shape[1]
    positions = torch.arange(seq_len, device=padding.device)
    causal = positions[None, :] <= positions[:, None]
    prefix = causal[None] & padding[:, None, :]  # [B, T, T]
    diagonal = torch.eye(seq_len, dtype=torch.bool, device=padding.device).expand_as(prefix)
    return torch.cat([prefix] + [diagonal] * (num_steps - 1), dim=-1).unsqueeze(1)  # [B, 1, T, T*n]


def _block_mask(padding: torch.Tensor, num_steps: int):
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq_len = padding.shape

    def mask_mod(b, h, q_idx, kv_idx):
        step = kv_idx // seq_len
        key_pos = kv_idx % seq_len
        in_prefix = (step == 0) & (key_pos <= q_idx) & padding[b, key_pos]
        on_diagonal = (step > 0) & (key_pos == q_idx)
        return in_prefix | on_diagonal

    return create_block_mask(
        mask_mod, B=batch, H=None, Q_LEN=seq_len, KV_LEN=seq_len * num_steps, device=padding.device
    )


def _step0_block_mask(padding: torch.Tensor):
    """Causal and key-padding over the step-0 keys only: the same for every TTT step of a batch."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq_len = padding.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & padding[b, kv_idx]

    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=padding.device)


@functools.cache
def _compiled_flex_attention(backend="inductor"):
    from torch.nn.attention.flex_attention import flex_attention

    # Dynamic shapes: sequence lengths differ from batch to batch; the key length no longer grows with
    # the TTT step (the diagonal keys are merged outside), so one graph serves a whole run.
    return torch.compile(flex_attention, dynamic=True, backend=backend)


def _flex_attention_for(device: torch.device):
    """Compiled flex_attention on accelerators; eager on CPU, where it is the forward-only reference
    (flex_attention has no CPU backward)."""
    if device.type == "cpu":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    return _compiled_flex_attention()


def ttt_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: TTTMask,
    cache_keys: list[torch.Tensor] | None,
    cache_values: list[torch.Tensor] | None,
    use_cache: bool,
    scale: float,
) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Attend ``query`` ``[B, H, T, D]`` to the cache extended with this step's ``key``/``value``.

    ``key``/``value`` are ``[B, H_kv, T, D]`` (grouped-query attention when ``H_kv < H``). Returns
    the attention output ``[B, H, T, D_v]`` and the extended caches (``None`` without cache).
    """
    if use_cache:
        cache_keys = [*(cache_keys or []), key]
        cache_values = [*(cache_values or []), value]
        num_steps = len(cache_keys)
    else:
        cache_keys = cache_values = None
        keys, values, num_steps = key, value, 1
    if isinstance(mask, TTTMask) and use_cache:
        assert cache_keys is not None and cache_values is not None
        if mask.backend == "flex_attention":
            return _flex_causal_plus_diagonal(query, cache_keys, cache_values, mask, scale), cache_keys, cache_values
        if query.device.type == "cpu":
            if len(cache_values) == 1 and value.shape[-1] < key.shape[-1]:
                # The flash kernel wants one head size (MLA's values are narrower): the step-0
                # values are kept zero-padded in the cache, once, for every step.
                cache_values = [F.pad(value, (0, key.shape[-1] - value.shape[-1]))]
            out = _causal_plus_diagonal(query, cache_keys, cache_values, mask, scale, value.shape[-1])
            return out, cache_keys, cache_values
    if use_cache:
        assert cache_keys is not None and cache_values is not None
        keys, values = torch.cat(cache_keys, dim=2), torch.cat(cache_values, dim=2)
    gqa = query.shape[1] != keys.shape[1]
    attn_mask = mask.for_cache(num_steps, query.shape[2], keys.shape[2], query.device)
    if mask.backend == "flex_attention":
        flex = _flex_attention_for(query.device)
        out = flex(query, keys, values, block_mask=attn_mask, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    return out, cache_keys, cache_values


def _causal_plus_diagonal(query, cache_keys, cache_values, mask: TTTMask, scale: float, value_dim: int):
    key0, value0, diagonal_keys = cache_keys[0], cache_values[0], cache_keys[1:]
    key_dim = key0.shape[-1]
    if key_dim < value_dim:
        # One head size for the flash kernel: zero columns change no score.
        query, key0 = F.pad(query, (0, value_dim - key_dim)), F.pad(key0, (0, value_dim - key_dim))
        diagonal_keys = [F.pad(key, (0, value_dim - key_dim)) for key in diagonal_keys]
    bias = mask.step0_bias(query.dtype)
    return _CausalPlusDiagonal.apply(query, key0, value0, bias, scale, value_dim, *diagonal_keys, *cache_values[1:])


class _CausalPlusDiagonal(torch.autograd.Function):
    """``softmax`` attention of each query over the causal step-0 keys and its own diagonal keys.

    With ``(O0, lse0)`` the flash kernel's output and log-sum-exp over the step-0 keys and
    ``s_j = scale * q . K_j`` the diagonal scores, the joint softmax has ``L = logsumexp(lse0, s_j)``
    and ``O = exp(lse0 - L) O0 + sum_j exp(s_j - L) V_j``. Backward is the standard softmax-attention
    backward over the joint key set: the flash kernel's backward, given the joint ``O`` and ``L`` in
    place of its own, returns exactly the step-0 keys' share (its probabilities are
    ``exp(S0 - L)`` and its row term ``sum(dO * O)``); the diagonal share is written out below.
    """

    @staticmethod
    def forward(ctx, query, key0, value0, bias, scale, value_dim, *diagonal):
        keys, values = diagonal[: len(diagonal) // 2], diagonal[len(diagonal) // 2 :]
        out0, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key0, value0, 0.0, True, attn_mask=bias, scale=scale
        )
        out = out0[..., :value_dim]
        batch, heads, seq_len, head_dim = query.shape
        grouped = query.view(batch, key0.shape[1], -1, seq_len, head_dim)  # [B, H_kv, G, T, D]
        weights = torch.empty(0)
        if keys:
            scores = torch.stack([(grouped * k[:, :, None]).sum(-1).float() * scale for k in keys])
            total_lse = torch.logsumexp(torch.cat([lse.view(1, *scores.shape[1:]), scores]), dim=0)
            weights = (scores - total_lse).exp()  # [n, B, H_kv, G, T]
            out = out * (lse.view_as(total_lse) - total_lse).exp().view(batch, heads, seq_len, 1).to(out.dtype)
            out = out.view(*grouped.shape[:-1], value_dim)
            for weight, value in zip(weights, values):
                out = out + weight.unsqueeze(-1).to(out.dtype) * value[:, :, None]
            out = out.view(batch, heads, seq_len, value_dim)
            lse = total_lse.view_as(lse)
        # Laid out [B, T, H, D]: the caller's transpose and reshape to [B, T, H * D] is then a view,
        # and the output projection keeps that view for backward, not a second copy.
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        ctx.save_for_backward(query, key0, value0, bias, out, lse, weights, *diagonal)
        ctx.scale, ctx.value_dim = scale, value_dim
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key0, value0, bias, out, lse, weights, *diagonal = ctx.saved_tensors
        keys, values = diagonal[: len(diagonal) // 2], diagonal[len(diagonal) // 2 :]
        scale, value_dim = ctx.scale, ctx.value_dim
        grad_out = grad_out.contiguous()
        pad = value0.shape[-1] - value_dim
        grad_query, grad_key0, grad_value0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            F.pad(grad_out, (0, pad)) if pad else grad_out,
            query,
            key0,
            value0,
            F.pad(out, (0, pad)) if pad else out,
            lse,
            0.0,
            True,
            attn_mask=bias,
            scale=scale,
        )
        grad_keys, grad_values = [], []
        if keys:
            batch, heads, seq_len, head_dim = query.shape
            grouped_shape = (batch, key0.shape[1], -1, seq_len)
            grouped_query = query.view(*grouped_shape, head_dim)
            grouped_grad = grad_out.view(*grouped_shape, value_dim)
            row_term = (grad_out * out).sum(-1).view(grouped_shape)
            grad_query = grad_query.reshape(grouped_query.shape).clone()
            for weight, key, value in zip(weights, keys, values):
                weight = weight.to(query.dtype)
                grad_score = weight * ((grouped_grad * value[:, :, None]).sum(-1) - row_term)
                grad_query += scale * grad_score.unsqueeze(-1) * key[:, :, None]
                grad_keys.append(scale * (grad_score.unsqueeze(-1) * grouped_query).sum(2))
                grad_values.append((weight.unsqueeze(-1) * grouped_grad).sum(2))
            grad_query = grad_query.reshape(batch, heads, seq_len, head_dim)
        return grad_query, grad_key0, grad_value0, None, None, None, *grad_keys, *grad_values


def _flex_causal_plus_diagonal(query, cache_keys, cache_values, mask: TTTMask, scale: float) -> torch.Tensor:
    """The same split for flex_attention, whose log-sum-exp is differentiable: the merge is plain
    autograd. The key length is the sequence length at every step, so the compiled kernel is reused."""
    key0, value0 = cache_keys[0], cache_values[0]
    flex = _flex_attention_for(query.device)
    gqa = query.shape[1] != key0.shape[1]
    from torch.nn.attention.flex_attention import AuxRequest

    out0, aux = flex(
        query,
        key0,
        value0,
        block_mask=mask.step0_block_mask(),
        scale=scale,
        enable_gqa=gqa,
        return_aux=AuxRequest(lse=True),
    )
    lse0 = aux.lse
    if len(cache_keys) == 1:
        return out0
    batch, heads, seq_len, head_dim = query.shape
    grouped = query.reshape(batch, key0.shape[1], -1, seq_len, head_dim)
    scores = torch.stack([(grouped * key[:, :, None]).sum(-1).float() * scale for key in cache_keys[1:]])
    all_scores = torch.cat([lse0.float().reshape(1, *scores.shape[1:]), scores])
    weights = torch.softmax(all_scores, dim=0)  # [1 + n, B, H_kv, G, T]
    out = weights[0].reshape(batch, heads, seq_len, 1).to(out0.dtype) * out0
    out = out.reshape(*grouped.shape[:-1], out0.shape[-1])
    for weight, value in zip(weights[1:], cache_values[1:]):
        out = out + weight.unsqueeze(-1).to(out.dtype) * value[:, :, None]
    return out.reshape(batch, heads, seq_len, -1)
