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

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over the concatenated cache with
  a boolean mask (one fused kernel per step; no loop over the suffix).
* ``flex_attention``: the same mask as a block-sparse ``BlockMask``, so the masked-out blocks of the
  diagonal part are skipped.
"""

from __future__ import annotations

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


_compiled_flex = None


def _flex_attention():
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention  # eager reference path: CPU tests check forward numerics with it
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


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
        keys, values = torch.cat(cache_keys, dim=2), torch.cat(cache_values, dim=2)
        num_steps = len(cache_keys)
    else:
        cache_keys = cache_values = None
        keys, values, num_steps = key, value, 1
    gqa = query.shape[1] != keys.shape[1]
    attn_mask = mask.for_cache(num_steps, query.shape[2], keys.shape[2], query.device)
    if mask.backend == "flex_attention":
        out = _flex_attention()(query, keys, values, block_mask=attn_mask, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    return out, cache_keys, cache_values
