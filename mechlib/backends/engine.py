"""The engine backend: intervention lists on :mod:`mechlib.engine`'s exact, resuming CPU mirror.

Its speed-ups are its own business, worked out from the lists:

* **Resume.** A list whose earliest intervention sits at block ``L`` and position ``p`` leaves
  every block below ``L`` and every position before ``p`` as in the base run (attention is
  causal), so its call resumes from the cached base run at ``(L, p)``.
* **Batch.** Lists become rows of one call (list ``i``: rows ``i*B..(i+1)*B`` for ``B`` prompts).
  Lists are grouped by start position; lists of consecutive start layers merge until a call has
  ``min_rows`` rows (never more than ``max_rows``), the grouping that made patching sweeps fast.
* **Last position only.** When the score reads only the last position, the top block computes
  queries and everything after them for that position alone.

``embed`` sites are applied at ``blocks.0.hook_resid_pre`` (the residual minus the positional
embedding is the token embedding), since a resumed call starts there.

Example:
    >>> from mechlib.backends import get_backend                       # doctest: +SKIP
    >>> be = get_backend(load_model("tiny-llama-2l"), "engine")        # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from mechlib.backends import Backend, Runs, record_layers
from mechlib.engine import EditContext, Engine
from mechlib.interventions import Intervention, Plan, Sources

__all__ = ["EngineBackend"]


class EngineBackend(Backend):
    """Runs intervention lists on an :class:`~mechlib.engine.Engine` (see the module docstring)."""

    name = "engine"
    reuses_prefix = True

    def __init__(self, model: Any, engine: Engine) -> None:
        super().__init__(model)
        self.engine = engine

    def _cache(self, runs: dict[str, torch.Tensor], hooks: list[str]) -> Runs:
        L = self.n_layers
        keep = set(hooks) | {f"blocks.{l}.hook_resid_pre" for l in range(L)} | {f"blocks.{L - 1}.hook_resid_post"}
        keep.add("hook_embed")
        out = Runs({}, {}, {})
        for name, tokens in runs.items():
            run = self.engine.run(tokens.to(self.engine.device), keep=keep)
            out.tokens[name] = run.tokens
            out.logits[name] = run.logits
            out.acts[name] = run.acts
            out.native[name] = run
        return out

    def _start(self, lst: Sequence[Intervention], T: int) -> tuple[int, int]:
        if not lst:
            return self.n_layers, T - 1
        return min(iv.site.block for iv in lst), min(iv.site.first_position(T) for iv in lst)

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
            rl = record_layers(lists)
            stop = max(rl) + 1 if rl else start_layer
            if stop <= start_layer:
                return None
        edits = {}
        for hook in plan.hooks:
            if hook == "hook_embed":
                continue
            edits[hook] = self._edit(plan, hook, T, sources, records)
        if "hook_embed" in plan.hooks:
            edits["blocks.0.hook_resid_pre"] = self._embed_edit(
                plan, edits.get("blocks.0.hook_resid_pre"), T, sources, records
            )
        base_index = torch.arange(B).repeat(len(lists))
        out = eng.resume(
            runs.native[base],
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

    @staticmethod
    def _edit(plan: Plan, hook: str, T: int, sources: Sources, records: dict):
        def edit(act: torch.Tensor, ctx: EditContext) -> torch.Tensor:
            return plan.apply(hook, act, ctx.start_pos, T, sources, records)

        return edit

    def _embed_edit(self, plan: Plan, then, T: int, sources: Sources, records: dict):
        W_pos = self.engine.W_pos

        def edit(act: torch.Tensor, ctx: EditContext) -> torch.Tensor:
            pos = W_pos[ctx.start_pos : T] if W_pos is not None else None
            emb = act - pos if pos is not None else act
            emb = plan.apply("hook_embed", emb, ctx.start_pos, T, sources, records)
            act = emb + pos if pos is not None else emb
            return then(act, ctx) if then is not None else act

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
