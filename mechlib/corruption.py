"""Corrupting the subject for causal tracing (Meng et al. 2022, ROME): where the noise goes, how big.

ROME's corrupted run adds Gaussian noise to the subject's token embeddings, with a standard
deviation of 3 x the spread of subject-token embeddings. :func:`default_noise_scale` measures that
spread (per model, cached), :func:`corruption_noise` draws the seeded noise, and
:func:`corruption` states the corrupted run as interventions (:mod:`mechlib.interventions`):
``Add(noise)`` at ``embed`` (``corrupt="embed"``, ROME) or at ``resid_post`` of block 0
(``corrupt="block0"``: MLP 0 counted as part of the embedding).

Example:
    >>> corruption_noise(10, 3, 576, 0.3, seed=0).shape
    torch.Size([10, 3, 576])
    >>> ivs = corruption(torch.zeros(2, 3, 8), 4, (1, 4))
    >>> str(ivs[0])
    'Add(embed@[1, 2, 3])'
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Union

import torch
from jaxtyping import Float

from mechlib import facts as _facts
from mechlib.interventions import Add, Intervention, Site

__all__ = [
    "CORRUPTIONS",
    "NoiseScale",
    "check_corrupt",
    "check_noise",
    "corruption",
    "corruption_noise",
    "default_noise_scale",
    "resolve_noise",
]

NoiseScale = _facts.NoiseScale

#: Where the subject is corrupted: its token embeddings (``"embed"``, ROME) or the residual
#: stream after block 0 (``"block0"``: MLP 0 counted as part of the embedding).
CORRUPTIONS: tuple[str, ...] = ("embed", "block0")


def check_noise(noise: Any) -> None:
    """Raise unless ``noise`` is a positive finite number (a noise standard deviation)."""
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise TypeError(
            f"noise must be a number (the std of the Gaussian noise added to the subject), a NoiseScale, or None "
            f"for the default (3 x the std of subject-token embeddings), got {noise!r} ({type(noise).__name__})"
        )
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(
            f"the noise scale must be a positive number (the std of the Gaussian noise added to the "
            f"subject's embeddings; ROME uses 3 x the std of subject-token embeddings), got {noise!r}"
        )


def check_corrupt(corrupt: Any) -> None:
    """Raise unless ``corrupt`` is one of :data:`CORRUPTIONS`."""
    if corrupt not in CORRUPTIONS:
        raise ValueError(
            f"corrupt must be one of {CORRUPTIONS}: 'embed' (ROME: noise on the subject's token embeddings) or "
            f"'block0' (MLP 0 as part of the embedding: noise on the residual after block 0), got {corrupt!r}"
        )


_NOISE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_noise_scale(model: Any, corrupt: str = "embed") -> NoiseScale:
    """The reference spread that sets the default noise (noise std = 3 x ``.std``).

    For a model with a tokenizer: the std of the vectors that are corrupted, at every subject
    token of mechlib's facts dataset (:func:`mechlib.facts.noise_scale`), as ROME measured over
    its subjects: the token embeddings as ``hook_embed`` sees them (``corrupt="embed"``; Gemma's
    ``sqrt(d_model)`` scale included) or the residual stream after block 0 (``corrupt="block0"``).
    For a model without one (the tiny random models): the same over every vocabulary token (for
    ``"block0"``, each token alone at position 0). Cached per model.
    """
    check_corrupt(corrupt)
    per_model = _NOISE_CACHE.setdefault(model, {})
    hit = per_model.get(corrupt)
    if hit is not None:
        return hit
    if getattr(model, "tokenizer", None) is not None:
        scale = _facts.noise_scale(model, _facts.load_facts(), at=corrupt)
    elif corrupt == "embed":
        n = model.cfg.d_vocab
        W = _facts.embedding_vectors(model, torch.arange(n))
        scale = NoiseScale(float(W.std()), n, n, f"the token embeddings (hook_embed) of all {n} vocabulary tokens")
    else:
        ids = torch.arange(model.cfg.d_vocab)
        x = _facts.block0_outputs(model, [[int(i)] for i in ids], [(0, 1)] * len(ids))
        scale = NoiseScale(
            float(x.std()),
            len(ids),
            len(ids),
            f"the block-0 outputs (blocks.0.hook_resid_post) of all {len(ids)} vocabulary tokens, each alone",
        )
    per_model[corrupt] = scale
    return scale


def resolve_noise(
    model: Any, noise: Union[None, float, NoiseScale], corrupt: str = "embed", multiplier: float = 3.0
) -> tuple[float, str]:
    """The noise std and how it was set: ``multiplier`` x a :class:`NoiseScale` (the default one
    of ``corrupt`` for ``None``), or a number as given."""
    if noise is None:
        scale = default_noise_scale(model, corrupt)
        return scale.noise(multiplier), f"{multiplier:g} x {scale.std:.4g} (std of {scale.measured_on})"
    if isinstance(noise, NoiseScale):
        return noise.noise(multiplier), f"{multiplier:g} x {noise.std:.4g} (std of {noise.measured_on})"
    return noise, "given"


def corruption_noise(
    samples: int, n_subject_tokens: int, d_model: int, scale: float, seed: int = 0
) -> Float[torch.Tensor, "samples subject d_model"]:
    """The Gaussian noise added to the subject's token embeddings: ``scale * N(0, 1)``, seeded.

    The same noise is used for every restored cell of a fact (as in ROME), so every cell's
    effect is measured against the same corrupted runs.

    Example:
        >>> corruption_noise(10, 3, 576, 0.3, seed=0).shape
        torch.Size([10, 3, 576])
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(samples, n_subject_tokens, d_model, generator=g) * float(scale)


def corruption(
    noise: Float[torch.Tensor, "samples subject d_model"], n_pos: int, subject: tuple[int, int], corrupt: str = "embed"
) -> list[Intervention]:
    """The corrupted run as interventions on ``samples`` copies of a prompt of ``n_pos`` tokens:
    ``noise`` added at the subject's positions ``subject = (start, end)``, to the token
    embeddings (``"embed"``) or to the residual after block 0 (``"block0"``)."""
    check_corrupt(corrupt)
    s0, s1 = subject
    if noise.ndim != 3 or noise.shape[1] != s1 - s0:
        raise ValueError(f"noise must be [samples, {s1 - s0}, d_model] for subject {subject}, got {tuple(noise.shape)}")
    value = torch.zeros(noise.shape[0], n_pos, noise.shape[2], dtype=noise.dtype)
    value[:, s0:s1] = noise
    site = (
        Site("embed", positions=range(s0, s1)) if corrupt == "embed" else Site("resid_post", 0, positions=range(s0, s1))
    )
    return [Intervention(site, Add(value))]
