"""Circuits scored by ablation: keep a set of heads, mean-ablate every other one, measure what is left.

:func:`evaluate_circuit` is the IOI paper's faithfulness test (Wang et al. 2022, "Interpretability
in the Wild", section 4): the circuit's metric over the full model's metric, with intervals over
prompts (:class:`CircuitScore`).

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

__all__ = ["CircuitScore", "evaluate_circuit"]


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
    ``backend`` (see :func:`mechlib.patching.patch`).

    Returns:
        A :class:`CircuitScore`; ``faithfulness`` = circuit metric / full-model metric; ``ci()``,
        ``faithfulness_ci()`` give intervals over prompts.
    """
    tokens = validate.token_tensor(tokens, model)
    reference = validate.token_tensor(reference, model, "reference")
    metric = as_metric(metric)
    keep = set(normalize_heads(model, heads))
    outside = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in keep]
    be = get_backend(model, backend)
    means = head_means(model, reference, groups=groups, backend=be)
    runs = be.cache({"tokens": tokens}, [])
    logits = runs.last_logits("tokens")[:, None] if metric.last_only else runs.logits["tokens"]
    full = metric.evaluate(logits).detach().float().cpu()
    ivs = ablation_interventions(model, outside, "mean", means=means) if outside else []
    ablated = be.run(runs, [ivs], base="tokens", score=metric.evaluate, last_only=metric.last_only).values[0]
    per = ablated.float() if ablated.ndim else ablated.float().reshape(1)
    return CircuitScore(
        [head_label(l, h) for l, h in sorted(keep)],
        float(full.mean()),
        float(ablated.mean()),
        per,
        full if full.ndim else full.reshape(1),
        {"backend": be.name},
    )
