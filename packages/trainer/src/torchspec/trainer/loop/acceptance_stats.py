"""Acceptance length of real speculative decoding, and how sure a measurement of it is.

The input is what a judge (the in-process evaluator, or vLLM's per-request counters) records: for
each prompt, the number of accepted draft tokens in each verification round. From it:

* :func:`acceptance_length`: accepted draft tokens + 1 bonus token per round, summed over every
  round of every prompt and divided by the number of rounds (a ratio of sums: vLLM's and SGLang's
  convention, which weighs a prompt by its rounds, not the mean of per-prompt means);
* :func:`position_acceptance`: the share of rounds in which draft position ``i`` was accepted;
* :func:`bootstrap_interval`: a percentile bootstrap interval over prompts. Prompts are resampled
  with replacement (the unit of sampling is the prompt: rounds of one prompt are not independent),
  the same ratio of sums is recomputed for each resample, and the interval is the
  ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those replicates. The seed is
  fixed, so a report is reproducible.

:func:`ratio_interval` and :func:`bootstrap_replicates` are the same computation for any per-prompt
numerator and denominator (e.g. accepted tokens over drafted tokens). Prompts without a round (a
generation that ended before the first verification) add nothing to either sum and are left out of
the resampling. :func:`summarize` bundles everything in one record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "AcceptanceSummary",
    "Interval",
    "acceptance_length",
    "bootstrap_interval",
    "bootstrap_replicates",
    "position_acceptance",
    "ratio_interval",
    "summarize",
]

DEFAULT_RESAMPLES = 10_000
# Resample indices drawn per block: bounds memory for large prompt sets (a block is ~32 MB of int64).
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval: ``low`` and ``high`` at ``confidence``, from ``resamples``
    resamples of ``num_prompts`` prompts drawn with ``seed``."""

    low: float
    high: float
    confidence: float
    resamples: int
    seed: int
    num_prompts: int


def acceptance_length(per_prompt_accepted: Sequence[Sequence[int]]) -> float:
    """Accepted draft tokens + 1 per round, over all rounds of all prompts; NaN without a round."""
    rounds = sum(len(p) for p in per_prompt_accepted)
    if rounds == 0:
        return math.nan
    return (sum(sum(p) for p in per_prompt_accepted) + rounds) / rounds


def position_acceptance(per_prompt_accepted: Sequence[Sequence[int]], num_draft_tokens: int) -> list[float]:
    """Share of all rounds in which draft position ``i`` (1..num_draft_tokens) was accepted."""
    rounds = [a for p in per_prompt_accepted for a in p]
    if not rounds:
        return [math.nan] * num_draft_tokens
    return [sum(a >= i for a in rounds) / len(rounds) for i in range(1, num_draft_tokens + 1)]


def _check(numerators: Sequence[float], denominators: Sequence[float], confidence: float, resamples: int) -> None:
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators and {len(denominators)} denominators: one of each per prompt")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def bootstrap_replicates(
    numerators: Sequence[float],
    denominators: Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> torch.Tensor:
    """``sum(numerators) / sum(denominators)`` over ``resamples`` resamples of the prompts with
    replacement (float64, one value per resample). Prompts whose denominator is 0 are left out."""
    _check(numerators, denominators, 0.5, resamples)
    kept = [(n, d) for n, d in zip(numerators, denominators) if d != 0]
    if not kept:
        return torch.full((resamples,), math.nan, dtype=torch.float64)
    num = torch.tensor([n for n, _ in kept], dtype=torch.float64)
    den = torch.tensor([d for _, d in kept], dtype=torch.float64)
    count = len(kept)
    generator = torch.Generator().manual_seed(seed)
    block = max(1, _BLOCK_ELEMENTS // count)
    values = []
    for start in range(0, resamples, block):
        picks = torch.randint(0, count, (min(block, resamples - start), count), generator=generator)
        values.append(num[picks].sum(dim=1) / den[picks].sum(dim=1))
    return torch.cat(values)


def ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``sum(numerators) / sum(denominators)`` over prompts (one
    numerator and denominator per prompt); NaN bounds when every denominator is 0."""
    _check(numerators, denominators, confidence, resamples)
    replicates = bootstrap_replicates(numerators, denominators, resamples, seed)
    kept = sum(d != 0 for d in denominators)
    if kept == 0:
        return Interval(math.nan, math.nan, confidence, resamples, seed, 0)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(low, high, confidence, resamples, seed, kept)


def bootstrap_interval(
    per_prompt_accepted: Sequence[Sequence[int]],
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of :func:`acceptance_length` over prompts; ``per_prompt_accepted``
    holds, per prompt, the accepted draft tokens of each of its rounds."""
    return ratio_interval(
        [sum(p) + len(p) for p in per_prompt_accepted],
        [len(p) for p in per_prompt_accepted],
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )


@dataclass(frozen=True)
class AcceptanceSummary:
    acceptance_length: float
    interval: Interval
    position_acceptance: list[float]
    num_prompts: int
    num_rounds: int
    num_accepted_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    per_prompt_accepted: Sequence[Sequence[int]],
    num_draft_tokens: int,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> AcceptanceSummary:
    """Acceptance length, its interval, per-position acceptance and the counts they come from."""
    return AcceptanceSummary(
        acceptance_length=acceptance_length(per_prompt_accepted),
        interval=bootstrap_interval(per_prompt_accepted, confidence, resamples, seed),
        position_acceptance=position_acceptance(per_prompt_accepted, num_draft_tokens),
        num_prompts=len(per_prompt_accepted),
        num_rounds=sum(len(p) for p in per_prompt_accepted),
        num_accepted_tokens=sum(sum(p) for p in per_prompt_accepted),
    )
