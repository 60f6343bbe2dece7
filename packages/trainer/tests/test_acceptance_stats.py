"""Acceptance length and its bootstrap interval over prompts (torchspec.trainer.loop.acceptance_stats),
checked against independent formulations: the exact bootstrap distribution (every one of the n^n
resamples of n prompts enumerated) and the closed-form bootstrap standard error of a mean."""

import math
from itertools import product

import pytest

from torchspec.trainer.loop.acceptance_stats import (
    acceptance_length,
    bootstrap_interval,
    bootstrap_replicates,
    position_acceptance,
    ratio_interval,
    summarize,
)

# accepted draft tokens per verification round, per prompt (K = 3)
PROMPTS = [[3, 0, 1], [2, 2], [0, 0, 0, 1], [3, 3, 3, 2, 1]]


def test_acceptance_length_is_the_ratio_of_sums_over_all_rounds():
    rounds = sum(len(p) for p in PROMPTS)
    tokens = sum(a + 1 for p in PROMPTS for a in p)
    assert acceptance_length(PROMPTS) == pytest.approx(tokens / rounds)
    # not the mean of the per-prompt means (vLLM's convention weighs prompts by their rounds)
    per_prompt_mean = sum(sum(a + 1 for a in p) / len(p) for p in PROMPTS) / len(PROMPTS)
    assert acceptance_length(PROMPTS) != pytest.approx(per_prompt_mean)


def test_position_acceptance_is_the_share_of_rounds_accepting_each_position():
    rounds = [a for p in PROMPTS for a in p]
    expected = [sum(a >= i for a in rounds) / len(rounds) for i in (1, 2, 3)]
    assert position_acceptance(PROMPTS, 3) == pytest.approx(expected)
    # 1 + the sum of the per-position shares is the acceptance length
    assert 1 + sum(position_acceptance(PROMPTS, 3)) == pytest.approx(acceptance_length(PROMPTS))


def _exact_distribution(numerators, denominators):
    """Every resample of n prompts with replacement (n^n equally likely index tuples)."""
    n = len(numerators)
    values = []
    for picks in product(range(n), repeat=n):
        values.append(sum(numerators[i] for i in picks) / sum(denominators[i] for i in picks))
    return sorted(values)


@pytest.mark.parametrize("prompts", [PROMPTS[:3], PROMPTS], ids=["n=3", "n=4"])
def test_the_percentile_interval_matches_the_exact_bootstrap_distribution(prompts):
    numerators = [sum(a + 1 for a in p) for p in prompts]
    denominators = [len(p) for p in prompts]
    exact = _exact_distribution(numerators, denominators)
    interval = bootstrap_interval(prompts, confidence=0.9, resamples=40_000, seed=1)
    _assert_the_5_and_95_percent_quantiles(interval, exact)
    assert interval.low <= acceptance_length(prompts) <= interval.high


def _assert_the_5_and_95_percent_quantiles(interval, exact, eps=0.01):
    """``interval`` is the 5% / 95% quantiles of the sorted ``exact`` distribution:
    P(X < low) <= 5% <= P(X <= low), likewise for high (eps: Monte Carlo error of 40k resamples
    is ~0.0015 on a CDF value)."""

    def below(value):
        return sum(v < value - 1e-12 for v in exact) / len(exact)

    def at_most(value):
        return sum(v <= value + 1e-12 for v in exact) / len(exact)

    assert below(interval.low) <= 0.05 + eps and at_most(interval.low) >= 0.05 - eps
    assert below(interval.high) <= 0.95 + eps and at_most(interval.high) >= 0.95 - eps


def test_the_bootstrap_standard_error_of_a_mean_is_the_closed_form_one():
    # One round per prompt: the statistic is the mean of x = accepted + 1, whose bootstrap variance is
    # sum((x - mean)^2) / n^2 exactly.
    x = [1, 4, 2, 2, 3, 1, 4, 4, 1, 2, 3, 1]
    replicates = bootstrap_replicates(x, [1] * len(x), resamples=40_000, seed=3)
    mean = sum(x) / len(x)
    expected = math.sqrt(sum((v - mean) ** 2 for v in x)) / len(x)
    assert float(replicates.std()) == pytest.approx(expected, rel=0.03)
    assert float(replicates.mean()) == pytest.approx(mean, abs=0.02)


def test_the_interval_is_reproducible_and_narrows_with_more_prompts():
    assert bootstrap_interval(PROMPTS, seed=7) == bootstrap_interval(PROMPTS, seed=7)
    wide = bootstrap_interval(PROMPTS, seed=0)
    narrow = bootstrap_interval(PROMPTS * 16, seed=0)
    assert narrow.high - narrow.low < wide.high - wide.low


def test_prompts_without_a_round_do_not_count():
    with_empty = [*PROMPTS, []]
    assert acceptance_length(with_empty) == acceptance_length(PROMPTS)
    assert bootstrap_interval(with_empty, seed=0) == bootstrap_interval(PROMPTS, seed=0)
    nothing = summarize([[], []], num_draft_tokens=3)
    assert math.isnan(nothing.acceptance_length) and math.isnan(nothing.interval.low)
    assert nothing.num_prompts == 2 and nothing.num_rounds == 0


def test_one_prompt_gives_a_point_interval():
    interval = ratio_interval([7], [3])
    assert interval.low == interval.high == pytest.approx(7 / 3)


def test_summary_holds_every_number_and_serializes():
    summary = summarize(PROMPTS, num_draft_tokens=3, seed=0)
    record = summary.to_dict()
    assert record["acceptance_length"] == pytest.approx(acceptance_length(PROMPTS))
    assert record["num_prompts"] == 4 and record["num_rounds"] == 14
    assert record["num_accepted_tokens"] == sum(map(sum, PROMPTS))
    assert record["interval"]["confidence"] == 0.95 and record["interval"]["low"] <= record["interval"]["high"]
    assert len(record["position_acceptance"]) == 3


@pytest.mark.parametrize("kwargs", [{"confidence": 1.0}, {"confidence": 0.0}, {"resamples": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        bootstrap_interval(PROMPTS, **kwargs)


def test_mismatched_numerators_and_denominators_are_refused():
    with pytest.raises(ValueError, match="2 numerators and 3 denominators"):
        ratio_interval([1, 2], [1, 1, 1])


SECOND = [[3, 3, 1], [2, 0], [1, 1, 1, 0], [3]]


@pytest.mark.parametrize("n", [3, 4])
def test_the_paired_difference_matches_the_exact_joint_bootstrap_distribution(n):
    from torchspec.trainer.loop.acceptance_stats import paired_difference_interval

    first, second = PROMPTS[:n], SECOND[:n]
    exact = []
    for picks in product(range(n), repeat=n):  # the same prompts drawn for both drafts
        exact.append(acceptance_length([second[i] for i in picks]) - acceptance_length([first[i] for i in picks]))
    exact.sort()
    interval = paired_difference_interval(first, second, confidence=0.9, resamples=40_000, seed=2)
    _assert_the_5_and_95_percent_quantiles(interval, exact)
    difference = acceptance_length(second) - acceptance_length(first)
    assert interval.low <= difference <= interval.high


def test_a_draft_against_itself_differs_by_exactly_nothing_and_mismatched_sets_are_refused():
    from torchspec.trainer.loop.acceptance_stats import paired_difference_interval

    same = paired_difference_interval(PROMPTS, PROMPTS, resamples=500)
    assert (same.low, same.high) == (0.0, 0.0)
    # Separate intervals would overlap widely here; resampled jointly, a shift of one accepted
    # token in every round of every prompt is certain.
    shifted = [[a + 1 for a in p] for p in PROMPTS]
    certain = paired_difference_interval(PROMPTS, shifted, resamples=500)
    assert certain.low == pytest.approx(1.0) and certain.high == pytest.approx(1.0)
    with pytest.raises(ValueError, match="the same prompts"):
        paired_difference_interval(PROMPTS, PROMPTS[:2])
