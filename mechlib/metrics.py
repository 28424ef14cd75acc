"""Patching metrics: functions of logits ``[batch, pos, vocab]`` that return a scalar or ``[batch]``.

A :class:`Metric` wraps such a function with two facts sweeps need:

* ``last_only``: the metric reads only the last position's logits. Sweeps then compute the
  unembedding for that position alone and hand the metric logits ``[batch, 1, vocab]`` (a batch of
  hundreds of patched rows x 49,152 vocabulary entries x every position would not fit in memory).
  Plain callables are wrapped with ``last_only=False``: they always get full logits (safe, slower).
* a checked output: :meth:`Metric.evaluate` raises a ``ValueError`` that names the shape it got
  when the function returns anything other than a scalar or a ``[batch]`` tensor.

Built-in metrics: :func:`logit_diff` (correct minus wrong answer logit), :func:`answer_prob`
(probability of the answer), :func:`ioi_metric` (IO minus S logit difference on an
:class:`mechlib.ioi.IOIDataset`), and :func:`normalised` to rescale any metric so that ``0`` is the
corrupted run and ``1`` the clean run. Sweeps in :mod:`mechlib.patching` normalise for you
(``normalise=True``) from the two base runs they compute anyway.

Example:
    >>> import torch
    >>> m = logit_diff(None, correct=torch.tensor([1, 2]), wrong=torch.tensor([0, 0]))
    >>> logits = torch.zeros(2, 3, 5); logits[:, -1, 1:3] = 2.0
    >>> m(logits).tolist(), m.last_only
    ([2.0, 2.0], True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from jaxtyping import Float

from mechlib.answers import AnswerLike, to_answer_ids
from mechlib.types import Model
from mechlib.validate import metric_values, whole

__all__ = ["Metric", "as_metric", "logit_diff", "answer_prob", "ioi_metric", "normalised", "answer_ids"]


@dataclass
class Metric:
    """A patching metric: ``fn(logits [batch, pos, vocab]) -> scalar or [batch]``.

    Attributes:
        fn: The function.
        name: For plots and messages, e.g. ``"logit diff"``.
        last_only: ``True`` if ``fn`` reads only the last position (``logits[:, -1]``); sweeps may
            then pass logits ``[batch, 1, vocab]``. Leave ``False`` when unsure: correct, slower.
    """

    fn: Callable[[torch.Tensor], Any]
    name: str = "metric"
    last_only: bool = False

    def __call__(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        return self.evaluate(logits)

    def evaluate(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        """``fn(logits)`` as a tensor, checked to be a finite float scalar or ``[batch]``.

        Raises:
            ValueError: The logits are not 3-D; the function returned another shape, NaN or inf.
            TypeError: The function returned something other than floats (e.g. an integer tensor).
        """
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"metric {self.name!r} takes logits [batch, pos, vocab], got {shape}")
        return metric_values(self.fn(logits), logits, self.name)

    def check(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        """:meth:`evaluate` on a full base run's logits, and proof that ``last_only`` holds.

        Sweeps call this once on a base run before trusting a metric. A metric that declares
        ``last_only`` but reads another position (e.g. ``logits[:, 0]``) would silently read the
        last one when handed ``[batch, 1, vocab]``; this compares the two readings.

        Raises:
            ValueError: As :meth:`evaluate`, or ``last_only`` is declared but the metric's value on
                the last position alone differs from its value on every position.
        """
        full = self.evaluate(logits)
        if self.last_only and logits.shape[1] > 1:
            last = self.evaluate(logits[:, -1:])
            if last.shape != full.shape or not torch.allclose(
                last.detach().float(), full.detach().float(), rtol=1e-4, atol=1e-5
            ):
                raise ValueError(
                    f"metric {self.name!r} declares last_only=True but does not read only the last position: on the "
                    "same run it gives different values from full logits and from logits[:, -1:]. Build it with "
                    "last_only=False (it then gets every position), or read logits[:, -1]"
                )
        return full

    def scalar(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        """The metric averaged over the batch (a 0-d tensor)."""
        out = self.evaluate(logits)
        return out.mean() if out.ndim else out


def as_metric(metric: Union[Metric, Callable[[torch.Tensor], Any]]) -> Metric:
    """A :class:`Metric` from a metric or a plain callable (which gets full logits)."""
    if isinstance(metric, Metric):
        if not callable(metric.fn):
            raise TypeError(
                f"metric {metric.name!r}: fn must be callable (logits -> scalar or [batch]), "
                f"got {type(metric.fn).__name__}"
            )
        if not isinstance(metric.last_only, bool):
            raise TypeError(f"metric {metric.name!r}: last_only must be True or False, got {metric.last_only!r}")
        return metric
    if not callable(metric):
        raise TypeError(f"metric must be callable (logits -> scalar or [batch]), got {type(metric).__name__}")
    return Metric(metric, name=getattr(metric, "__name__", "metric"), last_only=False)


#: The old name of :func:`mechlib.answers.to_answer_ids`, kept importable from here.
answer_ids = to_answer_ids


def _check_pos(pos: Any) -> Optional[Union[int, torch.Tensor]]:
    """``pos`` as None, an int, or a 1-D long tensor (one position per prompt)."""
    if pos is None:
        return None
    if isinstance(pos, torch.Tensor) and pos.ndim == 1:
        if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise TypeError(f"pos must hold whole numbers, got a {pos.dtype} tensor")
        return pos.long()
    return whole(pos, "pos")


def _positions_index(logits: torch.Tensor, pos: Optional[Union[int, torch.Tensor]]) -> torch.Tensor:
    batch = torch.arange(logits.shape[0], device=logits.device)
    if pos is None:
        return logits[:, -1]
    if isinstance(pos, int):
        if not -logits.shape[1] <= pos < logits.shape[1]:
            raise ValueError(f"pos {pos} is out of range for logits of {logits.shape[1]} positions")
        return logits[:, pos]
    if pos.shape[0] != logits.shape[0]:
        raise ValueError(f"pos has {pos.shape[0]} positions but the logits have {logits.shape[0]} prompts")
    return logits[batch, pos.to(logits.device)]


def logit_diff(
    model: Model,
    correct: AnswerLike,
    wrong: AnswerLike,
    *,
    pos: Optional[Union[int, torch.Tensor]] = None,
    per_prompt: bool = True,
) -> Metric:
    """Logit of the correct answer minus the wrong one, per prompt.

    Args:
        model: Turns string answers into token ids (``None`` if you pass ids).
        correct: The right answer per prompt (or one for all): one-token strings or ids.
        wrong: The wrong answer per prompt (or one for all).
        pos: Position to read: ``None`` (the last; lets sweeps unembed the last position only),
            an int, or a ``[batch]`` tensor of positions.
        per_prompt: Return ``[batch]`` (default) or the batch mean.

    Raises:
        ValueError: An answer is more than one token, or counts differ.

    Example:
        >>> m = logit_diff(model, " Mary", " John")          # doctest: +SKIP
        >>> m(model(model.to_tokens("When Mary and John went to the store, John gave a drink to")))  # doctest: +SKIP
    """
    pos = _check_pos(pos)
    _check_bool(per_prompt, "per_prompt")
    c = to_answer_ids(model, correct, name="correct")
    w = to_answer_ids(model, wrong, name="wrong")
    n = max(c.numel(), w.numel())
    c = to_answer_ids(None, c, n, name="correct")
    w = to_answer_ids(None, w, n, name="wrong")

    def fn(logits: torch.Tensor) -> torch.Tensor:
        at = _positions_index(logits, pos)
        rows = torch.arange(at.shape[0], device=at.device)
        cc, ww = _broadcast(c, at.shape[0]), _broadcast(w, at.shape[0])
        d = at[rows, cc.to(at.device)] - at[rows, ww.to(at.device)]
        return d if per_prompt else d.mean()

    return Metric(fn, name="logit diff", last_only=pos is None or (isinstance(pos, int) and pos == -1))


def answer_prob(
    model: Model, answer: AnswerLike, *, pos: Optional[Union[int, torch.Tensor]] = None, per_prompt: bool = True
) -> Metric:
    """Probability of the answer token (softmax over the vocabulary), per prompt.

    Args:
        model: Turns string answers into token ids (``None`` if you pass ids).
        answer: The answer per prompt (or one for all): one-token strings or ids.
        pos: Position to read (see :func:`logit_diff`).
        per_prompt: Return ``[batch]`` (default) or the batch mean.
    """
    pos = _check_pos(pos)
    _check_bool(per_prompt, "per_prompt")
    a = to_answer_ids(model, answer, name="answer")

    def fn(logits: torch.Tensor) -> torch.Tensor:
        at = _positions_index(logits, pos).float()
        rows = torch.arange(at.shape[0], device=at.device)
        p = at.softmax(-1)[rows, _broadcast(a, at.shape[0]).to(at.device)]
        return p if per_prompt else p.mean()

    return Metric(fn, name="answer probability", last_only=pos is None or (isinstance(pos, int) and pos == -1))


def ioi_metric(dataset: Any) -> Metric:
    """IO minus S logit difference at each prompt's END (an :class:`mechlib.ioi.IOIDataset`).

    ``last_only`` is set when END is the last token of every prompt (it is for the datasets
    :func:`mechlib.ioi.make_ioi_dataset` builds).
    """
    end = dataset.pos("END")
    last = bool((end == dataset.seq_len - 1).all())
    return logit_diff(None, dataset.io_ids, dataset.s_ids, pos=None if last else end)


def normalised(metric: Union[Metric, Callable], clean_value: float, corrupted_value: float) -> Metric:
    """Rescale a metric so that the corrupted run scores 0 and the clean run 1.

    Raises:
        ValueError: The clean and corrupted values are (nearly) equal: nothing to normalise by.
    """
    m = as_metric(metric)
    for name, v in (("clean_value", clean_value), ("corrupted_value", corrupted_value)):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, torch.Tensor))
            or (isinstance(v, torch.Tensor) and v.numel() != 1)
        ):
            raise TypeError(f"{name} must be a number (the metric on that run), got {v!r}")
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {float(v)}")
    clean_value, corrupted_value = float(clean_value), float(corrupted_value)
    span = clean_value - corrupted_value
    if abs(span) < 1e-8:
        raise ValueError(
            f"cannot normalise {m.name!r}: the clean ({clean_value:.4g}) and corrupted ({corrupted_value:.4g}) "
            "runs score the same; pick prompts or a metric that tells them apart"
        )
    return Metric(
        lambda logits: (m.fn(logits) - corrupted_value) / span, name=f"normalised {m.name}", last_only=m.last_only
    )


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _broadcast(ids: torch.Tensor, n: int) -> torch.Tensor:
    if ids.numel() == n:
        return ids
    if ids.numel() == 1:
        return ids.expand(n)
    raise ValueError(f"the metric has {ids.numel()} answers but the logits have {n} prompts")
