"""The records a run of :class:`mechlib.engine.forward.Engine` leaves and edits receive.

* :data:`HOOKS_PER_LAYER`: the hook names the mirror fires in each block, in forward order;
* :class:`EditContext`: what an edit function is told about the activation it receives;
* :class:`BaseRun`: a cached run (tokens, lazily unembedded logits, activations, keys and values) that later runs
  resume from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["HOOKS_PER_LAYER", "EditContext", "EditFn", "BaseRun"]

# Hook names (suffixes after ``blocks.{l}.``) the mirror fires, in forward order.
HOOKS_PER_LAYER = (
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)


@dataclass
class EditContext:
    """What an edit function is told about the activation it receives.

    Attributes:
        hook: The hook name, e.g. ``"blocks.5.attn.hook_z"``.
        layer: The layer of the hook (``-1`` for ``hook_embed``).
        start_pos: Absolute position of the first row of the activation's position axis (the
            run covers positions ``start_pos .. n_pos-1``; for ``hook_pattern`` this is the
            query axis, while the key axis always starts at 0).
        base_index: ``[batch]`` which base-run prompt each row of the batch continues.
        rows: ``[batch]`` which rows of the call the activation's rows are, when only some rows
            are computed at this layer (:meth:`Engine.resume_rows`, where rows start at
            different layers); ``None`` when the activation holds every row in order.
    """

    hook: str
    layer: int
    start_pos: int
    base_index: torch.Tensor
    rows: Optional[torch.Tensor] = None


EditFn = Callable[[torch.Tensor, EditContext], Optional[torch.Tensor]]


@dataclass
class BaseRun:
    """A cached run: its tokens, logits, and every activation the mirror can fire.

    ``acts[name]`` has the bridge's shape for that hook over the whole sequence;
    ``keys[l]``/``values[l]`` are the rotated keys and values ``[batch, kv_head, pos, d_head]``
    later runs attend to when they resume on a suffix.

    The logits are unembedded when first read, from ``final`` (the residual after the last block):
    :attr:`logits` every position, :meth:`last_logits` the last one only. A run cached for its
    activations never pays for its unembedding, which on a large vocabulary (Gemma 3's 262,144
    tokens) costs more per position than every block together.
    """

    tokens: Optional[torch.Tensor]
    final: torch.Tensor
    unembed: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    _logits: Optional[torch.Tensor] = field(default=None, repr=False)

    def _unembed(self, resid: torch.Tensor) -> torch.Tensor:
        # a run cached in inference mode is unembedded in it (its tensors are inference tensors);
        # a run with gradients (Engine.run_with_grad) keeps its graph
        with torch.inference_mode(self.final.is_inference()):
            return self.unembed(resid)

    @property
    def logits(self) -> torch.Tensor:
        """``[batch, pos, vocab]``, unembedded on first use and kept."""
        if self._logits is None:
            self._logits = self._unembed(self.final)
        return self._logits

    def last_logits(self) -> torch.Tensor:
        """``[batch, vocab]`` at the last position, without unembedding the others."""
        if self._logits is not None:
            return self._logits[:, -1]
        return self._unembed(self.final[:, -1])

    @property
    def n_batch(self) -> int:
        return self.final.shape[0]

    @property
    def n_pos(self) -> int:
        return self.final.shape[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.acts:
            raise KeyError(f"{name!r} was not cached; cached hooks include {sorted(self.acts)[:6]} ...")
        return self.acts[name]
