"""Backends that execute intervention lists (:mod:`mechlib.interventions`): one router, one module each.

=============  ======================================================================================
backend        runs
=============  ======================================================================================
``engine``     :mod:`mechlib.engine`'s exact mirror of the bridge on CPU: resumes every call at the
               earliest intervened layer and position from the cached base run, batches lists as
               rows, unembeds only the last position when the metric reads only that
``bridge``     any ``TransformerBridge`` through its hooks (lists batched as rows, per-row edits);
               the reference the other backends are tested against
``nnsight``    any Hugging Face causal LM through ``nnsight.LanguageModel`` (one trace per batch of
               lists), locally, or on NDIF with ``remote=True`` for models too big for one machine
=============  ======================================================================================

:func:`get_backend` chooses: ``"auto"`` is the engine where it mirrors the model's architecture,
else the bridge (an nnsight ``LanguageModel`` gets the nnsight backend). Every technique takes
``backend=`` (a name or a :class:`Backend`) and reports the one used in ``result.meta["backend"]``.

A backend offers three calls: :meth:`Backend.cache` (named base runs: logits and activations; a
base run may itself carry interventions, :class:`RunSpec`, e.g. causal tracing's corrupted run =
the prompt plus noise on the subject's embeddings),
:meth:`Backend.run` (many intervention lists on one base run, scored by a metric), and
:meth:`Backend.gradients` (activations and metric gradients, for attribution patching).

Example:
    >>> import torch
    >>> from mechlib.models import load_model
    >>> from mechlib.interventions import Intervention, Site, Patch
    >>> model = load_model("tiny-llama-2l")
    >>> be = get_backend(model)                    # the engine: it mirrors this model
    >>> be.name
    'engine'
    >>> clean, corrupted = torch.randint(0, 256, (2, 2, 6))
    >>> runs = be.cache({"clean": clean, "corrupted": corrupted}, ["blocks.1.attn.hook_z"])
    >>> lists = [[Intervention(Site("z", 1, head=h, positions=(5,)), Patch("clean"))] for h in range(4)]
    >>> out = be.run(runs, lists, base="corrupted", score=lambda lg: lg[:, -1, 3] - lg[:, -1, 5])
    >>> out.values.shape                           # [list, prompt]
    torch.Size([4, 2])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from mechlib import validate
from mechlib.interventions import Intervention, Plan, Record, Sources, intervention_list, point_of_hook

__all__ = ["Backend", "LazyLogits", "Runs", "RunSpec", "Outcome", "get_backend", "BACKENDS", "BackendUnavailableError"]

BACKENDS = ("auto", "engine", "bridge", "nnsight")

# Floats of logits one call may hold when every position is unembedded (rows x pos x vocab).
MAX_LOGIT_FLOATS = 6e7


class BackendUnavailableError(RuntimeError):
    """The chosen backend cannot run this model (the message says why and what to use instead)."""


@dataclass
class RunSpec:
    """A base run defined by its tokens and interventions applied to every run on it.

    E.g. causal tracing's corrupted run: ``RunSpec(tokens, [Intervention(Site("embed",
    positions=subject), Add(noise))])``. Lists run on such a base (``Backend.run(..., base=name)``)
    are applied after the base's own interventions at each hook: a backend that re-runs the whole
    model (bridge, nnsight) re-applies them; the engine resumes from the cached base run and
    re-applies only those above its resume point.
    """

    tokens: torch.Tensor
    interventions: Sequence[Intervention] = ()


class LazyLogits(Mapping):
    """``name -> [batch, pos, vocab]`` logits of cached runs that unembed on first access (the
    engine's :class:`~mechlib.engine.BaseRun`), so runs cached for their activations never do."""

    def __init__(self, runs: dict[str, Any]) -> None:
        self._runs = runs

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._runs[name].logits

    def __iter__(self):
        return iter(self._runs)

    def __len__(self) -> int:
        return len(self._runs)


@dataclass
class Runs:
    """Cached base runs: ``tokens[name]``, ``logits[name]`` ``[batch, pos, vocab]``, ``acts[name][hook]``.

    ``native`` holds what the backend keeps for resuming (the engine's ``BaseRun`` per name);
    ``interventions[name]`` the base run's own interventions (:class:`RunSpec`). Read the last
    position with :meth:`last_logits`: a backend whose logits are computed on demand (the engine)
    then unembeds that position only.
    """

    tokens: dict[str, torch.Tensor]
    logits: Mapping[str, torch.Tensor]
    acts: dict[str, dict[str, torch.Tensor]]
    native: dict[str, Any] = field(default_factory=dict)
    interventions: dict[str, list[Intervention]] = field(default_factory=dict)

    def row_tokens(self, base: str, n_lists: int) -> torch.Tensor:
        """The input of a call running ``n_lists`` lists on ``base``: its prompts, once per list."""
        tokens = self.tokens[base]
        return tokens[torch.arange(tokens.shape[0]).repeat(n_lists)]

    @property
    def batch(self) -> int:
        return next(iter(self.tokens.values())).shape[0]

    @property
    def n_pos(self) -> int:
        return next(iter(self.tokens.values())).shape[1]

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        return self.acts[name]

    def last_logits(self, name: str) -> Float[torch.Tensor, "batch vocab"]:
        """Run ``name``'s logits at the last position."""
        native = self.native.get(name)
        if native is not None and hasattr(native, "last_logits"):
            return native.last_logits()
        return self.logits[name][:, -1]


@dataclass
class Outcome:
    """What :meth:`Backend.run` returns.

    Attributes:
        values: The score of each list, ``[list, prompt]`` when the score is per prompt, else
            ``[list]``; ``None`` when no score was asked for.
        records: ``{(list, key): tensor}`` from :class:`~mechlib.interventions.Record`.
        calls: Forward calls made.
    """

    values: Optional[torch.Tensor]
    records: dict[tuple[int, str], torch.Tensor]
    calls: int


Score = Callable[[Float[torch.Tensor, "batch pos vocab"]], torch.Tensor]


class Backend:
    """Executes intervention lists on a model; subclasses implement :meth:`_cache`, :meth:`_call`."""

    name = "backend"
    reuses_prefix = False  # whether a call can start after position 0

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.cfg if hasattr(model, "cfg") else None
        self.n_layers = int(cfg.n_layers)
        self.n_heads = int(cfg.n_heads)
        self.n_kv = validate.n_kv_heads(model)
        self.attn_only = bool(getattr(cfg, "attn_only", False))
        self.d_vocab = int(cfg.d_vocab)

    def __repr__(self) -> str:
        return f"<mechlib {self.name} backend>"

    # ---- checks --------------------------------------------------------------------------

    unsupported_points: tuple[str, ...] = ()

    def check(self, lists: Sequence[Sequence[Intervention]]) -> list[list[Intervention]]:
        """Lists of interventions, each site checked against the model and this backend."""
        out = []
        seen: set[Any] = set()
        for lst in lists:
            lst = intervention_list(lst)
            for iv in lst:
                key = iv.site
                if key in seen:
                    continue
                seen.add(key)
                s = iv.site
                if s.point in self.unsupported_points:
                    raise BackendUnavailableError(
                        f"the {self.name} backend cannot intervene on {s.point!r}: {self.why_unsupported(s.point)}"
                    )
                if s.layer is not None and not 0 <= s.layer < self.n_layers:
                    raise ValueError(
                        f"{iv}: layer {s.layer} out of range; this model has layers 0..{self.n_layers - 1}"
                    )
                if s.point in ("resid_mid", "mlp_pre", "mlp_post", "mlp_out") and self.attn_only:
                    raise ValueError(f"{iv}: point {s.point!r} does not exist on an attention-only model (no MLPs)")
                if s.head is not None:
                    n = self.n_kv if s.spec.kv else self.n_heads
                    if s.head >= n:
                        what = "key/value heads" if s.spec.kv else "heads"
                        raise ValueError(f"{iv}: head {s.head} out of range; this model has {n} {what} per layer")
            out.append(lst)
        return out

    def why_unsupported(self, point: str) -> str:
        return "not reachable on this backend"

    # ---- the three calls -----------------------------------------------------------------

    def cache(self, runs: dict[str, Union[Int[torch.Tensor, "batch pos"], RunSpec]], hooks: Iterable[str] = ()) -> Runs:
        """Run each named base run once; keep its logits and the activations at ``hooks``.

        Args:
            runs: ``{name: tokens [batch, pos] | RunSpec}``, e.g. ``{"clean": ..., "corrupted": ...}``;
                every batch of one shape (lists are laid over the base run's prompts). A
                :class:`RunSpec` adds interventions to its run (``Patch``/``Freeze`` there may read
                runs named earlier in ``runs``; no ``Record``).
            hooks: TransformerLens hook names the interventions will read (``Patch``/``Freeze``).
        """
        hooks = sorted(set(hooks))
        for h in hooks:
            point_of_hook(h)
        specs: dict[str, RunSpec] = {}
        for k, v in runs.items():
            if isinstance(v, tuple) and len(v) == 2:
                v = RunSpec(*v)
            if not isinstance(v, RunSpec):
                v = RunSpec(v)
            ivs = self.check([v.interventions])[0] if v.interventions else []
            if any(isinstance(iv.op, Record) for iv in ivs):
                raise ValueError(f"run {k!r}: a base run's interventions cannot Record; record in a list instead")
            specs[k] = RunSpec(validate.token_tensor(v.tokens, self.model, k), ivs)
        shapes = {tuple(s.tokens.shape) for s in specs.values()}
        if len(shapes) != 1:
            raise ValueError(f"cached runs must share one [batch, pos] shape, got {sorted(shapes)}")
        out = self._cache(specs, hooks)
        out.interventions = {k: list(s.interventions) for k, s in specs.items()}
        return out

    def run(
        self,
        runs: Runs,
        lists: Sequence[Sequence[Intervention]],
        *,
        base: str,
        score: Optional[Score] = None,
        last_only: bool = True,
        progress: bool = False,
        min_rows: int = 32,
        max_rows: Optional[int] = None,
        desc: str = "interventions",
    ) -> Outcome:
        """Run every list on the base run's prompts; score each list's logits.

        Args:
            runs: From :meth:`cache`; ``Patch``/``Freeze`` read its activations.
            lists: Intervention lists; list ``i`` is one forward pass of the whole base batch.
            base: The cached run the lists intervene on (its tokens are the input).
            score: ``logits [batch, pos | 1, vocab] -> [batch] | scalar`` (a metric). ``None``:
                only :class:`~mechlib.interventions.Record` results are wanted.
            last_only: Hand ``score`` the last position's logits only (``[batch, 1, vocab]``).
            progress: A tqdm bar over calls.
            min_rows, max_rows: Rows (lists x prompts) per call: lists are merged into calls of at
                least ``min_rows`` rows where the backend's grouping allows, at most ``max_rows``.

        Returns:
            An :class:`Outcome`.
        """
        lists = self.check(lists)
        if base not in runs.tokens:
            raise KeyError(f"no cached run named {base!r}; cached runs are {sorted(runs.tokens)}")
        B, T = runs.batch, runs.n_pos
        if max_rows is None:
            max_rows = 4096 if last_only else max(B, int(MAX_LOGIT_FLOATS // (T * self.d_vocab)))
        max_rows = max(int(max_rows), B)
        groups = self._groups(lists, B, T, min_rows, max_rows)
        sources = Sources(runs.acts)
        values: list[Optional[torch.Tensor]] = [None] * len(lists)
        records: dict[tuple[int, str], torch.Tensor] = {}
        for group in tqdm(groups, desc=desc, disable=not progress):
            sub = self._on_base(runs, base, [lists[i] for i in group], T, score is not None)
            recs: dict[tuple[int, str], torch.Tensor] = {}
            logits = self._call(runs, base, sub, Plan(sub, B), sources, recs, last_only, score is not None)
            for (j, key), v in recs.items():
                records[(group[j], key)] = v
            if score is None:
                continue
            for j, i in enumerate(group):
                out = score(logits[j * B : (j + 1) * B])
                values[i] = out.detach().float().cpu()
        if score is None:
            return Outcome(None, records, len(groups))
        same = all(v.shape == values[0].shape for v in values)
        stacked = torch.stack(values if same else [v.mean() for v in values]) if values else torch.zeros(0)
        return Outcome(stacked, records, len(groups))

    def gradients(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        hooks: Sequence[str],
        scalar: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One forward with a zero leaf added at each hook, one backward of ``scalar(logits)``.

        Returns:
            ``(logits, activations, gradients)``: activations and d scalar / d activation per hook,
            in TransformerLens's layouts.
        """
        raise NotImplementedError(f"the {self.name} backend does not compute gradients")

    # ---- backend specifics ---------------------------------------------------------------

    def _cache(self, runs: dict[str, RunSpec], hooks: list[str]) -> Runs:
        raise NotImplementedError

    def _on_base(
        self, runs: Runs, base: str, lists: list[list[Intervention]], n_pos: int, want_logits: bool = True
    ) -> list[list[Intervention]]:
        """The lists as run on ``base``: its own interventions first (this backend re-runs the whole model)."""
        own = runs.interventions.get(base, [])
        return [own + lst for lst in lists] if own else lists

    def _groups(self, lists: list[list[Intervention]], B: int, T: int, min_rows: int, max_rows: int) -> list[list[int]]:
        """Lists (indices) per call: consecutive chunks of at most ``max_rows`` rows."""
        per = max(1, max_rows // B)
        return [list(range(i, min(i + per, len(lists)))) for i in range(0, len(lists), per)]

    def _call(
        self,
        runs: Runs,
        base: str,
        lists: list[list[Intervention]],
        plan: Plan,
        sources: Sources,
        records: dict,
        last_only: bool,
        want_logits: bool,
    ) -> Optional[torch.Tensor]:
        raise NotImplementedError


def record_layers(lists: Sequence[Sequence[Intervention]]) -> list[int]:
    return [iv.site.block for lst in lists for iv in lst if isinstance(iv.op, Record)]


def get_backend(model: Any, backend: Union[str, Backend] = "auto") -> Backend:
    """The backend that runs interventions on ``model``.

    Args:
        model: A ``TransformerBridge`` (from :func:`mechlib.load_model`), an
            :class:`~mechlib.backends.nnsight.NNsightModel` or an ``nnsight.LanguageModel``.
        backend: ``"auto"`` (the engine where it mirrors the architecture, else the bridge;
            nnsight for a ``LanguageModel``), ``"engine"``, ``"bridge"``, ``"nnsight"``, or a
            :class:`Backend` instance (returned as is).

    Raises:
        ValueError: An unknown backend name.
        BackendUnavailableError: ``"engine"`` for a model the engine does not mirror (the reason
            is given), ``"bridge"`` for a model that is not a bridge, ``"nnsight"`` without a Hugging
            Face form of the model.
    """
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a Backend, got {backend!r}")
    from mechlib.backends import nnsight as nn_backend

    if nn_backend.is_nnsight_model(model):
        if backend not in ("auto", "nnsight"):
            raise BackendUnavailableError(f"an nnsight model runs on the nnsight backend only, not {backend!r}")
        return model.backend if isinstance(model, nn_backend.NNsightModel) else nn_backend.NNsightBackend(model)
    if backend in ("auto", "engine"):
        from mechlib.backends.engine import EngineBackend
        from mechlib.engine import Engine, UnsupportedModelError, get_engine

        eng = get_engine(model) if hasattr(model, "W_E") else None
        if eng is not None:
            return EngineBackend(model, eng)
        if backend == "engine":
            try:
                Engine(model)
                reason = "it is not a TransformerBridge"
            except UnsupportedModelError as e:
                reason = str(e)
            except Exception as e:  # not a bridge at all
                reason = f"{type(e).__name__}: {e}"
            raise BackendUnavailableError(f"the engine cannot run this model: {reason}; use backend='bridge'")
    if backend in ("auto", "bridge"):
        from mechlib.backends.bridge import BridgeBackend

        if not hasattr(model, "run_with_hooks"):
            raise BackendUnavailableError(f"the bridge backend needs a TransformerBridge, got {type(model).__name__}")
        return BridgeBackend(model)
    return nn_backend.NNsightBackend.for_bridge(model)


def backend_arg(backend: Any, use_engine: Optional[bool], where: str) -> Any:
    """``backend=`` with the deprecated ``use_engine=`` folded in (``False`` -> ``"bridge"``)."""
    if use_engine is None:
        return backend
    import warnings

    warnings.warn(
        f"{where}(use_engine=...) is deprecated; pass backend='engine' / 'bridge' / 'nnsight' / 'auto'",
        DeprecationWarning,
        stacklevel=3,
    )
    if not isinstance(use_engine, bool):
        raise TypeError(f"use_engine must be True or False, got {use_engine!r}")
    if backend != "auto":
        raise ValueError("pass backend= or the deprecated use_engine=, not both")
    return "auto" if use_engine else "bridge"
