"""Head ablation: zero or mean-ablate any set of attention heads in any forward pass.

Ablation replaces a head's output before ``W_O``, at ``blocks.{l}.attn.hook_z``
(``[batch, pos, head, d_head]``), so the head writes nothing (``"zero"``; the output bias stays)
or its average output (``"mean"``) into the residual stream.

Two forms, same arguments:

* :func:`ablation_hooks` returns ``[(hook_name, fn), ...]`` for ``model.run_with_hooks`` or
  ``model.hooks``;
* :func:`ablate_heads` is a context manager: every forward pass inside it (``model(...)``,
  ``run_with_cache``, mechlib helpers) runs with the heads ablated.

Means for ``"mean"``: from a ``reference`` batch of tokens (per position, averaged over the batch,
when the ablated pass has the reference's length; otherwise averaged over batch and positions),
or given explicitly with ``means`` (one tensor broadcastable to ``[batch, pos, head, d_head]``
used at every layer, or ``{layer: tensor}``). :func:`head_means` computes them, also per group
(e.g. per IOI template), so circuit evaluations can mean-ablate every head outside a circuit.

Example:
    >>> import torch
    >>> from mechlib.models import load_model
    >>> model = load_model("tiny-attn-2l")
    >>> tokens = torch.randint(0, 256, (2, 12))
    >>> with ablate_heads(model, ["L1H0", (1, 2)]):
    ...     logits = model(tokens)
    >>> hooks = ablation_hooks(model, ["L0H1"], method="mean", reference=tokens)
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int

from mechlib.backends import get_backend
from mechlib.interventions import Intervention, Replace, Site, Zero
from mechlib.metrics import as_metric
from mechlib.readout import activations
from mechlib.results import head_label
from mechlib.types import Model
from mechlib.validate import choice, head_specs, layer_list, str_list, token_tensor, whole

__all__ = [
    "HeadSpec",
    "ablate_heads",
    "ablation_hooks",
    "ablation_interventions",
    "run_ablated",
    "head_means",
    "matched_random_heads",
    "normalize_heads",
    "path_ablation_hooks",
    "z_hook_name",
]

HeadSpec = Union[str, tuple[int, int]]
Hook = tuple[str, Callable]


def z_hook_name(layer: int) -> str:
    """``blocks.{layer}.attn.hook_z``: where heads are ablated."""
    return f"blocks.{layer}.attn.hook_z"


def normalize_heads(model: Model, heads: Union[HeadSpec, Iterable[HeadSpec]]) -> list[tuple[int, int]]:
    """Heads as sorted unique ``(layer, head)`` tuples, checked against the model.

    Args:
        model: The model (only ``cfg.n_layers`` and ``cfg.n_heads`` are read).
        heads: ``"L5H1"``, ``(5, 1)``, or an iterable of them.

    Raises:
        ValueError: An empty list, an unreadable label, or a layer / head index out of range.
    """
    return sorted(head_specs(model, heads, "heads"))


def _by_layer(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    d: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        d[layer].append(head)
    return dict(d)


def head_means(
    model: Model,
    reference: Int[torch.Tensor, "batch pos"],
    layers: Optional[Iterable[int]] = None,
    *,
    per_position: bool = True,
    groups: Optional[Sequence[Any]] = None,
    backend: Any = "auto",
) -> dict[int, Float[torch.Tensor, "..."]]:
    """Mean ``hook_z`` of every head over a reference batch, per layer (one forward pass).

    Args:
        model: A TransformerBridge.
        reference: ``[batch, pos]`` tokens.
        layers: Layers to keep (default all).
        per_position: Average over the batch only (``[1, pos, head, d_head]``), else over batch and
            positions (``[1, 1, head, d_head]``).
        groups: One label per reference row (e.g. the IOI template of each prompt). The mean is
            then taken within each group and every row gets its own group's mean:
            ``[batch, pos, head, d_head]`` (or ``[batch, 1, ...]``), aligned with ``reference``;
            pass it as ``means`` when ablating a batch with the same row order.
        backend: Where the reference batch runs (:func:`mechlib.backends.get_backend`).

    Returns:
        ``{layer: tensor}`` broadcastable to ``hook_z``.
    """
    reference = token_tensor(reference, model, "reference")
    layers = layer_list(model, layers)
    if not isinstance(per_position, bool):
        raise TypeError(f"per_position must be True or False, got {per_position!r}")
    names = {z_hook_name(l) for l in layers}
    cache = get_backend(model, backend).cache({"reference": reference}, names).acts["reference"]
    dims = (0,) if per_position else (0, 1)
    out = {}
    for l in layers:
        z = cache[z_hook_name(l)].detach()
        if groups is None:
            out[l] = z.mean(dims, keepdim=True)
            continue
        if isinstance(groups, str):
            raise TypeError("groups must be one label per reference row (a list), got a single string")
        labels = list(groups)
        if len(labels) != z.shape[0]:
            raise ValueError(f"groups has {len(labels)} labels but the reference batch has {z.shape[0]} rows")
        full = torch.empty_like(z if per_position else z[:, :1])
        for g in dict.fromkeys(labels):
            rows = torch.tensor([i for i, x in enumerate(labels) if x == g])
            full[rows] = z[rows].mean(dims, keepdim=True)
        out[l] = full
    return out


def ablation_hooks(
    model: Model,
    heads: Union[HeadSpec, Iterable[HeadSpec]],
    method: str = "zero",
    *,
    reference: Optional[Int[torch.Tensor, "batch pos"]] = None,
    means: Optional[Union[torch.Tensor, dict[int, torch.Tensor]]] = None,
    per_position: Optional[bool] = None,
) -> list[Hook]:
    """Forward hooks that ablate ``heads`` at ``blocks.{l}.attn.hook_z``.

    Args:
        model: A TransformerBridge.
        heads: ``"L5H1"`` / ``(5, 1)`` or a list of them.
        method: ``"zero"`` or ``"mean"``.
        reference: For ``"mean"``: tokens whose average head output replaces the ablated heads'.
        means: For ``"mean"``: the replacement instead of ``reference``: one tensor broadcastable
            to ``[batch, pos, head, d_head]`` (used at every ablated layer) or ``{layer: tensor}``
            (e.g. from :func:`head_means`).
        per_position: With ``reference``: ``True`` uses per-position means (the ablated pass must
            have the reference's length), ``False`` means over batch and positions, ``None``
            (default) per position when the lengths match, else over batch and positions.

    Returns:
        ``[(hook_name, fn), ...]``, one per ablated layer.

    Raises:
        ValueError: Empty head list, index out of range, unknown method, ``"mean"`` without
            exactly one of ``reference`` / ``means``, or means of the wrong shape.

    Example:
        >>> from mechlib.models import load_model
        >>> m = load_model("tiny-attn-2l")
        >>> [name for name, _ in ablation_hooks(m, ["L0H1", "L1H3"])]
        ['blocks.0.attn.hook_z', 'blocks.1.attn.hook_z']
    """
    heads = normalize_heads(model, heads)
    choice(method, "method", ("zero", "mean"))
    if per_position is not None and not isinstance(per_position, bool):
        raise TypeError(f"per_position must be True, False or None, got {per_position!r}")
    layer_heads = _by_layer(heads)
    if method == "zero":
        if reference is not None or means is not None:
            raise ValueError("reference/means only apply to method='mean'")
        return [(z_hook_name(l), _replace_hook(hs, None, None)) for l, hs in layer_heads.items()]
    if (reference is None) == (means is None):
        raise ValueError("method='mean' needs exactly one of reference= (tokens) or means= (tensor or {layer: tensor})")
    hooks = []
    if reference is not None:
        reference = token_tensor(reference, model, "reference")
        if per_position is not False:
            pos_means = head_means(model, reference, layer_heads, per_position=True)
            pooled = {l: m.mean(1, keepdim=True) for l, m in pos_means.items()}
        else:
            pos_means = None
            pooled = head_means(model, reference, layer_heads, per_position=False)
        for l, hs in layer_heads.items():
            if per_position is True:
                hooks.append((z_hook_name(l), _replace_hook(hs, pos_means[l], None, strict=True)))
            elif per_position is None:
                hooks.append((z_hook_name(l), _replace_hook(hs, pos_means[l], pooled[l])))
            else:
                hooks.append((z_hook_name(l), _replace_hook(hs, pooled[l], None)))
        return hooks
    for l, hs in layer_heads.items():
        if isinstance(means, dict):
            if l not in means:
                raise ValueError(f"means has no entry for layer {l}; it holds layers {sorted(means)}")
            m = torch.as_tensor(means[l])
        else:
            m = torch.as_tensor(means)
        if m.ndim != 4 and m.ndim > 0:
            raise ValueError(
                f"means for layer {l} must broadcast to [batch, pos, head, d_head]; got shape {tuple(m.shape)}"
            )
        hooks.append((z_hook_name(l), _replace_hook(hs, m, None)))
    return hooks


def _replace_hook(
    heads: list[int], value: Optional[torch.Tensor], fallback: Optional[torch.Tensor], strict: bool = False
):
    idx = torch.tensor(heads)

    def hook(z: torch.Tensor, hook: Any = None) -> torch.Tensor:
        z = z.clone()
        if value is None:
            z[:, :, idx] = 0.0
            return z
        v = value
        if v.ndim == 4 and v.shape[1] not in (1, z.shape[1]):
            if strict or fallback is None:
                raise ValueError(
                    f"per-position means cover {v.shape[1]} positions but this forward pass has {z.shape[1]}; "
                    "use a reference batch of the same length or per_position=False"
                )
            v = fallback
        if v.ndim == 4 and v.shape[2] == z.shape[2]:
            v = v[:, :, idx]
        elif v.ndim == 4 and v.shape[2] != len(heads) and v.shape[2] != 1:
            raise ValueError(f"means have {v.shape[2]} heads; expected {z.shape[2]} (all heads), {len(heads)} or 1")
        z[:, :, idx] = torch.broadcast_to(v.to(z.dtype).to(z.device), z[:, :, idx].shape)
        return z

    return hook


def ablation_interventions(
    model: Model,
    heads: Union[HeadSpec, Iterable[HeadSpec]],
    method: str = "zero",
    *,
    reference: Optional[Int[torch.Tensor, "batch pos"]] = None,
    means: Optional[Union[torch.Tensor, dict[int, torch.Tensor]]] = None,
    backend: Any = "auto",
) -> list:
    """Head ablation as :mod:`mechlib.interventions`: one ``Zero`` or ``Replace`` per head at ``hook_z``.

    The same ablation as :func:`ablation_hooks`, as data any backend runs (:func:`run_ablated`,
    :func:`mechlib.circuits.evaluate_circuit`). ``"mean"`` takes ``reference`` tokens (per-position
    means over the batch, computed on ``backend``) or ``means`` (one tensor broadcastable to
    ``[batch, pos, head, d_head]``, or ``{layer: tensor}`` from :func:`head_means`).

    Example:
        >>> from mechlib.models import load_model
        >>> m = load_model("tiny-attn-2l")
        >>> [str(iv) for iv in ablation_interventions(m, ["L0H1", "L1H3"])]
        ['Zero(L0.z[H1])', 'Zero(L1.z[H3])']
    """
    heads = normalize_heads(model, heads)
    choice(method, "method", ("zero", "mean"))
    layer_heads = _by_layer(heads)
    if method == "zero":
        if reference is not None or means is not None:
            raise ValueError("reference/means only apply to method='mean'")
        return [Intervention(Site("z", l, head=h), Zero()) for l, h in heads]
    if (reference is None) == (means is None):
        raise ValueError("method='mean' needs exactly one of reference= (tokens) or means= (tensor or {layer: tensor})")
    if reference is not None:
        means = head_means(model, reference, list(layer_heads), backend=backend)
    n_heads = int(model.cfg.n_heads)
    out = []
    for l, hs in layer_heads.items():
        if isinstance(means, dict):
            if l not in means:
                raise ValueError(f"means has no entry for layer {l}; it holds layers {sorted(means)}")
            m = torch.as_tensor(means[l])
        else:
            m = torch.as_tensor(means)
        while m.ndim < 4:
            m = m[None]
        if m.ndim != 4 or m.shape[2] not in (1, n_heads, len(hs)):
            raise ValueError(
                f"means for layer {l} must broadcast to [batch, pos, head, d_head] with {n_heads} heads, "
                f"1, or one per ablated head ({len(hs)}); got shape {tuple(m.shape)}"
            )
        for j, h in enumerate(hs):
            v = m[:, :, [j]] if (m.shape[2] == len(hs) and m.shape[2] != n_heads) else m
            out.append(Intervention(Site("z", l, head=h), Replace(v.float())))
    return out


def run_ablated(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    heads: Union[HeadSpec, Iterable[HeadSpec]],
    method: str = "zero",
    *,
    metric: Any = None,
    reference: Optional[Int[torch.Tensor, "batch pos"]] = None,
    means: Optional[Union[torch.Tensor, dict[int, torch.Tensor]]] = None,
    backend: Any = "auto",
) -> torch.Tensor:
    """One forward pass of ``tokens`` with ``heads`` ablated, on any backend.

    Returns:
        Logits ``[batch, pos, vocab]``, or with ``metric`` its value per prompt ``[batch]``
        (or a scalar, if the metric returns one).

    Example:
        >>> from mechlib.models import load_model
        >>> m = load_model("tiny-attn-2l")
        >>> run_ablated(m, torch.randint(0, 256, (2, 6)), ["L1H0"], backend="bridge").shape
        torch.Size([2, 6, 256])
    """
    tokens = token_tensor(tokens, model)
    be = get_backend(model, backend)
    ivs = ablation_interventions(model, heads, method, reference=reference, means=means, backend=be)
    runs = be.cache({"tokens": tokens}, [])
    if metric is None:
        return be.run(runs, [ivs], base="tokens", score=lambda lg: lg, last_only=False).values[0]
    m = as_metric(metric)
    return be.run(runs, [ivs], base="tokens", score=m.evaluate, last_only=m.last_only).values[0]


@contextlib.contextmanager
def ablate_heads(
    model: Model,
    heads: Union[HeadSpec, Iterable[HeadSpec]],
    method: str = "zero",
    **kw: Any,
) -> Iterator[list[tuple[int, int]]]:
    """Context manager: every forward pass inside runs with ``heads`` ablated.

    Same arguments as :func:`ablation_hooks`. Yields the normalised ``(layer, head)`` list.

    Example:
        >>> from mechlib.models import load_model
        >>> m = load_model("tiny-attn-2l")
        >>> with ablate_heads(m, "L1H0") as heads:
        ...     heads
        [(1, 0)]
    """
    hooks = ablation_hooks(model, heads, method, **kw)
    with model.hooks(fwd_hooks=hooks):
        yield normalize_heads(model, heads)


def path_ablation_hooks(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    heads: Union[HeadSpec, Iterable[HeadSpec]],
    into: Union[str, Sequence[str]],
    method: str = "zero",
    **kw: Any,
) -> list[Hook]:
    """Ablate ``heads`` only as seen by some downstream activations (e.g. one layer's keys).

    Runs ``tokens`` once with the heads ablated, caches the activations named in ``into``
    (e.g. ``"blocks.1.attn.hook_k"``), and returns hooks that patch those ablated values into an
    otherwise clean forward pass on the same ``tokens``. Ablating a previous-token head only in the
    next layer's keys (and not its queries) tests K-composition.

    Args:
        model: A TransformerBridge.
        tokens: The batch the hooks will be used on (the patched values are specific to it).
        heads: Heads to ablate, as in :func:`ablation_hooks`.
        into: Hook name(s) whose ablated value replaces the clean one.
        method, **kw: As in :func:`ablation_hooks`.

    Returns:
        ``[(name, fn), ...]`` for ``model.hooks`` / ``run_with_hooks`` on ``tokens``.

    Example:
        >>> from mechlib.models import load_model
        >>> m = load_model("tiny-attn-2l")
        >>> t = torch.randint(0, 256, (1, 8))
        >>> hooks = path_ablation_hooks(m, t, ["L0H1"], into="blocks.1.attn.hook_k")
        >>> logits = m.run_with_hooks(t, fwd_hooks=hooks)
    """
    tokens = token_tensor(tokens, model)
    names = [into] if isinstance(into, str) else str_list(into, "into", min_len=0)
    if not names:
        raise ValueError("into is empty; name the activations to patch, e.g. 'blocks.1.attn.hook_k'")
    wanted = set(names)
    with torch.no_grad(), model.hooks(fwd_hooks=ablation_hooks(model, heads, method, **kw)):
        cache = activations(model, tokens, lambda n: n in wanted)
    missing = [n for n in names if n not in cache]
    if missing:
        raise ValueError(f"no activation named {missing}; check the hook names with list(cache.keys())")
    shape = tuple(torch.as_tensor(tokens).shape)

    def patch(value: torch.Tensor):
        def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
            if tuple(act.shape[:2]) != shape:
                raise ValueError(
                    f"path_ablation_hooks were built for tokens of shape {shape}; got {tuple(act.shape[:2])}"
                )
            return value.to(act.dtype)

        return hook

    return [(n, patch(cache[n])) for n in names]


def matched_random_heads(
    model: Model,
    heads: Union[HeadSpec, Iterable[HeadSpec]],
    *,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """A control set: for each head, a random other head of the same layer (none of ``heads``).

    Raises:
        ValueError: A layer holds so many of ``heads`` that there are not enough others to draw.

    Example:
        >>> from mechlib.models import load_model
        >>> matched_random_heads(load_model("tiny-attn-2l"), ["L1H0", "L1H1"], seed=0)[0][0]
        1
    """
    chosen = normalize_heads(model, heads)
    gen = torch.Generator().manual_seed(whole(seed, "seed"))
    out = []
    for layer, hs in _by_layer(chosen).items():
        others = [h for h in range(int(model.cfg.n_heads)) if h not in hs]
        if len(others) < len(hs):
            raise ValueError(
                f"layer {layer}: {len(hs)} heads chosen but only {len(others)} others to draw a control from"
            )
        pick = torch.randperm(len(others), generator=gen)[: len(hs)].tolist()
        out += [(layer, others[i]) for i in pick]
    return sorted(out)


def labels(heads: Iterable[tuple[int, int]]) -> list[str]:
    """``[(5, 1)] -> ['L5H1']``."""
    return [head_label(l, h) for l, h in heads]
