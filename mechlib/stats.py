"""Error bars for every measured number: intervals over prompts, facts, seeds or trials.

Thin, named wrappers over TransformerLens 4.3's ``utilities/statistics.py`` (``bootstrap_ci``,
``standard_error``, ``success_rate_ci``, ``sign_flip_permutation_pvalue``) that return one small
labelled value, :class:`Estimate`, which findings records store and claims are checked against:
a claim holds only where the whole interval clears its threshold, never the point value alone.

Example:
    >>> import torch
    >>> est = mean_ci(torch.tensor([0.8, 0.9, 0.7, 0.85, 0.95]))
    >>> round(est.value, 3), est.n
    (0.84, 5)
    >>> est.low < est.value < est.high
    True
    >>> rate_ci([True] * 9 + [False]).value
    0.9
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence, Union

import torch
from transformer_lens.utilities.statistics import (
    bootstrap_ci,
    derive_generator,
    sign_flip_permutation_pvalue,
    standard_error,
    success_rate_ci,
)

__all__ = ["Estimate", "mean_ci", "rate_ci", "paired_pvalue", "as_tensor_1d"]

Values = Union[torch.Tensor, Sequence[float], Iterable[float]]


@dataclass(frozen=True)
class Estimate:
    """A measured value with its confidence interval.

    Attributes:
        value: The point estimate (a mean or a rate).
        low: Lower end of the interval.
        high: Upper end of the interval.
        n: How many samples (prompts, facts, seeds, trials) it rests on.
        confidence: The interval's confidence level.
        method: ``"bootstrap"`` (percentile bootstrap of the mean), ``"clopper-pearson"`` (exact
            binomial), or ``"single"`` (one sample: the interval is the point, and says so).
        stderr: Standard error of the mean (``nan`` where undefined).
    """

    value: float
    low: float
    high: float
    n: int
    confidence: float = 0.95
    method: str = "bootstrap"
    stderr: float = float("nan")

    def above(self, threshold: float) -> bool:
        """Whether the whole interval lies above ``threshold``."""
        return self.low > threshold

    def below(self, threshold: float) -> bool:
        """Whether the whole interval lies below ``threshold``."""
        return self.high < threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        pct = int(round(self.confidence * 100))
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}] ({pct}% CI, n={self.n})"

    def _repr_markdown_(self) -> str:
        return str(self)


def as_tensor_1d(values: Values, name: str = "values") -> torch.Tensor:
    """Per-sample values as a flat float64 tensor; refuses empty or non-finite input by name."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be numbers, got a string")
    t = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(list(values))
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must be numbers, got booleans; use rate_ci for successes")
    t = t.reshape(-1).to(torch.float64).cpu()
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: an interval needs at least one sample")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(t)).sum())} non-finite value(s); drop or fix them first")
    return t


def mean_ci(
    values: Values, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0, name: str = "values"
) -> Estimate:
    """Mean of per-sample values with a percentile-bootstrap interval (TransformerLens's).

    Args:
        values: One number per prompt, fact or seed.
        confidence: Interval level in (0, 1).
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling (same seed, same interval).

    Returns:
        An :class:`Estimate`; with one sample, ``method="single"`` and a zero-width interval.
    """
    t = as_tensor_1d(values, name)
    n = t.numel()
    mean = float(t.mean())
    if n == 1:
        return Estimate(mean, mean, mean, 1, confidence, "single")
    lo, hi = bootstrap_ci(
        t, confidence=confidence, n_resamples=n_resamples, generator=derive_generator(seed, "mean_ci")
    )
    return Estimate(mean, float(lo), float(hi), n, confidence, "bootstrap", float(standard_error(t)))


def rate_ci(successes: Sequence[bool], *, confidence: float = 0.95, name: str = "successes") -> Estimate:
    """A success rate with its exact (Clopper-Pearson) interval (TransformerLens's)."""
    if isinstance(successes, torch.Tensor):
        successes = successes.reshape(-1).tolist()
    successes = list(successes)
    if not successes:
        raise ValueError(f"{name} is empty: a rate needs at least one trial")
    if any(not isinstance(s, (bool, int)) or s not in (0, 1) for s in successes):
        raise TypeError(f"{name} must be booleans (or 0/1), one per trial")
    ci = success_rate_ci([bool(s) for s in successes], confidence=confidence)
    p = ci.point_estimate
    se = math.sqrt(p * (1 - p) / ci.n_trials)
    return Estimate(p, ci.ci_low, ci.ci_high, ci.n_trials, confidence, "clopper-pearson", se)


def paired_pvalue(
    effects: Values, *, alternative: str = "greater", n_permutations: int = 10000, seed: int = 0, name: str = "effects"
) -> float:
    """Sign-flip permutation p-value that paired differences (e.g. real minus control) are > 0.

    Args:
        effects: One paired difference per prompt / seed / fact.
        alternative: ``"greater"``, ``"less"`` or ``"two-sided"``.
    """
    t = as_tensor_1d(effects, name)
    p = sign_flip_permutation_pvalue(
        t, n_permutations=n_permutations, generator=derive_generator(seed, "pvalue"), alternative=alternative
    )
    return float(p)
