"""Circuits scored by ablation: keep a set of heads, mean-ablate every other one, measure what is left.

:func:`evaluate_circuit` is the IOI paper's faithfulness test (Wang et al. 2022, "Interpretability
in the Wild", section 4): the circuit's metric over the full model's metric, with intervals over
prompts (:class:`CircuitScore`). :class:`CircuitEvaluator` scores many circuits on the same prompts
(a circuit and its random controls), computing what they share once.

Example:
    >>> from mechlib.circuits import evaluate_circuit
    >>> score = evaluate_circuit(model, ds.tokens, ["L23H0", (24, 4)], ioi_metric(ds),
    ...                          reference=ds.corrupted_tokens)          # doctest: +SKIP
    >>> score.faithfulness_ci()                                          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Int

from mechlib import validate
from mechlib.ablation import ablation_interventions, head_means, normalize_heads
from mechlib.backends import Backend, get_backend
from mechlib.metrics import Metric, as_metric
from mechlib.results import head_label
from mechlib.stats import Estimate, mean_ci
from mechlib.types import Model

__all__ = ["CircuitEvaluator", "CircuitScore", "evaluate_circuit"]


@dataclass
class CircuitScore:
    """How much of the model's behaviour a set of heads keeps when every other head is ablated.

    Attributes:
        heads: The circuit's heads.
        model_value: The metric on the intact model.
        circuit_value: The metric with every head outside the circuit mean-ablated.
        faithfulness: ``circuit_value / model_value`` (1 = the circuit alone does it all).
        per_prompt: The circuit's metric per prompt.
        model_per_prompt: The intact model's metric per prompt.
        meta: ``backend`` (the one that ran it).
    """

    heads: list[str]
    model_value: float
    circuit_value: float
    per_prompt: torch.Tensor
    model_per_prompt: Optional[torch.Tensor] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def faithfulness(self) -> float:
        return self.circuit_value / self.model_value

    def stderr(self) -> float:
        """Standard error over prompts of the circuit's metric."""
        return self.ci().stderr

    def ci(self, confidence: float = 0.95) -> Estimate:
        """The circuit's metric with its bootstrap interval over prompts (:func:`mechlib.stats.mean_ci`)."""
        return mean_ci(self.per_prompt, confidence=confidence, name="circuit metric per prompt")

    def faithfulness_ci(self, confidence: float = 0.95) -> Estimate:
        """Faithfulness with its interval over prompts, the intact model's mean held fixed as the unit
        (per-prompt circuit metric / ``model_value``; its mean is :attr:`faithfulness`)."""
        return mean_ci(self.per_prompt / self.model_value, confidence=confidence, name="faithfulness per prompt")

    def __repr__(self) -> str:
        return (
            f"CircuitScore({len(self.heads)} heads: metric {self.circuit_value:.3f} of {self.model_value:.3f}, "
            f"faithfulness {self.faithfulness:.2f})"
        )


class CircuitEvaluator:
    """Scores many circuits on one set of prompts (IOI paper, section 4): every head outside a
    circuit is mean-ablated, MLPs and the embeddings stay.

    What every circuit shares is computed once, here: the heads' means over ``reference`` (per
    position and per group, through :mod:`mechlib.ablation`), the intact run and its metric.
    Each call then costs one ablated forward pass per circuit, and :meth:`many` runs several
    circuits' intervention lists through the backend together. A loop over
    :func:`evaluate_circuit` recomputes the shared parts every time; the results are the same.

    Args:
        model: The model.
        tokens: ``[batch, pos]`` the prompts the circuits are scored on.
        metric: A :class:`~mechlib.metrics.Metric` (or a function of the logits).
        reference: ``[batch', pos]`` the prompts whose head outputs are the means (the ABC
            distribution for IOI: ``ds.corrupted_tokens``).
        groups: One group label per ``reference`` row and prompt (e.g. ``ds.template_ids.tolist()``),
            so that each prompt gets its own group's mean; default one group.
        backend: ``"auto"``, ``"engine"``, ``"bridge"``, ``"nnsight"`` or a backend (see
            :func:`mechlib.patching.patch`).

    Example:
        >>> score = CircuitEvaluator(model, held.tokens, metric, reference=held.corrupted_tokens,
        ...                          groups=held.template_ids.tolist())     # doctest: +SKIP
        >>> circuit = score(["L23H0", (24, 4)])                               # doctest: +SKIP
        >>> controls = score.many([rng.sample(all_heads, 2) for _ in range(20)])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        metric: Union[Metric, Callable],
        *,
        reference: Int[torch.Tensor, "batch pos"],
        groups: Optional[Sequence[Any]] = None,
        backend: Union[str, Backend] = "auto",
    ) -> None:
        self.model = model
        self.tokens = validate.token_tensor(tokens, model)
        reference = validate.token_tensor(reference, model, "reference")
        self.metric = as_metric(metric)
        self.backend = get_backend(model, backend)
        self.means = head_means(model, reference, groups=groups, backend=self.backend)
        self.runs = self.backend.cache({"tokens": self.tokens}, [])
        logits = self.runs.last_logits("tokens")[:, None] if self.metric.last_only else self.runs.logits["tokens"]
        full = self.metric.evaluate(logits).detach().float().cpu()
        self.model_per_prompt = full if full.ndim else full.reshape(1)

    def __call__(self, heads: Sequence[Union[str, tuple[int, int]]]) -> CircuitScore:
        """The :class:`CircuitScore` of the circuit ``heads`` (``"L5H1"`` or ``(5, 1)`` each)."""
        return self.many([heads])[0]

    def many(self, circuits: Sequence[Sequence[Union[str, tuple[int, int]]]]) -> list[CircuitScore]:
        """The :class:`CircuitScore` of each circuit, in order; their ablated runs go to the backend
        as one batch of intervention lists."""

        if isinstance(circuits, str) or not isinstance(circuits, Sequence) or any(map(validate.is_head, circuits)):
            raise TypeError(
                f"circuits must be a list of circuits, each a list of heads, got {circuits!r:.80}; "
                "score one circuit with evaluator(heads)"
            )
        cfg = self.model.cfg
        kept = [set(normalize_heads(self.model, heads)) for heads in circuits]
        lists = []
        for keep in kept:
            outside = [(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads) if (l, h) not in keep]
            lists.append(ablation_interventions(self.model, outside, "mean", means=self.means) if outside else [])
        if not lists:
            return []
        ablated = self.backend.run(
            self.runs, lists, base="tokens", score=self.metric.evaluate, last_only=self.metric.last_only
        ).values
        full = self.model_per_prompt
        scores = []
        for keep, values in zip(kept, ablated):
            per = values.float() if values.ndim else values.float().reshape(1)
            scores.append(
                CircuitScore(
                    [head_label(l, h) for l, h in sorted(keep)],
                    float(full.mean()),
                    float(per.mean()),
                    per,
                    full,
                    {"backend": self.backend.name},
                )
            )
        return scores


def evaluate_circuit(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    heads: Sequence[Union[str, tuple[int, int]]],
    metric: Union[Metric, Callable],
    *,
    reference: Int[torch.Tensor, "batch pos"],
    groups: Optional[Sequence[Any]] = None,
    backend: Union[str, Backend] = "auto",
) -> CircuitScore:
    """Mean-ablate every head outside ``heads`` and score what is left (IOI paper, section 4).

    The means come from ``reference`` (the ABC distribution for IOI: ``ds.corrupted_tokens``),
    per position and per group (``groups``: e.g. ``ds.template_ids.tolist()``, so each prompt
    gets its own template's mean), through :mod:`mechlib.ablation`. MLPs and the embeddings stay.
    The ablation is one intervention list (:func:`mechlib.ablation.ablation_interventions`) run on
    ``backend`` (see :func:`mechlib.patching.patch`). To score several circuits on the same
    prompts, a :class:`CircuitEvaluator` computes the means and the intact run once.

    Returns:
        A :class:`CircuitScore`; ``faithfulness`` = circuit metric / full-model metric; ``ci()``,
        ``faithfulness_ci()`` give intervals over prompts.
    """
    return CircuitEvaluator(model, tokens, metric, reference=reference, groups=groups, backend=backend)(heads)
