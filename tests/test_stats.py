"""mechlib.stats against direct computations."""

import math

import pytest
import torch

from mechlib.stats import mean_ci, paired_pvalue, rate_ci


def test_mean_ci_brackets_the_mean_and_narrows_with_more_samples():
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(10, generator=gen) + 1.0
    large = torch.randn(400, generator=gen) + 1.0
    a, b = mean_ci(small), mean_ci(large)
    assert a.low < a.value < a.high and b.low < b.value < b.high
    assert math.isclose(a.value, float(small.double().mean()), rel_tol=1e-9)
    assert (b.high - b.low) < (a.high - a.low)
    assert math.isclose(b.stderr, float(large.double().std() / math.sqrt(400)), rel_tol=1e-6)
    assert mean_ci(small) == mean_ci(small)  # seeded


def test_rate_ci_is_clopper_pearson():
    est = rate_ci([True] * 9 + [False])
    assert est.value == 0.9 and est.n == 10
    # exact bounds for 9/10 at 95%: 0.5550 and 0.9975
    assert abs(est.low - 0.5550) < 1e-3 and abs(est.high - 0.9975) < 1e-3


def test_paired_pvalue_small_for_a_consistent_effect_and_large_for_noise():
    assert paired_pvalue([0.5, 0.7, 0.6, 0.4, 0.8, 0.55, 0.65, 0.45, 0.5, 0.6]) < 0.01
    assert paired_pvalue([0.1, -0.2, 0.05, -0.1, 0.15, -0.05, 0.0, 0.1, -0.15, 0.05]) > 0.2


@pytest.mark.parametrize(
    "bad, error",
    [([], ValueError), ([1.0, float("nan")], ValueError), ("123", TypeError), ([True, False], TypeError)],
)
def test_bad_values_are_refused_by_name(bad, error):
    with pytest.raises(error, match="values"):
        mean_ci(bad)


def test_rate_ci_refuses_non_boolean_trials():
    with pytest.raises(TypeError, match="successes"):
        rate_ci([0.5, 1.0])
    with pytest.raises(ValueError, match="successes"):
        rate_ci([])
