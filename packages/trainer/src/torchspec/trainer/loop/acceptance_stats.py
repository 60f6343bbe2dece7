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
numerator and denominator (e.g. accepted tokens over drafted tokens). :func:`paired_difference_interval`
compares two drafts measured on the same prompts: the prompts are resampled once for both, so the
interval of the difference excludes what the prompts share (a hard prompt is hard for both drafts)
and is narrower than two separate intervals suggest. Prompts without a round (a
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
    "paired_difference_interval",
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
    sums = _resampled_sums(torch.tensor(kept, dtype=torch.float64), resamples, seed)
    return sums[:, 0] / sums[:, 1]


def _resampled_sums(columns: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """Column sums of ``columns`` ``[prompts, c]`` over ``resamples`` draws of its rows with
    replacement: ``[resamples, c]``. Every column of a draw sums the same rows."""
    count = columns.shape[0]
    generator = torch.Generator().manual_seed(seed)
    block = max(1, _BLOCK_ELEMENTS // count)
    sums = []
    for start in range(0, resamples, block):
        picks = torch.randint(0, count, (min(block, resamples - start), count), generator=generator)
        sums.append(columns[picks].sum(dim=1))
    return torch.cat(sums)


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


def paired_difference_interval(
    first: Sequence[Sequence[int]],
    second: Sequence[Sequence[int]],
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``acceptance_length(second) - acceptance_length(first)``,
    where ``first[i]`` and ``second[i]`` are two drafts' rounds on the same prompt ``i``: each
    resample draws prompts with replacement and recomputes both ratios of sums on the same draw."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} and {len(second)} prompts: the two drafts must be measured on the same prompts")
    _check([0.0] * len(first), [0.0] * len(second), confidence, resamples)
    if sum(len(p) for p in first) == 0 or sum(len(p) for p in second) == 0:
        return Interval(math.nan, math.nan, confidence, resamples, seed, 0)
    columns = torch.tensor(
        [[sum(a) + len(a), len(a), sum(b) + len(b), len(b)] for a, b in zip(first, second)], dtype=torch.float64
    )
    sums = _resampled_sums(columns, resamples, seed)
    replicates = sums[:, 2] / sums[:, 3] - sums[:, 0] / sums[:, 1]
    replicates = replicates[~replicates.isnan()]  # a draw where one draft had no round at all
    tail = (1 - confidence) / 2
    low, high = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(low, high, confidence, resamples, seed, len(first))


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
