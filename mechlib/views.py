"""Interactive views (CircuitsVis) that work offline and never touch the network.

CircuitsVis's ``RenderedHTML._repr_html_`` probes ``http://google.com`` at every render and, when
it gets an answer, returns HTML that imports the widget from a CDN (unpkg). Offline that costs a
timeout per render, and a notebook saved online shows nothing when reopened offline. mechlib's
views instead always embed the JavaScript bundle that ships inside the circuitsvis package
(``circuitsvis/dist/cdn/iife.js``), so they render the same with or without a network and make no
network call of their own.

Example:
    >>> from mechlib import load_model
    >>> from mechlib.views import attention_patterns
    >>> model = load_model("smollm2-135m")                              # doctest: +SKIP
    >>> attention_patterns(model, "When Mary and John went to the store, John gave a drink to",
    ...                    heads=["L17H3", (18, 1)])                    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int

from mechlib.models import model_device
from mechlib.readout import activations
from mechlib.results import head_label
from mechlib.types import Model
from mechlib.validate import parse_head

__all__ = ["OfflineView", "attention_heads", "attention_patterns", "offline"]

HeadSpec = Union[str, tuple[int, int]]


class OfflineView:
    """A rendered CircuitsVis widget whose HTML embeds the circuitsvis JavaScript bundle.

    Displays itself in Jupyter (``_repr_html_``) and can be written to a standalone HTML file.

    Attributes:
        html: The HTML (a ``<div>`` and an inline ``<script>`` holding the bundle).
        data: What was rendered, for reuse in code (e.g. ``{"attention": ..., "tokens": ...}``).
    """

    def __init__(self, html: str, data: Optional[dict[str, Any]] = None):
        self.html = html
        self.data = dict(data or {})

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __repr__(self) -> str:
        keys = ", ".join(self.data) or "no data"
        return f"OfflineView({len(self.html)} characters of HTML; {keys})"

    def save(self, path: Union[str, Path]) -> Path:
        """Write a standalone HTML page that opens in a browser without a network."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'></head><body>\n{self.html}\n</body></html>\n",
            encoding="utf-8",
        )
        return path


def offline(rendered: Any, **data: Any) -> OfflineView:
    """Turn any CircuitsVis result (``RenderedHTML``) into an :class:`OfflineView`.

    CircuitsVis builds the bundle-embedding HTML (``local_src``) when a widget is created; only
    its display method goes online. This keeps that HTML and drops the rest.

    Example:
        >>> import circuitsvis as cv
        >>> view = offline(cv.tokens.colored_tokens(["a", "b"], [0.1, 0.9]))
        >>> "unpkg.com" in view._repr_html_()
        False
    """
    html = getattr(rendered, "local_src", None)
    if not isinstance(html, str):
        raise TypeError(f"expected a circuitsvis RenderedHTML (with .local_src), got {type(rendered).__name__}")
    return OfflineView(html, data)


def attention_heads(
    attention: Float[torch.Tensor, "head q k"],
    tokens: Sequence[str],
    head_names: Optional[Sequence[str]] = None,
    *,
    mask_upper_tri: bool = True,
) -> OfflineView:
    """Attention patterns of several heads as one offline CircuitsVis ``AttentionHeads`` widget.

    Args:
        attention: Patterns, one ``[q, k]`` matrix per head (rows are destinations).
        tokens: One label per position (``len(tokens) == q == k``).
        head_names: One name per head, e.g. ``["L17H3", "L18H1"]``; default ``H0, H1, ...``.
        mask_upper_tri: Grey out the future positions a causal model cannot attend to.

    Returns:
        An :class:`OfflineView`; its ``data`` holds ``attention``, ``tokens`` and ``head_names``.

    Raises:
        ValueError: The shapes, the token labels and the head names disagree.

    Example:
        >>> view = attention_heads(torch.eye(3)[None], ["a", "b", "c"], ["L0H0"])
        >>> view.data["head_names"]
        ['L0H0']
    """
    import circuitsvis as cv

    attention = torch.as_tensor(attention).detach().float().cpu()
    if attention.ndim == 2:
        attention = attention[None]
    if attention.ndim != 3 or attention.shape[1] != attention.shape[2]:
        raise ValueError(f"attention must have shape [head, q, k] with q == k, got {tuple(attention.shape)}")
    tokens = [str(t) for t in tokens]
    if len(tokens) != attention.shape[-1]:
        raise ValueError(
            f"{len(tokens)} token labels for patterns over {attention.shape[-1]} positions; pass one label per position"
        )
    names = list(head_names) if head_names is not None else [f"H{i}" for i in range(attention.shape[0])]
    if len(names) != attention.shape[0]:
        raise ValueError(f"{len(names)} head names for {attention.shape[0]} heads")
    rendered = cv.attention.attention_heads(
        attention=attention, tokens=tokens, attention_head_names=names, mask_upper_tri=mask_upper_tri
    )
    return offline(rendered, attention=attention, tokens=tokens, head_names=names)


def attention_patterns(
    model: Model,
    inputs: Union[str, Int[torch.Tensor, " pos"], Int[torch.Tensor, "1 pos"]],
    heads: Optional[Sequence[HeadSpec]] = None,
    *,
    layer: Optional[int] = None,
    labels: Optional[Sequence[str]] = None,
) -> OfflineView:
    """Run ``model`` on one prompt and show the chosen heads' attention patterns, offline.

    Args:
        model: A ``TransformerBridge`` (e.g. from :func:`mechlib.load_model`).
        inputs: A prompt (tokenized with the model's own BOS convention) or one token sequence.
        heads: Heads as ``(layer, head)`` or ``"L17H3"``; default: every head of ``layer``.
        layer: The layer to show when ``heads`` is not given (default 0).
        labels: Position labels; default the model's string tokens (token ids for models
            without a tokenizer).

    Returns:
        An :class:`OfflineView` with head names like ``"L17H3"`` and string-token labels.

    Raises:
        ValueError: A head or layer out of range, more than one sequence, or text for a model
            without a tokenizer.

    Example:
        >>> from mechlib.models import load_model
        >>> model = load_model("tiny-attn-2l")
        >>> view = attention_patterns(model, torch.arange(5), heads=[(1, 2)])
        >>> view.data["head_names"], tuple(view.data["attention"].shape)
        (['L1H2'], (1, 5, 5))
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if heads is None:
        layer = 0 if layer is None else layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
        chosen = [(layer, h) for h in range(n_heads)]
    else:
        chosen = [parse_head(h) for h in heads]
        if not chosen:
            raise ValueError("heads is empty; pass at least one head, e.g. heads=[(0, 0)]")
    for l, h in chosen:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise ValueError(
                f"head {head_label(l, h)} does not exist: the model has layers 0..{n_layers - 1} "
                f"and heads 0..{n_heads - 1}"
            )

    if isinstance(inputs, str):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("this model has no tokenizer: pass token ids (a 1-D tensor) instead of text")
        tokens = model.to_tokens(inputs)
    else:
        tokens = torch.as_tensor(inputs)
        if tokens.ndim == 1:
            tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"pass one sequence (shape [pos] or [1, pos]), got shape {tuple(tokens.shape)}")
    tokens = tokens.to(model_device(model))

    if labels is None:
        if getattr(model, "tokenizer", None) is not None:
            labels = [str(s) for s in model.to_str_tokens(tokens[0])]
        else:
            labels = [str(int(t)) for t in tokens[0]]
    names = {f"blocks.{l}.attn.hook_pattern" for l, _ in chosen}
    with torch.no_grad():
        cache = activations(model, tokens, lambda name: name in names)
    attention = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0, h] for l, h in chosen])
    return attention_heads(attention, labels, [head_label(l, h) for l, h in chosen])
