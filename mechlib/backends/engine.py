"""The engine backend: intervention lists on :mod:`mechlib.engine`'s exact, resuming CPU mirror.

Its speed-ups are its own business, worked out from the lists:

* **Resume.** A list whose earliest intervention sits at block ``L`` and position ``p`` leaves
  every block below ``L`` and every position before ``p`` as in the base run (attention is
  causal), so its call resumes from the cached base run at ``(L, p)``.
* **Batch.** Lists become rows of one call (list ``i``: rows ``i*B..(i+1)*B`` for ``B`` prompts).
  Lists are grouped by start position; lists of consecutive start layers merge until a call has
  ``min_rows`` rows (never more than ``max_rows``), the grouping that made patching sweeps fast.
  Lists of different start layers in one call start each of their rows at its own layer
  (:meth:`~mechlib.engine.Engine.resume_rows`), so no row recomputes blocks below its first
  intervention.
* **Last position only.** When the score reads only the last position, the top block computes
  queries and everything after them for that position alone.
* **A residual after block L is the input of block L + 1.** A ``resid_post`` intervention at
  ``L`` (below the top block) is applied where block ``L + 1`` starts, so its call resumes there.
* **Base runs with interventions** (:class:`~mechlib.backends.RunSpec`, e.g. causal tracing's
  noised embeddings) are cached once; a list resuming above them re-applies only those of the
  base's interventions that lie in the blocks and positions it recomputes.

The engine is the one for the precision in force (:mod:`mechlib.precision`): float32, exact
against the bridge, by default; bfloat16 matrix multiplies under the opt-in.

``embed`` sites are applied at ``blocks.0.hook_resid_pre`` (the residual minus the positional
embedding is the token embedding), since a resumed call starts there.

Example:
    >>> from mechlib.backends import get_backend                       # doctest: +SKIP
    >>> be = get_backend(load_model("tiny-llama-2l"), "engine")        # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from mechlib.backends import Backend, LazyLogits, Runs, RunSpec
from mechlib.engine import EditContext, Engine
from mechlib.interventions import Intervention, Plan, Record, Site, Sources

__all__ = ["EngineBackend"]


class EngineBackend(Backend):
    """Runs intervention lists on an :class:`~mechlib.engine.Engine` (see the module docstring)."""

    name = "engine"
    reuses_prefix = True

    def __init__(self, model: Any, engine: Engine) -> None:
        super().__init__(model)
        self.engine = engine

    def _cache(self, runs: dict[str, RunSpec], hooks: list[str]) -> Runs:
        L = self.n_layers
        keep = set(hooks) | {f"blocks.{l}.hook_resid_pre" for l in range(L)} | {f"blocks.{L - 1}.hook_resid_post"}
        keep.add("hook_embed")
        native: dict[str, Any] = {}
        out = Runs({}, LazyLogits(native), {}, native)
        for name, spec in runs.items():
            tokens = spec.tokens.to(self.engine.device)
            edits = None
            if spec.interventions:  # a full run from the embeddings: every hook fires where it is
                plan = Plan([list(spec.interventions)], tokens.shape[0])
                src = Sources(out.acts)
                edits = {h: self._edit(plan, h, tokens.shape[1], src, {}) for h in plan.hooks}
            run = self.engine.run(tokens, edits=edits, keep=keep)
            out.tokens[name] = run.tokens
            out.acts[name] = run.acts
            native[name] = run
        return out

    def _block(self, iv: Intervention) -> int:
        """The block a call must start at to apply ``iv`` (``resid_post`` at L: block L + 1's input)."""
        s = iv.site
        if s.point == "resid_post" and s.layer < self.n_layers - 1:
            return s.layer + 1
        return s.block

    def _start(self, lst: Sequence[Intervention], T: int) -> tuple[int, int]:
        if not lst:
            return self.n_layers, T - 1
        return min(self._block(iv) for iv in lst), min(iv.site.first_position(T) for iv in lst)

    def _on_base(self, runs: Runs, base: str, lists, n_pos: int, want_logits: bool = True):
        """Each list preceded by the base run's interventions its call recomputes.

        A call resuming at block ``L``, position ``p`` reads the cached base run's input of block
        ``L`` (after the base's interventions there: ``embed``, ``resid_pre`` of ``L``,
        ``resid_post`` of ``L - 1``) and its keys and values before ``p``; the base's other
        interventions at or above ``L`` are re-applied at positions ``>= p``. Rows start at their
        list's own block when logits are wanted (:meth:`Engine.resume_rows`), else at the call's.
        """
        own = runs.interventions.get(base, [])
        if not own:
            return lists
        starts = [self._start(lst, n_pos) for lst in lists]
        if not want_logits:  # one resume for the whole call (Record only)
            starts = [(min(s[0] for s in starts), min(s[1] for s in starts))] * len(lists)
        memo: dict[tuple[int, int], Optional[Intervention]] = {}
        out = []
        for lst, (layer, pos) in zip(lists, starts):
            pre = []
            for k, iv in enumerate(own):
                b = self._block(iv)
                if b < layer or (b == layer and self._is_input(iv)):
                    continue  # in the cached state the call resumes from
                if (k, pos) not in memo:
                    memo[(k, pos)] = _from_position(iv, pos, n_pos)
                if memo[(k, pos)] is not None:
                    pre.append(memo[(k, pos)])
            out.append(pre + list(lst))
        return out

    def _is_input(self, iv: Intervention) -> bool:
        """Whether ``iv`` acts on the input of block :meth:`_block` (the state a resumed call reads)."""
        p = iv.site.point
        return p in ("embed", "resid_pre") or (p == "resid_post" and iv.site.layer < self.n_layers - 1)

    def _groups(self, lists, B, T, min_rows, max_rows):
        """Same start position; consecutive start layers merge until a call has ``min_rows`` rows."""
        starts = [self._start(lst, T) for lst in lists]
        by_pos: dict[int, dict[int, list[int]]] = {}
        for i, (layer, pos) in enumerate(starts):
            by_pos.setdefault(pos, {}).setdefault(layer, []).append(i)
        groups: list[list[int]] = []
        for pos in sorted(by_pos):
            current: list[int] = []
            for layer in sorted(by_pos[pos]):
                for i in by_pos[pos][layer]:
                    if current and (len(current) + 1) * B > max_rows:
                        groups.append(current)
                        current = []
                    current.append(i)
                if len(current) * B >= min_rows:
                    groups.append(current)
                    current = []
            if current:
                groups.append(current)
        return groups

    def _call(
        self,
        runs: Runs,
        base: str,
        lists,
        plan: Plan,
        sources: Sources,
        records: dict,
        last_only: bool,
        want_logits: bool,
    ) -> Optional[torch.Tensor]:
        eng = self.engine
        B, T = runs.batch, runs.n_pos
        starts = [self._start(lst, T) for lst in lists]
        start_layer = min(s[0] for s in starts)
        start_pos = min(s[1] for s in starts)
        stop = None
        if not want_logits:
            rl = [self._block(iv) for lst in lists for iv in lst if isinstance(iv.op, Record)]
            stop = max(rl) + 1 if rl else start_layer
            if stop <= start_layer:
                return None
        edits = self._edits(plan, T, sources, records)
        base_index = torch.arange(B).repeat(len(lists))
        native = runs.native[base]
        if want_logits and len({s[0] for s in starts}) > 1:  # every row starts at its own layer
            row_start = torch.tensor([s[0] for s in starts]).repeat_interleave(B)
            top = f"blocks.{self.n_layers - 1}.hook_resid_post"
            like = native[top]
            resid = torch.empty(row_start.shape[0], T - start_pos, like.shape[-1], dtype=like.dtype, device=like.device)
            for layer in row_start.unique().tolist():
                name = f"blocks.{layer}.hook_resid_pre" if layer < self.n_layers else top
                rows = (row_start == layer).nonzero()[:, 0]
                resid[rows.to(resid.device)] = native[name][base_index[rows].to(like.device), start_pos:]
            out = eng.resume_rows(
                native, row_start, start_pos, resid=resid, edits=edits, base_index=base_index, last_only=last_only
            )
            if last_only:
                return out[:, None]
            if start_pos == 0:
                return out
            return torch.cat([native.logits[base_index.to(out.device), :start_pos], out], dim=1)
        out = eng.resume(
            native,
            start_layer,
            start_pos,
            edits=edits,
            base_index=base_index,
            last_only=last_only,
            stop_layer=stop,
        )
        if out is None:
            return None
        return out[:, None] if last_only else out

    def _edits(self, plan: Plan, T: int, sources: Sources, records: dict) -> dict:
        """The engine's edit functions for a plan: ``resid_post`` at L < top fires as block L + 1's
        input (before that block's own ``resid_pre`` interventions), ``embed`` at block 0's input
        (the residual minus the positional embedding)."""
        top = self.n_layers - 1
        chains: dict[str, list[str]] = {}
        for hook in plan.hooks:
            layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else None
            if hook == "hook_embed":
                target = "blocks.0.hook_resid_pre"
            elif hook.endswith(".hook_resid_post") and layer is not None and layer < top:
                target = f"blocks.{layer + 1}.hook_resid_pre"
            else:
                target = hook
            chain = chains.setdefault(target, [])
            if hook == target:
                chain.append(hook)
            else:  # fires before the target's own interventions
                chain.insert(0, hook)
        W_pos = self.engine.W_pos

        def make(hooks: list[str]):
            def edit(act: torch.Tensor, ctx: EditContext) -> torch.Tensor:
                for hook in hooks:
                    if hook == "hook_embed" and W_pos is not None:
                        pos = W_pos[ctx.start_pos : T]
                        act = plan.apply(hook, act - pos, ctx.start_pos, T, sources, records, rows=ctx.rows) + pos
                    else:
                        act = plan.apply(hook, act, ctx.start_pos, T, sources, records, rows=ctx.rows)
                return act

            return edit

        return {target: make(hooks) for target, hooks in chains.items()}

    @staticmethod
    def _edit(plan: Plan, hook: str, T: int, sources: Sources, records: dict):
        def edit(act: torch.Tensor, ctx: EditContext) -> torch.Tensor:
            return plan.apply(hook, act, ctx.start_pos, T, sources, records, rows=ctx.rows)

        return edit

    def gradients(self, tokens, hooks, scalar):
        leaves: dict[str, torch.Tensor] = {}
        acts: dict[str, torch.Tensor] = {}

        def add_leaf(act: torch.Tensor, ctx: EditContext) -> torch.Tensor:
            acts[ctx.hook] = act.detach().clone()
            leaf = torch.zeros_like(act, requires_grad=True)
            leaves[ctx.hook] = leaf
            return act + leaf

        run = self.engine.run_with_grad(tokens, edits={h: add_leaf for h in hooks}, keep=())
        with torch.enable_grad():
            scalar(run.logits).backward()
        grads = {h: (leaves[h].grad if leaves[h].grad is not None else torch.zeros_like(leaves[h])) for h in hooks}
        return run.logits.detach(), acts, grads


def _from_position(iv: Intervention, pos: int, n_pos: int) -> Optional[Intervention]:
    """``iv`` restricted to positions ``>= pos`` (``None`` if none is left)."""
    site = iv.site
    if pos == 0:
        return iv
    if site.positions is None:
        kept = tuple(range(pos, n_pos))
    else:
        kept = tuple(p for p in site.positions if (p + n_pos if p < 0 else p) >= pos)
        if len(kept) == len(site.positions):
            return iv
    if not kept:
        return None
    return Intervention(Site(site.point, site.layer, site.head, kept, site.rows), iv.op)
