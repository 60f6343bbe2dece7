"""Real speculative decoding with an EAGLE-3 draft and a Hugging Face target, in plain PyTorch.

Each round drafts a chain of ``num_draft_tokens`` tokens the way SGLang and vLLM do:

1. the first draft step reads the target's aux hidden states and the last accepted token;
2. later steps read the draft's own hidden state and its previous token, one position further;
3. one target forward pass verifies the chain; the longest prefix matching the target's greedy
   choice is accepted, plus the target's own next token (the "bonus" token).

The output is therefore exactly the target's greedy output. Acceptance length is reported as
accepted draft tokens + 1 (the bonus token) per round, the convention of the serving engines.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from torchspec.draft_models.aux_layers import aux_layer_ids_from_config, select_aux_hidden_states, validate_aux_layer_ids
from torchspec.draft_models.draft_model import Eagle3DraftModel
from torchspec.draft_models.ttt_attention import DecodeMask

__all__ = ["SpeculativeGenerator", "SpeculativeResult", "target_greedy_generate"]


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
        return [sum(a >= i for a in self.accepted_per_round) / max(self.rounds, 1) for i in range(1, self.num_draft_tokens + 1)]


def _target_step(target, input_ids, cache, start: int):
    positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
    # transformers renamed `past_key_values` to `cache` (5.x); accept either generation.
    cache_kwarg = "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"
    out = target(input_ids=input_ids, position_ids=positions, use_cache=True, output_hidden_states=True, **{cache_kwarg: cache})
    return out.logits[0].float(), out.hidden_states, cache


def _crop(cache, length: int) -> None:
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)  # a negative crop removes that many trailing tokens


@torch.no_grad()
def target_greedy_generate(target, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> tuple[list[int], float]:
    """Plain greedy decoding with a KV cache (the baseline and the reference output)."""
    from transformers import DynamicCache

    start = time.perf_counter()
    device = next(target.parameters()).device
    cache = DynamicCache()
    ids = torch.tensor([prompt_ids], device=device)
    logits, _, cache = _target_step(target, ids, cache, 0)
    tokens, length = [], len(prompt_ids)
    while len(tokens) < max_new_tokens:
        token = int(logits[-1].argmax())
        tokens.append(token)
        if token == eos_token_id:
            break
        logits, _, cache = _target_step(target, torch.tensor([[token]], device=device), cache, length)
        length += 1
    return tokens, time.perf_counter() - start


class SpeculativeGenerator:
    def __init__(self, draft: Eagle3DraftModel, target, num_draft_tokens: int = 4, aux_layer_ids: list[int] | None = None):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        num_layers = target.config.num_hidden_layers
        self.draft, self.target = draft.eval(), target.eval()
        self.num_draft_tokens = num_draft_tokens
        self.aux_layer_ids = (
            validate_aux_layer_ids(aux_layer_ids, num_layers) if aux_layer_ids is not None
            else aux_layer_ids_from_config(draft.config.extra, num_layers)
        )
        self.draft_to_target = draft.draft_to_target_ids()
        if draft.embed_tokens.weight.shape[0] != target.config.vocab_size:
            raise ValueError(
                f"draft vocab_size {draft.embed_tokens.weight.shape[0]} != target vocab_size {target.config.vocab_size}"
            )

    def _draft_forward(self, embeds, hidden, positions, cache):
        hidden, keys, values = self.draft.backbone(embeds, hidden, DecodeMask(), positions, cache[0], cache[1], use_cache=True)
        token = self.draft_to_target[self.draft.compute_logits(hidden[:, -1:]).argmax(-1)]
        return hidden[:, -1:], token, (keys, values)

    def _draft_chain(self, aux, new_tokens, start: int, prefix_cache):
        """Extend the draft's verified prefix with rows ``start ..`` (target aux states + next tokens),
        then draft a chain. Returns the chain and the prefix cache (chain entries dropped)."""
        device = new_tokens.device
        positions = torch.arange(start, start + new_tokens.shape[1], device=device)[None]
        hidden = self.draft.project_hidden_states(aux.to(self.draft.fc.weight.dtype))
        hidden, token, cache = self._draft_forward(self.draft.embed_input_ids(new_tokens), hidden, positions, prefix_cache)
        prefix_cache = (list(cache[0]), list(cache[1]))
        chain, position = [token], start + new_tokens.shape[1] - 1
        for _ in range(self.num_draft_tokens - 1):
            position += 1
            hidden, token, cache = self._draft_forward(
                self.draft.embed_input_ids(token), hidden, torch.tensor([[position]], device=device), cache
            )
            chain.append(token)
        return torch.cat(chain, dim=1), prefix_cache

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> SpeculativeResult:
        from transformers import DynamicCache

        if len(prompt_ids) < 1:
            raise ValueError("prompt_ids is empty")
        start_time = time.perf_counter()
        device = next(self.target.parameters()).device
        result = SpeculativeResult(tokens=[], num_draft_tokens=self.num_draft_tokens)
        cache = DynamicCache()
        prompt = torch.tensor([prompt_ids], device=device)
        logits, hidden_states, cache = _target_step(self.target, prompt, cache, 0)
        next_token = logits[-1].argmax().view(1, 1)
        result.tokens.append(int(next_token))
        # Draft rows 0..n-1: target aux state at t with token t+1 (the prompt shifted, then next_token).
        aux = select_aux_hidden_states(hidden_states, self.aux_layer_ids)
        row_tokens = torch.cat([prompt[:, 1:], next_token], dim=1)
        verified = len(prompt_ids)  # tokens in the target cache
        draft_cache = ([], [])
        while len(result.tokens) < max_new_tokens and result.tokens[-1] != eos_token_id:
            chain, draft_cache = self._draft_chain(aux, row_tokens, verified - row_tokens.shape[1], draft_cache)
            candidates = torch.cat([next_token, chain], dim=1)  # last accepted token + drafts
            logits, hidden_states, cache = _target_step(self.target, candidates, cache, verified)
            greedy = logits.argmax(-1)  # greedy[i] follows candidates[i]
            accepted = 0
            while accepted < chain.shape[1] and int(chain[0, accepted]) == int(greedy[accepted]):
                accepted += 1
            result.accepted_per_round.append(accepted)
            new = chain[0, :accepted].tolist() + [int(greedy[accepted])]
            for token in new:
                result.tokens.append(token)
                if token == eos_token_id or len(result.tokens) >= max_new_tokens:
                    break
            # Keep the target cache up to the accepted tokens; the bonus token is fed next round.
            verified += accepted + 1
            _crop(cache, verified)
            aux = select_aux_hidden_states(hidden_states, self.aux_layer_ids)[:, : accepted + 1]
            next_token = greedy[accepted].view(1, 1)
            row_tokens = torch.cat([chain[:, :accepted], next_token], dim=1)
        result.tokens = result.tokens[:max_new_tokens]
        result.wall_time_s = time.perf_counter() - start_time
        return result
