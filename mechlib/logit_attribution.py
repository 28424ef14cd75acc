"""Direct logit attribution (DLA) and the logit lens.

The residual stream at the last layer is a sum of what each component wrote: the embeddings,
every attention layer (itself a sum of heads plus the output bias) and every MLP layer (a sum of
neurons plus the output bias). The logits are the final norm of that sum times the unembedding,
so projecting each component onto an *answer direction* (the unembedding column of the answer,
or the difference of two columns, e.g. IO minus S) says how much it pushed the answer directly.

**The frozen-norm approximation.** The final LayerNorm/RMSNorm is not linear: it divides by the
residual's norm. Like TransformerLens (``ActivationCache.apply_ln_to_stack`` with the cached
``ln_final.hook_scale``), mechlib *freezes the final norm's scale at its value in the real
forward pass* (and, for LayerNorm, subtracts each component's mean) and applies that same linear
map to every component. Under this approximation the components sum exactly to the model's
logit (difference) minus the unembedding bias ``b_U`` term (zero for a difference of two tokens
when ``b_U`` is zero, as it is for SmolLM2 and for the folded random models); the remainder is
reported as :attr:`LogitAttribution.unembed_bias`. It does not say what would happen if a
component were removed (that would change the scale); use activation patching for that.

The **logit lens** instead applies the real final norm (statistics recomputed) to the
accumulated residual after each layer and unembeds it, giving the answer's logit, rank and
probability layer by layer.

Example:
    >>> from mechlib.ioi import make_ioi_dataset
    >>> from mechlib.logit_attribution import ioi_logit_attribution, logit_lens
    >>> ds = make_ioi_dataset(model, 50)                                     # doctest: +SKIP
    >>> dla = ioi_logit_attribution(model, ds)                               # doctest: +SKIP
    >>> dla.heads.top_labels(5), dla.heads.top_labels(5, largest=False)      # doctest: +SKIP
    >>> dla.components.plot()                                                # doctest: +SKIP
    >>> lens = logit_lens(model, ds.tokens, ds.io_ids, pos=ds.pos("END"))    # doctest: +SKIP
    >>> lens.plot()                                                          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from transformer_lens.tools.analysis import logit_readout

from mechlib.answers import AnswerLike, to_answer_ids  # to_answer_ids is re-exported from here
from mechlib.models import model_device
from mechlib.readout import activations
from mechlib.results import Grid, PromptGrid
from mechlib.types import Model
from mechlib.validate import folded_model, prompt_positions, str_list, token_tensor, whole

__all__ = [
    "AnswerLike",
    "to_answer_ids",
    "answer_directions",
    "LogitAttribution",
    "direct_logit_attribution",
    "ioi_logit_attribution",
    "LogitLens",
    "logit_lens",
]

PosLike = Union[int, Sequence[int], torch.Tensor, None]


# ---- answers and directions -----------------------------------------------------------------


def answer_directions(
    model: Model, answers: AnswerLike, wrong: Optional[AnswerLike] = None, *, n: Optional[int] = None
) -> Float[torch.Tensor, "batch d_model"]:
    """Unembedding directions ``W_U[:, answer]`` (minus ``W_U[:, wrong]`` if given), one per prompt.

    In compatibility mode (how :func:`mechlib.load_model` loads models) ``W_U`` is centred and
    the final norm's weight is folded into it, so ``normalised_residual @ direction`` is the logit
    (difference) without the ``b_U`` term.

    Example:
        >>> d = answer_directions(model, [" Mary", " John"], [" John", " Mary"])   # doctest: +SKIP
        >>> d.shape                                                                # doctest: +SKIP
        torch.Size([2, 576])
    """
    ids = to_answer_ids(model, answers, n)
    W_U = model.W_U.detach()
    dirs = W_U[:, ids.to(W_U.device)].T
    if wrong is not None:
        wids = to_answer_ids(model, wrong, ids.numel())
        dirs = dirs - W_U[:, wids.to(W_U.device)].T
    return dirs


def _b_U(model: Model) -> torch.Tensor:
    try:
        b = model.b_U
    except AttributeError:
        b = None
    return b.detach() if b is not None else torch.zeros(int(model.cfg.d_vocab))


def _bias(model: Model, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        b = getattr(model, name)
    except AttributeError:  # bias-free checkpoints expose none
        b = None
    return b.detach() if b is not None else torch.zeros(shape)


def _positions(pos: PosLike, batch: int, seq: int) -> torch.Tensor:
    return prompt_positions(-1 if pos is None else pos, batch, seq, "pos")


def _check_tokens(model: Model, tokens: Any) -> torch.Tensor:
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("this model has no tokenizer: pass a token tensor [batch, pos]")
        prompts = [tokens] if isinstance(tokens, str) else str_list(tokens, "tokens")
        lengths = {int(model.to_tokens(p).shape[1]) for p in prompts}
        if len(lengths) > 1:
            raise ValueError(
                f"the prompts tokenize to different lengths {sorted(lengths)}, so one batch would be padded and "
                "position -1 would read padding; group prompts by length (make_ioi_dataset does) or pass tokens"
            )
        tokens = model.to_tokens(prompts)
    if not isinstance(tokens, torch.Tensor):
        try:
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"tokens must be a [batch, pos] tensor of token ids or prompt strings: {exc}") from None
    if tokens.ndim == 1:
        tokens = tokens[None]
    return token_tensor(tokens, model)


def _names_filter(name: str) -> bool:
    return name in ("hook_embed", "hook_pos_embed", "ln_final.hook_scale") or name.endswith(
        (
            "hook_attn_out",
            "hook_mlp_out",
            "attn.hook_z",
            "mlp.hook_post",
            "hook_resid_pre",
            "hook_resid_post",
            "ln1_post.hook_scale",
            "ln2_post.hook_scale",
        )
    )


def _post_norm_weights(model: Model, name: str) -> Optional[torch.Tensor]:
    """``[layer, d_model]``: the elementwise weight of the norm a sublayer's output passes through
    before it joins the residual stream (Gemma 2/3's post-attention ``ln1_post`` and post-MLP
    ``ln2_post``), or ``None`` for a model without one. With its scale frozen at its forward-pass
    value (``<name>.hook_scale``) such a norm is linear, ``out = in * w / scale``, so each head's
    (each neuron's) share of the sublayer output is its own output times ``w / scale``.

    The weight is read by running the norm on a vector of ones, so whatever parametrization the
    model uses (Gemma's ``1 + weight``) is honoured."""
    import math

    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, name) for b in blocks):
        return None
    out = []
    for block in blocks:
        norm = getattr(block, name)
        norm = getattr(norm, "original_component", norm)
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)) or 0.0)
        weight = next(norm.parameters(), None)
        one = torch.ones(1, 1, int(model.cfg.d_model), device=weight.device if weight is not None else "cpu")
        with torch.no_grad():
            out.append(norm(one.to(weight.dtype) if weight is not None else one).flatten().float() * math.sqrt(1 + eps))
    return torch.stack(out)


def _component_label(raw: str) -> str:
    if raw in ("embed", "pos_embed"):
        return raw
    layer, kind = raw.split("_", 1)
    return f"L{layer} {'attn' if kind.startswith('attn') else 'mlp'}"


def _neuron_label(layer: int, neuron: int) -> str:
    return f"L{layer}N{neuron}"


def _fmt_top(grid: Grid, k: int, **kw: Any) -> str:
    """``"L23H3 +2.052, L29H1 +1.121"``: the top entries of a grid with their labels."""
    if grid.values.numel() == 0:
        return "(none)"
    parts = []
    for coords, v in grid.top(k, **kw):
        if len(grid.dims) == 1:
            name = grid.labels[grid.dims[0]][coords[grid.dims[0]]]
        else:
            name = grid.label(**coords)
        parts.append(f"{name} {v:+.3f}")
    return ", ".join(parts)


# ---- direct logit attribution ---------------------------------------------------------------


@dataclass
class LogitAttribution:
    """Direct logit attribution of one answer direction, averaged over prompts.

    Attributes:
        components: PromptGrid ``("component",)``: ``"embed"`` (and ``"pos_embed"``), ``"L3 attn"``,
            ``"L3 mlp"`` ... (each layer's output including its output bias).
        heads: PromptGrid ``("layer", "head")`` (head results, without the attention output bias).
            Both keep ``per_prompt`` and give ``stderr()``, ``ci()`` and ``estimate(layer=, head=)``
            over prompts (:class:`~mechlib.results.PromptGrid`).
        neurons: Grid ``("neuron",)`` of the ``top_k`` MLP neurons by mean |attribution|, labelled
            ``"L12N345"``; ``neurons.meta["coords"]`` holds their ``(layer, neuron)`` pairs.
        per_prompt_components: ``[component, batch]``.
        per_prompt_heads: ``[layer, head, batch]``.
        actual: The model's real logit (difference) at the chosen position ``[batch]``.
        unembed_bias: The ``b_U`` term of that logit (difference) ``[batch]``: what the
            components cannot account for. ``components sum + unembed_bias == actual`` up to
            float error.
        attn_bias: Per layer, the output-bias part of each attention layer ``[layer]`` (mean over
            prompts): ``heads.sum("head") + attn_bias == components' attn entries``.
        mlp_bias: Likewise the MLP output bias ``b_out`` part per layer ``[layer]`` (zeros for
            attention-only models): the sum of all of a layer's neurons
            (``neurons.meta["all"][layer]``) plus it equals the layer's MLP component.
        metric: ``"logit diff"`` or ``"logit"``.
    """

    components: Grid
    heads: Grid
    neurons: Grid
    per_prompt_components: torch.Tensor
    per_prompt_heads: torch.Tensor
    actual: torch.Tensor
    unembed_bias: torch.Tensor
    attn_bias: torch.Tensor
    mlp_bias: torch.Tensor
    metric: str = "logit diff"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        """Sum of all components per prompt ``[batch]``."""
        return self.per_prompt_components.sum(0)

    @property
    def remainder(self) -> torch.Tensor:
        """``actual - total - unembed_bias`` per prompt: float error only."""
        return self.actual - self.total - self.unembed_bias

    def summary(self, k: int = 5) -> str:
        """Actual vs summed attribution, and the top positive/negative components and heads."""
        return "\n".join(
            [
                f"{self.metric}: actual {self.actual.mean():.4f}, components sum {self.total.mean():.4f}, "
                f"b_U term {self.unembed_bias.mean():.4f}, max |remainder| {self.remainder.abs().max():.2e} "
                f"({len(self.actual)} prompts; final norm scale frozen)",
                f"top components: {_fmt_top(self.components, k)}",
                f"bottom components: {_fmt_top(self.components, k, largest=False)}",
                f"top heads: {_fmt_top(self.heads, k)}",
                f"bottom heads: {_fmt_top(self.heads, k, largest=False)}",
                f"top neurons (by |attribution|): {_fmt_top(self.neurons, k, absolute=True)}",
            ]
        )

    def plot(self):
        """Components as bars and heads as a heatmap, side by side. Returns the figure."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [2, 1]})
        self.components.plot(ax=axes[0])
        self.heads.plot(ax=axes[1])
        fig.tight_layout()
        return fig


@torch.no_grad()
def direct_logit_attribution(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"] | str | Sequence[str],
    answers: AnswerLike,
    wrong: Optional[AnswerLike] = None,
    *,
    pos: PosLike = None,
    top_k_neurons: int = 20,
    batch_size: int = 32,
    progress: bool = True,
) -> LogitAttribution:
    """Attribute the answer logit (difference) at one position per prompt to every component.

    Uses TransformerLens's ``ActivationCache.decompose_resid`` (embeddings, attention and MLP
    layers), ``stack_head_results`` (heads) and ``apply_ln_to_stack`` (frozen final-norm scale:
    see the module docstring, *the frozen-norm approximation*), and projects neuron outputs
    ``hook_post * W_out`` the same way (stacking all neurons would not fit in memory).

    Args:
        model: A TransformerBridge (compatibility mode, as :func:`mechlib.load_model` returns).
        tokens: ``[batch, pos]`` tokens, or prompt strings (tokenized with ``model.to_tokens``).
        answers: The answer token per prompt (string, id or sequence; see :func:`to_answer_ids`).
        wrong: Optional second token per prompt; the direction is then ``answer - wrong``.
        pos: The position read per prompt: an int for all (default ``-1``, the last token) or
            one per prompt (e.g. ``dataset.pos("END")``).
        top_k_neurons: How many neurons to keep in :attr:`LogitAttribution.neurons`.
        batch_size: Prompts per forward pass.
        progress: Show a progress bar.

    Returns:
        A :class:`LogitAttribution`.

    Raises:
        ValueError: A model not in compatibility mode (its final norm is not folded into ``W_U``,
            so the attributions would be wrong); mismatched numbers of prompts, answers and
            positions; a multi-token answer.

    Example:
        >>> dla = direct_logit_attribution(model, ["When Mary and John went to the store, John gave a drink to"],
        ...                                " Mary", " John")                                   # doctest: +SKIP
        >>> dla.heads.top_labels(3)                                                            # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    folded_model(model, "direct logit attribution")
    tokens = _check_tokens(model, tokens)
    batch, seq = tokens.shape
    positions = _positions(pos, batch, seq)
    top_k_neurons = whole(top_k_neurons, "top_k_neurons", minimum=0)
    batch_size = whole(batch_size, "batch_size", minimum=1)
    ans = to_answer_ids(model, answers, batch)
    wr = to_answer_ids(model, wrong, batch) if wrong is not None else None
    dirs = answer_directions(model, ans, wr).float()  # [batch, d_model]
    cfg = model.cfg
    L, H = int(cfg.n_layers), int(cfg.n_heads)
    centre = str(getattr(cfg, "normalization_type", "")) in ("LN", "LNPre")
    b_U = _bias(model, "b_U", (int(cfg.d_vocab),)).float().cpu()
    b_O = _bias(model, "b_O", (L, int(cfg.d_model))).float()
    attn_only = bool(getattr(cfg, "attn_only", False))
    W_out = None if attn_only else model.W_out.detach().float()  # [L, d_mlp, d_model]
    dev = model_device(model)

    b_out = None if attn_only else _bias(model, "b_out", (L, int(cfg.d_model))).float()
    # Gemma's post-sublayer norms sit between a head (neuron) and the residual stream: frozen, they
    # scale each output dimension by w / scale (see _post_norm_weights).
    post_attn, post_mlp = _post_norm_weights(model, "ln1_post"), _post_norm_weights(model, "ln2_post")
    comp_rows, head_rows, neuron_sum, neuron_abs, actual, attn_bias, mlp_bias = [], [], None, None, [], [], []
    labels: list[str] = []
    starts = list(range(0, batch, batch_size))
    for start in tqdm(starts, desc="DLA", disable=not progress or len(starts) == 1):
        sl = slice(start, start + batch_size)
        tk, p, d = tokens[sl].to(dev), positions[sl], dirs[sl].to(dev)
        m = tk.shape[0]
        logits, cache = model.run_with_cache(tk, names_filter=_names_filter)
        idx = torch.arange(m)
        end_logits = logits[idx, p.to(dev)].float().cpu()
        a = end_logits[idx, ans[sl]] - (end_logits[idx, wr[sl]] if wr is not None else 0.0)
        actual.append(a)
        comps = torch.zeros(0)
        heads = torch.zeros(L * H, m)
        for q in p.unique().tolist():  # a cache slice per distinct position (usually one)
            sel = (p == q).nonzero().flatten()
            st, raw = cache.decompose_resid(layer=-1, pos_slice=q, return_labels=True)
            st = cache.apply_ln_to_stack(st, layer=None, pos_slice=q)[:, sel.to(st.device)].float()
            c = (st * d[sel.to(dev)]).sum(-1).cpu()  # [component, sel]
            if comps.numel() == 0:
                comps = torch.zeros(len(raw), m)
                labels = [_component_label(r) for r in raw]
            comps[:, sel] = c
            hs = cache.stack_head_results(layer=-1, pos_slice=q)
            if post_attn is not None:  # [L*H, batch, d_model] times w / scale of each head's layer
                factor = torch.stack(
                    [post_attn[l_].to(hs.device) / cache[f"blocks.{l_}.ln1_post.hook_scale"][:, q] for l_ in range(L)]
                )  # [L, batch, d_model]
                hs = hs * factor.repeat_interleave(H, dim=0).to(hs.dtype)
            hs = cache.apply_ln_to_stack(hs, layer=None, pos_slice=q)[:, sel.to(hs.device)].float()
            heads[:, sel] = (hs * d[sel.to(dev)]).sum(-1).cpu()
        comp_rows.append(comps)
        head_rows.append(heads)

        # The direction each prompt's residual is read along, after the frozen final norm.
        scale = cache["ln_final.hook_scale"][idx.to(dev), p.to(dev)].float()  # [m, 1]
        eff = d - d.mean(-1, keepdim=True) if centre else d
        eff = eff / scale  # [m, d_model]

        def _through(post_norm, name, layer, eff=eff, cache=cache, idx=idx, p=p):
            """``eff`` as seen from inside a post-sublayer norm (unchanged where there is none): [m, d_model]."""
            if post_norm is None:
                return eff
            s = cache[f"blocks.{layer}.{name}.hook_scale"][idx.to(dev), p.to(dev)].float()  # [m, 1]
            return eff * post_norm[layer].to(dev) / s

        attn_bias.append(
            torch.stack([(b_O[l_].to(dev) * _through(post_attn, "ln1_post", l_)).sum(-1) for l_ in range(L)]).cpu()
        )
        mlp_bias.append(
            torch.stack([(b_out[l_].to(dev) * _through(post_mlp, "ln2_post", l_)).sum(-1) for l_ in range(L)]).cpu()
            if b_out is not None
            else torch.zeros(L, m)
        )
        if W_out is not None:
            per = []
            for layer in range(L):
                post = cache[f"blocks.{layer}.mlp.hook_post"][idx.to(dev), p.to(dev)].float()  # [m, d_mlp]
                per.append((post * (_through(post_mlp, "ln2_post", layer) @ W_out[layer].T)).cpu())  # [m, d_mlp]
            na = torch.stack(per)  # [L, m, d_mlp]
            neuron_sum = na.sum(1) if neuron_sum is None else neuron_sum + na.sum(1)
            neuron_abs = na.abs().sum(1) if neuron_abs is None else neuron_abs + na.abs().sum(1)
        del cache, logits

    comps = torch.cat(comp_rows, dim=1)
    heads = torch.cat(head_rows, dim=1).reshape(L, H, batch)
    actual_t = torch.cat(actual)
    bias = b_U[ans] - (b_U[wr] if wr is not None else 0.0)
    metric = "logit diff" if wr is not None else "logit"
    meta = {"n_prompts": batch, "approximation": "final norm scale frozen at its forward-pass value"}
    components = PromptGrid(
        comps.mean(1),
        ("component",),
        {"component": labels},
        title=f"DLA per component ({metric})",
        metric=metric,
        meta=meta,
        per_prompt=comps.T,
    )
    head_grid = PromptGrid(
        heads.mean(-1),
        ("layer", "head"),
        title=f"DLA per head ({metric})",
        metric=metric,
        meta=meta,
        per_prompt=heads.permute(2, 0, 1),
    )
    if neuron_sum is not None:
        mean = neuron_sum / batch
        k = min(int(top_k_neurons), mean.numel())
        top = torch.topk((neuron_abs / batch).flatten(), k).indices
        coords = [divmod(int(i), mean.shape[1]) for i in top]
        neurons = Grid(
            torch.stack([mean[l_, n_] for l_, n_ in coords]) if coords else torch.zeros(0),
            ("neuron",),
            {"neuron": [_neuron_label(l_, n_) for l_, n_ in coords]},
            title=f"DLA of the top {k} neurons ({metric})",
            metric=metric,
            meta={**meta, "coords": coords, "all": mean},
        )
    else:
        neurons = Grid(torch.zeros(0), ("neuron",), title="no MLP neurons (attention-only model)", metric=metric)
    return LogitAttribution(
        components=components,
        heads=head_grid,
        neurons=neurons,
        per_prompt_components=comps,
        per_prompt_heads=heads,
        actual=actual_t,
        unembed_bias=bias,
        attn_bias=torch.cat(attn_bias, dim=1).mean(1),
        mlp_bias=torch.cat(mlp_bias, dim=1).mean(1),
        metric=metric,
        meta=meta,
    )


def ioi_logit_attribution(model: Model, dataset: Any, **kwargs: Any) -> LogitAttribution:
    """:func:`direct_logit_attribution` of IO minus S at END on an :class:`mechlib.ioi.IOIDataset`."""
    return direct_logit_attribution(
        model, dataset.tokens, dataset.io_ids, dataset.s_ids, pos=dataset.pos("END"), **kwargs
    )


# ---- logit lens -----------------------------------------------------------------------------


@dataclass
class LogitLens:
    """The answer read from the residual stream after each layer (real final norm, unembed).

    Layer labels: ``"embed"`` (before block 0), then ``"L0"`` ... ``"L{n-1}"`` (after each block;
    the last equals the model's output).

    Attributes:
        logit: Grid ``("layer",)``: mean logit of the answer.
        rank: Grid ``("layer",)``: mean rank of the answer (0 = top prediction).
        prob: Grid ``("layer",)``: mean probability of the answer.
        logit_diff: Grid ``("layer",)`` of answer minus wrong logit, if ``wrong`` was given.
        per_prompt: ``{"logit", "rank", "prob"(, "logit_diff")}`` -> ``[layer, batch]``.
    """

    logit: Grid
    rank: Grid
    prob: Grid
    logit_diff: Optional[Grid]
    per_prompt: dict[str, torch.Tensor]

    def first_layer(self, *, max_rank: float = 0.5) -> Optional[str]:
        """The first layer label at which the mean rank is at most ``max_rank`` (None if never)."""
        for lab, r in zip(self.rank.labels["layer"], self.rank.values.tolist()):
            if r <= max_rank:
                return lab
        return None

    def summary(self) -> str:
        labs = self.logit.labels["layer"]
        best = int(self.prob.values.argmax())
        return (
            f"logit lens over {len(labs)} readings: final p={self.prob.values[-1]:.3f}, rank {self.rank.values[-1]:.2f}; "
            f"max p={self.prob.values[best]:.3f} at {labs[best]}; mean rank first <= 0.5 at {self.first_layer()}"
        )

    def plot(self):
        """Logit (and logit diff), probability and rank by layer. Returns the figure."""
        import matplotlib.pyplot as plt

        grids = [g for g in (self.logit, self.logit_diff, self.prob, self.rank) if g is not None]
        fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.2))
        for ax, g in zip(axes, grids):
            x = range(len(g.values))
            ax.plot(x, g.values.numpy(), marker=".")
            ax.set_title(g.title, fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel(g.metric)
            labs = g.labels["layer"]
            step = max(1, len(labs) // 8)
            ax.set_xticks(list(x)[::step], labs[::step], fontsize=7)
        if self.rank is not None:
            axes[-1].set_yscale("symlog")
        fig.tight_layout()
        return fig


@torch.no_grad()
def logit_lens(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"] | str | Sequence[str],
    answers: AnswerLike,
    wrong: Optional[AnswerLike] = None,
    *,
    pos: PosLike = None,
    batch_size: int = 32,
    progress: bool = True,
) -> LogitLens:
    """Read the answer's logit, rank and probability from the residual after every layer.

    Each accumulated residual (``ActivationCache.accumulated_resid``) is read by TransformerLens's
    ``logit_readout``: the model's real final norm with statistics recomputed from that residual,
    then ``W_U``, ``b_U`` and the architecture's output transform. Unlike DLA nothing is frozen
    here, so the last reading equals the model's output exactly.

    Args:
        model, tokens, answers, wrong, pos, batch_size, progress: As for
            :func:`direct_logit_attribution`.

    Returns:
        A :class:`LogitLens`.

    Example:
        >>> lens = logit_lens(model, "The Eiffel Tower is located in the city of", " Paris")  # doctest: +SKIP
        >>> lens.prob.values[-1]                                                               # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    tokens = _check_tokens(model, tokens)
    batch, seq = tokens.shape
    positions = _positions(pos, batch, seq)
    batch_size = whole(batch_size, "batch_size", minimum=1)
    ans = to_answer_ids(model, answers, batch)
    wr = to_answer_ids(model, wrong, batch) if wrong is not None else None
    dev = model_device(model)
    out: dict[str, list[torch.Tensor]] = {"logit": [], "rank": [], "prob": [], "logit_diff": []}
    layer_labels: list[str] = []
    starts = list(range(0, batch, batch_size))
    for start in tqdm(starts, desc="logit lens", disable=not progress or len(starts) == 1):
        sl = slice(start, start + batch_size)
        tk, p = tokens[sl].to(dev), positions[sl]
        m = tk.shape[0]
        cache = activations(model, tk, _names_filter)
        idx = torch.arange(m, device=dev)
        acc, raw = cache.accumulated_resid(layer=None, incl_mid=False, return_labels=True)  # [R, m, seq, d]
        acc = acc[:, idx, p.to(dev)]  # [R, m, d]
        readout = logit_readout(model, acc, chunk_size=max(64, m)).values.float()  # [R, m, vocab]
        layer_labels = ["embed"] + [f"L{i}" for i in range(len(raw) - 1)]
        a, w = ans[sl].to(dev), (wr[sl].to(dev) if wr is not None else None)
        lg, rk, pr, ld = [], [], [], []
        for logits in readout:  # [m, vocab] per reading
            al = logits[idx, a]
            lg.append(al.cpu())
            rk.append((logits > al[:, None]).sum(-1).float().cpu())
            pr.append(logits.log_softmax(-1)[idx, a].exp().cpu())
            if w is not None:
                ld.append((al - logits[idx, w]).cpu())
        out["logit"].append(torch.stack(lg))
        out["rank"].append(torch.stack(rk))
        out["prob"].append(torch.stack(pr))
        if w is not None:
            out["logit_diff"].append(torch.stack(ld))
        del cache
    per = {k: torch.cat(v, dim=1) for k, v in out.items() if v}
    labels = {"layer": layer_labels}
    mk = lambda k, title, metric: Grid(per[k].mean(1), ("layer",), labels, title=title, metric=metric)  # noqa: E731
    return LogitLens(
        logit=mk("logit", "logit lens: answer logit", "logit"),
        rank=mk("rank", "logit lens: answer rank (0 = top)", "rank"),
        prob=mk("prob", "logit lens: answer probability", "probability"),
        logit_diff=mk("logit_diff", "logit lens: answer - wrong logit", "logit diff") if "logit_diff" in per else None,
        per_prompt=per,
    )
