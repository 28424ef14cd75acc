"""Causal tracing's noise level: the spread of the subject tokens' embeddings (ROME: noise of 3 x std).

:func:`noise_scale` measures it over facts' subject tokens, on the token embeddings
(:func:`embedding_vectors`, :func:`embedding_std`) or on the residual after block 0
(:func:`block0_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from jaxtyping import Float, Int

from mechlib.facts.dataset import Fact
from mechlib.facts.tokens import prompt_tokens, subject_token_span
from mechlib.models import model_device
from mechlib.types import Model

__all__ = ["NoiseScale", "block0_outputs", "embedding_std", "embedding_vectors", "noise_scale"]


@dataclass(frozen=True)
class NoiseScale:
    """The spread of token embeddings that sets causal tracing's noise level.

    Attributes:
        std: Standard deviation of all coordinates of the embedding vectors measured.
        n_tokens: How many token occurrences were pooled.
        n_vectors_unique: How many distinct tokens those were.
        measured_on: What the vectors were, in words.
    """

    std: float
    n_tokens: int
    n_vectors_unique: int
    measured_on: str

    def noise(self, multiplier: float = 3.0) -> float:
        """The noise standard deviation to use: ``multiplier x std`` (ROME uses 3)."""
        return multiplier * self.std


def embedding_vectors(
    model: Model, token_ids: Union[Sequence[int], Int[torch.Tensor, " n"]]
) -> Float[torch.Tensor, "n d_model"]:
    """The token embeddings ``hook_embed`` sees for ``token_ids``: rows of ``W_E``, times the
    embedding scale where the model has one (Gemma multiplies by ``sqrt(d_model)``), before any
    positional embedding."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("no token ids given to measure the embedding spread on")
    d_vocab = model.W_E.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= d_vocab:
        raise ValueError(f"token ids must lie in [0, {d_vocab}); got min {int(ids.min())}, max {int(ids.max())}")
    with torch.no_grad():
        vectors = model.W_E.detach()[ids.to(model.W_E.device)].float()
        scale = getattr(getattr(getattr(model, "embed", None), "original_component", None), "embed_scale", None)
        if scale is not None:
            vectors = vectors * torch.as_tensor(scale, dtype=vectors.dtype, device=vectors.device)
    return vectors


def embedding_std(model: Model, token_ids: Union[Sequence[int], Int[torch.Tensor, " n"]]) -> float:
    """Standard deviation over all coordinates of the token embeddings of ``token_ids``.

    Duplicates count as often as they occur (ROME pools every subject-token occurrence). These
    are the vectors the ``hook_embed`` hook sees, where causal tracing adds its noise: rows of
    ``W_E``, scaled as the model scales them (:func:`embedding_vectors`).

    Example:
        >>> embedding_std(tiny_model, [1, 2, 3])   # doctest: +SKIP
    """
    return float(embedding_vectors(model, token_ids).std())


def block0_outputs(
    model: Model, token_lists: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *, batch_size: int = 64
) -> Float[torch.Tensor, "n d_model"]:
    """The residual stream after block 0 (``blocks.0.hook_resid_post``) at chosen positions.

    Prompt ``i`` is ``token_lists[i]``; its rows ``spans[i][0] .. spans[i][1] - 1`` are returned,
    all prompts' rows stacked in order. Prompts are batched, right-padded (attention is causal,
    so padding after a position cannot change it), and run through block 0 only. This is the
    "extended embedding" (token embedding + block 0's attention and MLP) that causal tracing
    corrupts with ``corrupt="block0"``.

    Example:
        >>> block0_outputs(tiny_model, [[1, 2, 3]], [(1, 3)]).shape      # doctest: +SKIP
        torch.Size([2, 64])
    """
    if len(token_lists) != len(spans):
        raise ValueError(f"token_lists has {len(token_lists)} prompts but spans has {len(spans)} spans")
    if not token_lists:
        raise ValueError("no prompts given to measure block-0 outputs on")
    name = "blocks.0.hook_resid_post"
    out = []
    for a in range(0, len(token_lists), batch_size):
        chunk = [list(map(int, t)) for t in token_lists[a : a + batch_size]]
        width = max(len(t) for t in chunk)
        batch = torch.tensor([t + [t[-1]] * (width - len(t)) for t in chunk], dtype=torch.long)
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.to(model_device(model)), names_filter=[name], stop_at_layer=1)
        acts = cache[name].detach().float().cpu()
        for i, (s0, s1) in enumerate(spans[a : a + batch_size]):
            if not 0 <= s0 < s1 <= len(chunk[i]):
                raise ValueError(f"span {(s0, s1)} does not fit prompt {a + i} of {len(chunk[i])} tokens")
            out.append(acts[i, s0:s1])
    return torch.cat(out)


def noise_scale(model: Model, facts: Sequence[Fact], *, at: str = "embed") -> NoiseScale:
    """ROME's noise reference: the std of the embeddings of every subject token of ``facts``.

    Each fact's subject tokens are taken as they occur in its prompt (so with the leading space
    the prompt gives them), every occurrence counted. ROME measured the same statistic over the
    subjects of its known facts; causal tracing then adds noise of ``3 x std``.

    Args:
        model: A TransformerBridge with a tokenizer.
        facts: The reference facts (ROME: the known facts).
        at: Which vectors: ``"embed"``, the token embeddings (ROME); ``"block0"``, the residual
            stream after block 0 at the subject tokens (:func:`block0_outputs`), the vectors
            causal tracing corrupts with ``corrupt="block0"``.

    Returns:
        A :class:`NoiseScale` with the value and what it was measured on.

    Example:
        >>> scale = noise_scale(model, [k.fact for k in known])   # doctest: +SKIP
        >>> scale.noise()                                          # 3 x scale.std  # doctest: +SKIP
    """
    if at not in ("embed", "block0"):
        raise ValueError(f"at must be 'embed' (token embeddings) or 'block0' (the residual after block 0), got {at!r}")
    if isinstance(facts, (str, Fact)) or not facts:
        raise ValueError("noise_scale needs at least one fact (a non-empty list) to measure subject embeddings on")
    ids: list[int] = []
    prompts: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    for fact in facts:
        toks, _, _ = prompt_tokens(model, fact.prompt, None)
        start, end = subject_token_span(model, fact.prompt, fact.subject, char_start=fact.subject_char_span[0])
        ids += toks[start:end]
        prompts.append(toks)
        spans.append((start, end))
    n_subjects = len({f.subject for f in facts})
    where = f"all {len(ids)} subject-token occurrences in {len(facts)} fact prompts ({n_subjects} distinct subjects)"
    if at == "embed":
        std, what = embedding_std(model, ids), "token embeddings (hook_embed)"
    else:
        std, what = float(block0_outputs(model, prompts, spans).std()), "block-0 outputs (blocks.0.hook_resid_post)"
    return NoiseScale(std=std, n_tokens=len(ids), n_vectors_unique=len(set(ids)), measured_on=f"{what} of {where}")
