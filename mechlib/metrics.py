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

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int

__all__ = ["Metric", "as_metric", "logit_diff", "answer_prob", "ioi_metric", "normalised", "answer_ids"]

AnswerLike = Union[str, int, Sequence[Union[str, int]], torch.Tensor]


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
        """``fn(logits)`` as a tensor, checked to be a scalar or ``[batch]``.

        Raises:
            ValueError: The logits are not 3-D, or the function returned another shape.
        """
        if logits.ndim != 3:
            raise ValueError(
                f"metric {self.name!r} takes logits [batch, pos, vocab], got shape {tuple(logits.shape)}"
            )
        out = self.fn(logits)
        if not isinstance(out, torch.Tensor):
            try:
                out = torch.as_tensor(out, dtype=torch.float32)
            except Exception as exc:  # pragma: no cover - message is the point
                raise ValueError(f"metric {self.name!r} returned {type(out).__name__}, not a tensor or number") from exc
        batch = logits.shape[0]
        if out.ndim == 0 or (out.ndim == 1 and out.shape[0] == batch):
            return out
        raise ValueError(
            f"metric {self.name!r} returned shape {tuple(out.shape)} for logits of shape "
            f"{tuple(logits.shape)}; a metric must return a scalar or one value per prompt "
            f"[batch={batch}] (e.g. reduce over the vocabulary and positions, then .mean() or not)"
        )

    def scalar(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        """The metric averaged over the batch (a 0-d tensor)."""
        out = self.evaluate(logits)
        return out.mean() if out.ndim else out


def as_metric(metric: Union[Metric, Callable[[torch.Tensor], Any]]) -> Metric:
    """A :class:`Metric` from a metric or a plain callable (which gets full logits)."""
    if isinstance(metric, Metric):
        return metric
    if not callable(metric):
        raise TypeError(f"a metric must be callable (logits -> scalar or [batch]), got {type(metric).__name__}")
    return Metric(metric, name=getattr(metric, "__name__", "metric"), last_only=False)


def answer_ids(model: Any, answers: AnswerLike, n: int) -> Int[torch.Tensor, " batch"]:
    """One token id per prompt from strings (each must be ONE token), ids or a tensor.

    Raises:
        ValueError: A string that is several tokens (with its pieces), or a count that is not ``n``.
    """
    if model is None:
        if isinstance(answers, str) or (isinstance(answers, (list, tuple)) and any(isinstance(a, str) for a in answers)):
            raise ValueError("string answers need a model with a tokenizer; pass token ids instead")
        ids = torch.as_tensor(answers, dtype=torch.long).flatten()
        if ids.numel() == 1 and n > 1:
            ids = ids.repeat(n)
        if ids.numel() != n:
            raise ValueError(f"got {ids.numel()} answers for {n} prompts; give one answer, or exactly one per prompt")
        return ids
    from mechlib.logit_attribution import to_answer_ids

    return to_answer_ids(model, answers, n)


def _positions_index(logits: torch.Tensor, pos: Optional[Union[int, torch.Tensor]]) -> torch.Tensor:
    batch = torch.arange(logits.shape[0], device=logits.device)
    if pos is None:
        return logits[:, -1]
    if isinstance(pos, int):
        return logits[:, pos]
    return logits[batch, pos.to(logits.device)]


def logit_diff(
    model: Any,
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
    c = _as_ids(model, correct)
    w = _as_ids(model, wrong)
    n = max(c.numel(), w.numel())
    c = answer_ids(None, c, n)
    w = answer_ids(None, w, n)

    def fn(logits: torch.Tensor) -> torch.Tensor:
        at = _positions_index(logits, pos)
        rows = torch.arange(at.shape[0], device=at.device)
        cc, ww = _broadcast(c, at.shape[0]), _broadcast(w, at.shape[0])
        d = at[rows, cc.to(at.device)] - at[rows, ww.to(at.device)]
        return d if per_prompt else d.mean()

    return Metric(fn, name="logit diff", last_only=pos is None or (isinstance(pos, int) and pos == -1))


def answer_prob(
    model: Any, answer: AnswerLike, *, pos: Optional[Union[int, torch.Tensor]] = None, per_prompt: bool = True
) -> Metric:
    """Probability of the answer token (softmax over the vocabulary), per prompt.

    Args:
        model: Turns string answers into token ids (``None`` if you pass ids).
        answer: The answer per prompt (or one for all): one-token strings or ids.
        pos: Position to read (see :func:`logit_diff`).
        per_prompt: Return ``[batch]`` (default) or the batch mean.
    """
    a = _as_ids(model, answer)

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
    clean_value, corrupted_value = float(clean_value), float(corrupted_value)
    span = clean_value - corrupted_value
    if abs(span) < 1e-8:
        raise ValueError(
            f"cannot normalise {m.name!r}: the clean ({clean_value:.4g}) and corrupted ({corrupted_value:.4g}) "
            "runs score the same; pick prompts or a metric that tells them apart"
        )
    return Metric(lambda logits: (m.fn(logits) - corrupted_value) / span, name=f"normalised {m.name}", last_only=m.last_only)


def _as_ids(model: Any, answers: AnswerLike) -> torch.Tensor:
    if isinstance(answers, torch.Tensor):
        if answers.ndim > 1:
            raise ValueError(f"answers must be one token per prompt ([batch]), got shape {tuple(answers.shape)}")
        return answers.long().flatten()
    if isinstance(answers, (str, int)):
        return answer_ids(model, answers, 1)
    return answer_ids(model, list(answers), len(answers))


def _broadcast(ids: torch.Tensor, n: int) -> torch.Tensor:
    if ids.numel() == n:
        return ids
    if ids.numel() == 1:
        return ids.expand(n)
    raise ValueError(f"the metric has {ids.numel()} answers but the logits have {n} prompts")
