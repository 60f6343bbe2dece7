"""Real speculative decoding with an EAGLE-3 draft and a Hugging Face target, in plain PyTorch.

Each round drafts a chain of ``num_draft_tokens`` tokens the way SGLang and vLLM do:

1. the first draft step reads the target's aux hidden states and the last accepted token;
2. later steps read the draft's own hidden state and its previous token, one position further;
3. one target forward pass verifies the chain; the longest prefix matching the target's greedy
   choice is accepted, plus the target's own next token (the "bonus" token).

The output is therefore exactly the target's greedy output. With ``temperature > 0`` the draft
samples its chain and verification uses the standard rejection rule (accept drafted token ``x``
with probability ``min(1, p(x) / q(x))``, else sample from ``max(0, p - q)`` renormalised), so the
output is distributed exactly as sampling from the target alone. ``top_p < 1`` samples from the
nucleus (the smallest set of likeliest tokens holding ``top_p`` of the probability, renormalised) of
the target, and of the draft when it samples. ``draft_sampling="greedy"`` drafts the argmax token
and verifies it as a one-hot proposal (accepted with probability ``p(x)``), vLLM's default
(``speculative_config.draft_sample_method``); ``"probabilistic"`` samples the chain from the
draft's distribution. Acceptance length is reported as
accepted draft tokens + 1 (the bonus token) per round, the convention of the serving engines.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from torchspec.draft_models.aux_layers import (
    aux_layer_ids_from_config,
    select_aux_hidden_states,
    validate_aux_layer_ids,
)
from torchspec.draft_models.draft_model import Eagle3DraftModel
from torchspec.draft_models.errors import UserInputError
from torchspec.draft_models.ttt_attention import DecodeMask

__all__ = [
    "DRAFT_SAMPLING",
    "SpeculativeGenerator",
    "SpeculativeResult",
    "rejection_sample",
    "target_greedy_generate",
    "top_p_filter",
]

# How the draft picks its chain when temperature > 0 (vLLM: speculative_config.draft_sample_method).
DRAFT_SAMPLING = ("probabilistic", "greedy")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (distributions over the last dimension) restricted to the nucleus: the likeliest
    tokens whose probability, summed in descending order, first reaches ``top_p`` (always at least
    the likeliest one), renormalised."""
    if top_p >= 1:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered  # probability of the strictly likelier tokens
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def rejection_sample(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, drafted: int, generator=None
) -> tuple[bool, int]:
    """Speculative sampling for one drafted token over the target vocabulary.

    Returns ``(accepted, token)``: the drafted token if accepted, else a token from the residual
    ``max(0, p - q)``; either way the token is distributed as ``target_probs``.
    """
    p, q = target_probs[drafted], draft_probs[drafted]
    if q <= 0 or torch.rand((), generator=generator, device=target_probs.device) * q <= p:
        return True, drafted
    residual = (target_probs - draft_probs).clamp(min=0)
    total = residual.sum()
    if total <= 0:  # p == q numerically: any rejection is a rounding artefact
        residual, total = target_probs, target_probs.sum()
    return False, int(torch.multinomial(residual / total, 1, generator=generator))


@dataclass
class SpeculativeResult:
    tokens: list[int]  # generated tokens (prompt excluded)
    accepted_per_round: list[int] = field(default_factory=list)  # accepted draft tokens, bonus excluded
    num_draft_tokens: int = 0
    wall_time_s: float = 0.0

    @property
    def rounds(self) -> int:
        return len(self.accepted_per_round)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens produced per target forward: accepted draft tokens + 1 bonus token."""
        return sum(a + 1 for a in self.accepted_per_round) / max(self.rounds, 1)

    def position_acceptance(self) -> list[float]:
        """Share of rounds in which draft position ``i`` (1-based) was accepted."""
        return [
            sum(a >= i for a in self.accepted_per_round) / max(self.rounds, 1)
            for i in range(1, self.num_draft_tokens + 1)
        ]


def _target_step(target, input_ids, cache, start: int):
    positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
    # transformers renamed `past_key_values` to `cache` (5.x); accept either generation.
    cache_kwarg = "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"
    out = target(
        input_ids=input_ids, position_ids=positions, use_cache=True, output_hidden_states=True, **{cache_kwarg: cache}
    )
    return out.logits[0].float(), out.hidden_states, cache


def _crop(cache, length: int) -> None:
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)  # a negative crop removes that many trailing tokens


@torch.no_grad()
def target_greedy_generate(
    target, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
) -> tuple[list[int], float]:
    """Plain greedy decoding with a KV cache (the baseline and the reference output)."""
    from transformers import DynamicCache

    start = time.perf_counter()
    device = next(target.parameters()).device
    cache = DynamicCache()
    ids = torch.tensor([prompt_ids], device=device)
    logits, _, cache = _target_step(target, ids, cache, 0)
    tokens: list[int] = []
    length = len(prompt_ids)
    while len(tokens) < max_new_tokens:
        token = int(logits[-1].argmax())
        tokens.append(token)
        if token == eos_token_id:
            break
        logits, _, cache = _target_step(target, torch.tensor([[token]], device=device), cache, length)
        length += 1
    return tokens, time.perf_counter() - start


class SpeculativeGenerator:
    def __init__(
        self,
        draft: Eagle3DraftModel,
        target,
        num_draft_tokens: int = 4,
        aux_layer_ids: list[int] | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        top_p: float = 1.0,
        draft_sampling: str = "probabilistic",
    ):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if draft_sampling not in DRAFT_SAMPLING:
            raise ValueError(f"draft_sampling must be one of {', '.join(DRAFT_SAMPLING)}, got {draft_sampling!r}")
        self.top_p, self.draft_sampling = top_p, draft_sampling
        num_layers = target.config.num_hidden_layers
        self.draft, self.target = draft.eval(), target.eval()
        self.num_draft_tokens = num_draft_tokens
        self.temperature = temperature
        self.aux_layer_ids = (
            validate_aux_layer_ids(aux_layer_ids, num_layers)
            if aux_layer_ids is not None
            else aux_layer_ids_from_config(draft.config.extra, num_layers)
        )
        self.vocab_size = target.config.vocab_size
        self.draft_to_target = draft.draft_to_target_ids()
        if draft.embed_tokens.weight.shape[0] != self.vocab_size:
            raise UserInputError(
                f"draft vocab_size {draft.embed_tokens.weight.shape[0]} != target vocab_size {self.vocab_size}"
            )
        device = next(target.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _target_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return top_p_filter(torch.softmax(logits / self.temperature, dim=-1), self.top_p)

    def _pick(self, target_logits: torch.Tensor) -> int:
        """The target's own next token: greedy, or sampled at the temperature."""
        if self.temperature == 0:
            return int(target_logits.argmax())
        return int(torch.multinomial(self._target_probs(target_logits), 1, generator=self.generator))

    def _draft_forward(self, embeds, hidden, positions, cache):
        hidden, keys, values = self.draft.backbone(
            embeds, hidden, DecodeMask(), positions, cache[0], cache[1], use_cache=True
        )
        hidden = hidden[:, -1:]
        normed = self.draft.norm(hidden)
        logits = self.draft.lm_head(normed).float()[0, -1]
        if self.temperature == 0:
            draft_id, probs = logits.argmax(), None
        elif self.draft_sampling == "greedy":  # a one-hot proposal: accepted with probability p(x)
            draft_id = logits.argmax()
            probs = torch.zeros(self.vocab_size, device=logits.device)
            probs[self.draft_to_target[draft_id]] = 1.0
        else:
            draft_probs = top_p_filter(torch.softmax(logits / self.temperature, dim=-1), self.top_p)
            draft_id = torch.multinomial(draft_probs, 1, generator=self.generator)[0]
            probs = torch.zeros(self.vocab_size, device=logits.device).index_copy(0, self.draft_to_target, draft_probs)
        token = self.draft_to_target[draft_id].view(1, 1)
        return self.draft.next_step_hidden(hidden, normed), token, probs, (keys, values)

    def _draft_chain(self, aux, new_tokens, start: int, prefix_cache):
        """Extend the draft's verified prefix with rows ``start ..`` (target aux states + next tokens),
        then draft a chain. Returns the chain ``[1, K]``, the draft distributions of its tokens
        (None when greedy) and the prefix cache (chain entries dropped)."""
        device = new_tokens.device
        positions = torch.arange(start, start + new_tokens.shape[1], device=device)[None]
        hidden = self.draft.project_hidden_states(aux.to(self.draft.fc.weight.dtype))
        hidden, token, probs, cache = self._draft_forward(
            self.draft.embed_input_ids(new_tokens), hidden, positions, prefix_cache
        )
        prefix_cache = (list(cache[0]), list(cache[1]))
        chain, chain_probs, position = [token], [probs], start + new_tokens.shape[1] - 1
        for _ in range(self.num_draft_tokens - 1):
            position += 1
            hidden, token, probs, cache = self._draft_forward(
                self.draft.embed_input_ids(token), hidden, torch.tensor([[position]], device=device), cache
            )
            chain.append(token)
            chain_probs.append(probs)
        return torch.cat(chain, dim=1), (None if self.temperature == 0 else chain_probs), prefix_cache

    def _verify(self, chain: torch.Tensor, chain_probs, target_logits: torch.Tensor) -> tuple[int, int]:
        """``target_logits[i]`` follows the i-th verified token. Returns (accepted drafts, next token)."""
        for i in range(chain.shape[1]):
            drafted = int(chain[0, i])
            if chain_probs is None:
                if drafted != int(target_logits[i].argmax()):
                    return i, int(target_logits[i].argmax())
                continue
            accepted, token = rejection_sample(
                self._target_probs(target_logits[i]), chain_probs[i], drafted, self.generator
            )
            if not accepted:
                return i, token
        return chain.shape[1], self._pick(target_logits[chain.shape[1]])

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
    ) -> SpeculativeResult:
        from transformers import DynamicCache

        if len(prompt_ids) < 1:
            raise ValueError("prompt_ids is empty")
        start_time = time.perf_counter()
        device = next(self.target.parameters()).device
        result = SpeculativeResult(tokens=[], num_draft_tokens=self.num_draft_tokens)
        cache = DynamicCache()
        prompt = torch.tensor([prompt_ids], device=device)
        logits, hidden_states, cache = _target_step(self.target, prompt, cache, 0)
        next_token = torch.tensor([[self._pick(logits[-1])]], device=device)
        result.tokens.append(int(next_token))
        # Draft rows 0..n-1: target aux state at t with token t+1 (the prompt shifted, then next_token).
        aux = select_aux_hidden_states(hidden_states, self.aux_layer_ids)
        row_tokens = torch.cat([prompt[:, 1:], next_token], dim=1)
        verified = len(prompt_ids)  # tokens in the target cache
        draft_cache: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        while len(result.tokens) < max_new_tokens and result.tokens[-1] != eos_token_id:
            chain, chain_probs, draft_cache = self._draft_chain(
                aux, row_tokens, verified - row_tokens.shape[1], draft_cache
            )
            candidates = torch.cat([next_token, chain], dim=1)  # last accepted token + drafts
            logits, hidden_states, cache = _target_step(self.target, candidates, cache, verified)
            accepted, bonus = self._verify(chain, chain_probs, logits)
            result.accepted_per_round.append(accepted)
            for token in chain[0, :accepted].tolist() + [bonus]:
                result.tokens.append(token)
                if token == eos_token_id or len(result.tokens) >= max_new_tokens:
                    break
            # Keep the target cache up to the accepted tokens; the bonus token is fed next round.
            verified += accepted + 1
            _crop(cache, verified)
            aux = select_aux_hidden_states(hidden_states, self.aux_layer_ids)[:, : accepted + 1]
            next_token = torch.tensor([[bonus]], device=device)
            row_tokens = torch.cat([chain[:, :accepted], next_token], dim=1)
        result.tokens = result.tokens[:max_new_tokens]
        result.wall_time_s = time.perf_counter() - start_time
        return result
