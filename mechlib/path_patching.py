"""Path patching (Wang et al. 2022, "Interpretability in the Wild", section 3 and appendix B).

Activation patching says *whether* a head matters; path patching says *through which path*. It
measures the effect of a set of **sender** heads on given **receivers** only, with every other
head held fixed:

1. Cache the clean (``x_orig``) and corrupted (``x_new``) runs.
2. Run on the base input with the senders' outputs (``hook_z``) patched from the other run and
   **every other head's output frozen** to its base value, at every position. Record the
   receivers' inputs: the senders' change reaches them only along direct paths (through the
   residual stream, and through MLPs, see below).
3. Run on the base input again with only the receivers' inputs patched to the recorded values;
   the rest of the model is recomputed. Score the output with the metric.

With ``receivers="logits"`` step 2's output *is* the answer: the senders' direct effect on the
logits (through the residual stream and the MLPs).

Choices, following the paper (and its reference implementation):

* ``direction="noise"`` (default, as in the paper): the base run is the clean one and the senders
  get their corrupted (ABC) outputs; ``"denoise"`` swaps the roles.
* MLPs are **recomputed** in step 2 (the paper freezes only attention heads, treating MLPs as part
  of the paths); ``freeze_mlps=True`` freezes them to their base values too.
* Receivers' inputs are patched at every position.
* **Grouped-query attention.** A receiver ``(layer, head, "q")`` is one query head: its query is
  ``hook_q[:, :, head]``. Keys and values exist per KV head, shared by the
  ``n_heads / n_kv_heads`` query heads of a group (SmolLM2: query heads 0-2 read KV head 0, 3-5
  KV head 1, 6-8 KV head 2). A ``"k"``/``"v"`` receiver named by a query head therefore patches
  the keys/values of its whole KV head, which every query head of the group reads; the result's
  ``meta["kv_receivers"]`` lists the KV heads patched and the query heads they feed.

Results use the scale of :mod:`mechlib.patching`: by default normalised so that 0 is the corrupted
run's metric and 1 the clean run's. Under ``"noise"`` a value of 1 means the path carries nothing,
and ``1 - value`` is the fraction of the clean-minus-corrupted difference that flows through it.

Sweeps over many sender sets (:func:`path_patch_sweep`: every head as a sender) batch the sets as
rows of few engine calls, grouped by the sender layer, resuming from the base run at that layer.

Example:
    >>> heads = path_patch_sweep(model, ds.tokens, ds.corrupted_tokens, ioi_metric(ds),
    ...                          receivers=["L9H6", "L9H9"], component="q")        # doctest: +SKIP
    >>> heads.top(5, largest=False)                                               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from mechlib.metrics import Metric, as_metric
from mechlib.patching import PatchResult, Runner, _device, _scale, base_runs, check_pair
from mechlib.results import head_label, parse_head

__all__ = ["path_patch", "path_patch_sweep", "PathPatchResult", "normalize_receivers"]

HeadLike = Union[str, tuple[int, int]]


def _heads(model: Any, heads: Iterable[HeadLike], what: str) -> list[tuple[int, int]]:
    if isinstance(heads, (str, tuple)):
        heads = [heads]
    out = []
    for h in heads:
        l, i = parse_head(h)
        if not 0 <= l < model.cfg.n_layers:
            raise ValueError(f"{what} {h!r}: layer {l} out of range 0..{model.cfg.n_layers - 1}")
        if not 0 <= i < model.cfg.n_heads:
            raise ValueError(f"{what} {h!r}: head {i} out of range 0..{model.cfg.n_heads - 1}")
        out.append((l, i))
    if not out:
        raise ValueError(f"no {what} heads given")
    return list(dict.fromkeys(out))


def normalize_receivers(model: Any, receivers: Iterable[HeadLike], component: str) -> dict[int, list[int]]:
    """``{layer: [index into hook_{component}'s head axis]}`` for query-head receivers.

    For ``"q"`` the index is the query head; for ``"k"``/``"v"`` the KV head the query head reads
    (``head // (n_heads // n_kv_heads)``).
    """
    if component not in ("q", "k", "v"):
        raise ValueError(f"component must be 'q', 'k' or 'v', got {component!r}")
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    group = model.cfg.n_heads // n_kv
    out: dict[int, list[int]] = {}
    for l, h in _heads(model, receivers, "receiver"):
        idx = h if component == "q" else h // group
        out.setdefault(l, [])
        if idx not in out[l]:
            out[l].append(idx)
    return out


@dataclass
class PathPatchResult:
    """The metric with one sender set's path into the receivers patched.

    Attributes:
        value: The metric after the path patch (normalised unless ``normalise=False``).
        clean, corrupted: Raw metric on the clean and corrupted runs.
        senders: The sender heads.
        receivers: ``"logits"`` or the receiver heads.
        component: ``"q"``, ``"k"`` or ``"v"`` (``None`` for logits).
        meta: Direction, MLP choice, KV heads patched.
    """

    value: float
    clean: float
    corrupted: float
    senders: list[str]
    receivers: Union[str, list[str]]
    component: Optional[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def effect(self) -> float:
        """Fraction of the clean-minus-corrupted difference the path carries (normalised runs):
        ``1 - value`` when noising, ``value`` when denoising."""
        if not self.meta.get("normalised", True):
            raise ValueError("effect is defined on normalised results; rerun with normalise=True")
        return 1.0 - self.value if self.meta.get("direction") == "noise" else self.value

    def __repr__(self) -> str:
        rec = self.receivers if isinstance(self.receivers, str) else f"{self.receivers} ({self.component})"
        eff = f", effect {self.effect:.3f}" if self.meta.get("normalised", True) else ""
        return f"PathPatchResult({', '.join(self.senders)} -> {rec}: {self.value:.3f}{eff})"


class _PathPatcher:
    """Shared machinery: cached runs, the scale, and batched steps 2 and 3 for many sender sets."""

    def __init__(self, model, clean, corrupted, metric, receivers, component, direction, freeze_mlps, normalise,
                 use_engine):
        check_pair(clean, corrupted)
        self.model = model
        self.metric = as_metric(metric)
        self.cfg = model.cfg
        self.L, self.H = self.cfg.n_layers, self.cfg.n_heads
        self.to_logits = isinstance(receivers, str) and receivers in ("logits", "resid_end")
        if not self.to_logits:
            if isinstance(receivers, str) and not receivers.upper().startswith("L") and "." not in receivers:
                raise ValueError(f"receivers must be 'logits' or heads like 'L9H6', (9, 6); got {receivers!r}")
            self.receivers = normalize_receivers(model, receivers, component)
            self.receiver_labels = [head_label(l, h) for l, h in _heads(model, receivers, "receiver")]
        self.component = None if self.to_logits else component
        if freeze_mlps and getattr(self.cfg, "attn_only", False):
            freeze_mlps = False
        self.freeze_mlps = freeze_mlps
        self.direction = direction
        self.runner = Runner(model, use_engine)
        hooks = {f"blocks.{l}.attn.hook_z" for l in range(self.L)}
        if freeze_mlps:
            hooks |= {f"blocks.{l}.hook_mlp_out" for l in range(self.L)}
        dev = _device(model)
        self.clean_run, self.corr_run, self.base, self.source = base_runs(
            self.runner, clean.to(dev), corrupted.to(dev), hooks, direction)
        self.B = clean.shape[0]
        self.vc, self.vk, self.offset, self.span = _scale(self.metric, self.clean_run, self.corr_run, normalise)
        self.normalise = normalise

    def meta(self) -> dict[str, Any]:
        m = {"direction": self.direction, "freeze_mlps": self.freeze_mlps, "normalised": self.normalise,
             "clean": self.vc, "corrupted": self.vk}
        if not self.to_logits and self.component in ("k", "v"):
            n_kv = int(getattr(self.cfg, "n_key_value_heads", None) or self.H)
            g = self.H // n_kv
            m["kv_receivers"] = {f"L{l}KV{k}": [head_label(l, k * g + j) for j in range(g)]
                                 for l, ks in self.receivers.items() for k in ks}
        return m

    def run(self, sets: list[list[tuple[int, int]]], max_rows: int = 512, progress: bool = False) -> list[float]:
        """The (scaled) metric for each sender set."""
        B = self.B
        order = sorted(range(len(sets)), key=lambda i: min(l for l, _ in sets[i]))
        per_call = max(1, max_rows // B)
        chunks = [order[i : i + per_call] for i in range(0, len(order), per_call)]
        # Keep calls within one start layer where possible: split chunks at layer changes if small.
        out = [0.0] * len(sets)
        for chunk in tqdm(chunks, desc="path patching", disable=not progress):
            vals = self._run_chunk([sets[i] for i in chunk])
            for i, v in zip(chunk, vals):
                out[i] = (v - self.offset) / self.span
        return out

    def _run_chunk(self, sets: list[list[tuple[int, int]]]) -> list[float]:
        B, H, L = self.B, self.H, self.L
        n = len(sets)
        base_index = torch.arange(B).repeat(n)
        start = min(min(l for l, _ in s) for s in sets)
        # sender mask per layer: [rows, H]
        masks = torch.zeros(L, n * B, H, dtype=torch.bool)
        for c, s in enumerate(sets):
            for l, h in s:
                masks[l, c * B : (c + 1) * B, h] = True
        stop = L if self.to_logits else max(self.receivers)
        edits: dict[str, Callable] = {}
        for l in range(start, min(stop + 1, L)):
            z = f"blocks.{l}.attn.hook_z"
            base_z, src_z, mask = self.base[z], self.source[z], masks[l]

            def freeze(act, ctx, base_z=base_z, src_z=src_z, mask=mask):
                sp = ctx.start_pos
                b = base_z[ctx.base_index, sp:]
                s = src_z[ctx.base_index, sp:]
                return torch.where(mask[:, None, :, None].to(act.device), s, b)

            edits[z] = freeze
            if self.freeze_mlps:
                m = f"blocks.{l}.hook_mlp_out"
                base_m = self.base[m]
                edits[m] = lambda act, ctx, base_m=base_m: base_m[ctx.base_index, ctx.start_pos:]
        if self.to_logits:
            logits = self.runner.resume(self.base, start, 0, edits, base_index, self.metric.last_only)
            return self._score(logits, n)
        # step 2: record the receivers' inputs (receiver layers are > start, else no path exists)
        recorded: dict[str, torch.Tensor] = {}
        comp = f"attn.hook_{self.component}"
        for l in self.receivers:
            name = f"blocks.{l}.{comp}"

            def record(act, ctx, name=name, prior=edits.get(name)):
                recorded[name] = act.clone()
                return None

            if l < start:
                continue  # a receiver below every sender: its input is the base run's
            edits[name] = record
        if any(l >= start for l in self.receivers):
            self.runner.resume(self.base, start, 0, edits, base_index, True, stop_layer=max(self.receivers) + 1)
        # step 3: patch only the receivers' inputs; recompute everything else
        patch_edits: dict[str, Callable] = {}
        for l, idx in self.receivers.items():
            name = f"blocks.{l}.{comp}"
            if name not in recorded:
                continue
            rec = recorded[name]

            def put(act, ctx, rec=rec, idx=idx):
                out = act.clone()
                out[:, :, idx] = rec[:, ctx.start_pos:, idx]
                return out

            patch_edits[name] = put
        if not patch_edits:
            logits = self.base.logits[base_index]
            logits = logits[:, -1:] if self.metric.last_only else logits
        else:
            first = min(int(n.split(".")[1]) for n in patch_edits)
            logits = self.runner.resume(self.base, first, 0, patch_edits, base_index, self.metric.last_only)
        return self._score(logits, n)

    def _score(self, logits: torch.Tensor, n: int) -> list[float]:
        vals = []
        for c in range(n):
            out = self.metric.evaluate(logits[c * self.B : (c + 1) * self.B])
            vals.append(float(out.float().mean()))
        return vals


def path_patch(
    model: Any,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable],
    senders: Union[HeadLike, Sequence[HeadLike]],
    receivers: Union[str, Sequence[HeadLike]] = "logits",
    *,
    component: str = "q",
    direction: str = "noise",
    freeze_mlps: bool = False,
    normalise: bool = True,
    use_engine: bool = True,
) -> PathPatchResult:
    """Path-patch one set of sender heads into the receivers (all senders patched together).

    Args:
        model: A bridge from :func:`mechlib.load_model`.
        clean, corrupted: Token tensors of one shape ``[batch, pos]``.
        metric: A :class:`~mechlib.metrics.Metric` or callable ``logits -> scalar | [batch]``.
        senders: Heads, e.g. ``["L7H3", (8, 6)]``.
        receivers: ``"logits"`` (direct effect on the output) or query heads, e.g.
            ``["L9H6", "L9H9"]``, whose ``component`` input is patched.
        component: ``"q"``, ``"k"`` or ``"v"`` (``k``/``v`` patch the receiver's whole KV head on
            grouped-query models; see the module docstring).
        direction: ``"noise"`` (paper: corrupted senders into the clean run) or ``"denoise"``.
        freeze_mlps: Freeze MLP outputs in step 2 too (default: recomputed, as in the paper).
        normalise: Report 0 = corrupted run, 1 = clean run.

    Raises:
        ValueError: Bad token shapes, heads out of range, an unknown component or direction.
    """
    pp = _PathPatcher(model, clean, corrupted, metric, receivers, component, direction, freeze_mlps, normalise,
                      use_engine)
    s = _heads(model, senders, "sender")
    value = pp.run([s])[0]
    return PathPatchResult(value, pp.vc, pp.vk, [head_label(*h) for h in s],
                           "logits" if pp.to_logits else pp.receiver_labels, pp.component, pp.meta())


def path_patch_sweep(
    model: Any,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable],
    receivers: Union[str, Sequence[HeadLike]] = "logits",
    *,
    component: str = "q",
    senders: Optional[Sequence[HeadLike]] = None,
    direction: str = "noise",
    freeze_mlps: bool = False,
    normalise: bool = True,
    max_rows: int = 512,
    progress: bool = True,
    use_engine: bool = True,
) -> PatchResult:
    """Path-patch every head (or ``senders``) singly into the receivers: a layer x head grid.

    Senders at or above the last receiver layer have no path to it and are left NaN. Arguments
    as in :func:`path_patch`; ``max_rows`` bounds the rows (sender sets x prompts) per call.
    """
    pp = _PathPatcher(model, clean, corrupted, metric, receivers, component, direction, freeze_mlps, normalise,
                      use_engine)
    top = model.cfg.n_layers if pp.to_logits else max(pp.receivers)
    cands = _heads(model, senders, "sender") if senders is not None else [
        (l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    cands = [c for c in cands if c[0] < top]
    if not cands:
        raise ValueError("no sender lies below the receivers; senders must be in earlier layers")
    vals = pp.run([[c] for c in cands], max_rows=max_rows, progress=progress)
    grid = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))
    for (l, h), v in zip(cands, vals):
        grid[l, h] = v
    rec = "logits" if pp.to_logits else f"{', '.join(pp.receiver_labels)} ({component})"
    return PatchResult(grid, ("layer", "head"), {}, title=f"path patching: head -> {rec}",
                       metric=("normalised " if normalise else "") + pp.metric.name,
                       meta={**pp.meta(), "receivers": rec, "target": "path"})
