"""Attention read per head: how much a head attends from a query position to named key positions.

:func:`head_attention` returns a grid ``("head", "key")`` of mean attention probabilities with
per-prompt values, e.g. how much IOI's name movers attend from END to the indirect object versus
the subject. Patterns come from :mod:`mechlib.engine` when it mirrors the model, else from the
bridge's cache. (To *look* at patterns, see :mod:`mechlib.views`.)

Example:
    >>> from mechlib.attention import head_attention
    >>> head_attention(model, ds.tokens, ["L23H0"], ds.pos("END"),
    ...                {"IO": ds.pos("IO"), "S2": ds.pos("S2")})             # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from jaxtyping import Int

from mechlib import validate
from mechlib.engine.forward import get_engine
from mechlib.readout import activations
from mechlib.results import PromptGrid, head_label
from mechlib.types import Model

__all__ = ["head_attention"]


def head_attention(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    heads: Sequence[Union[str, tuple[int, int]]],
    query: Union[int, torch.Tensor],
    keys: dict[str, Union[int, torch.Tensor]],
) -> PromptGrid:
    """Attention paid by each head from a query position to named key positions, per prompt mean.

    Args:
        model: A bridge.
        tokens: ``[batch, pos]``.
        heads: ``["L23H0", (24, 4), ...]``.
        query: The query position (an int, or one per prompt), e.g. ``ds.pos("END")``.
        keys: ``{name: position(s)}``, e.g. ``{"IO": ds.pos("IO"), "S1": ds.pos("S1")}``.

    Returns:
        A :class:`~mechlib.results.PromptGrid` ``("head", "key")`` of mean attention
        probabilities; ``per_prompt`` is ``[batch, head, key]`` (``ci()``, ``estimate(head=, key=)``
        give intervals over prompts); ``meta["per_prompt"]`` keeps the older ``[head, key, batch]``
        layout of the same values.

    Example:
        >>> head_attention(model, ds.tokens, ["L23H0"], ds.pos("END"),
        ...                {"IO": ds.pos("IO"), "S2": ds.pos("S2")})             # doctest: +SKIP
    """
    tokens = validate.token_tensor(tokens, model)
    hs = validate.head_specs(model, heads)
    B = tokens.shape[0]
    idx = torch.arange(B)

    if not isinstance(keys, dict) or not keys:
        raise TypeError(f"keys must be a non-empty {{name: position(s)}} dict, got {keys!r}")
    T = tokens.shape[1]
    q = validate.prompt_positions(query, B, T, "query")
    key_pos = {k: validate.prompt_positions(v, B, T, f"keys[{k!r}]") for k, v in keys.items()}
    names = {f"blocks.{l}.attn.hook_pattern" for l, _ in hs}
    engine = get_engine(model, "float32")  # patterns as the bridge computes them, whatever the precision
    if engine is not None:
        acts = engine.run(tokens, keep=names).acts
    else:
        with torch.no_grad():
            acts = activations(model, tokens, lambda n: n in names)
    per = torch.zeros(len(hs), len(keys), B)
    for i, (l, h) in enumerate(hs):
        pat = acts[f"blocks.{l}.attn.hook_pattern"][idx, h, q].float().cpu()  # [B, key]
        for j, kp in enumerate(key_pos.values()):
            per[i, j] = pat[idx, kp]
    return PromptGrid(
        per.mean(-1),
        ("head", "key"),
        {"head": [head_label(l, h) for l, h in hs], "key": list(keys)},
        title="attention from the query position",
        metric="attention probability",
        meta={"per_prompt": per},
        per_prompt=per.permute(2, 0, 1),
    )
