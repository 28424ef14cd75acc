"""Types shared by mechlib's public signatures.

:data:`Model` is what every technique takes as ``model``: a TransformerLens ``TransformerBridge``,
as :func:`mechlib.models.load_model` and :func:`mechlib.models.random_model` return it (compatibility
mode on, so ``W_Q``, ``W_U``, ... are the processed weights and ``cfg`` describes the
architecture). Annotating ``model: Model`` instead of ``Any`` tells a reader, and an editor's type
checker, which attributes exist (``model.cfg``, ``model.to_tokens``, ``model.run_with_cache``,
``model.run_with_hooks``, ``model.W_U``, ...).

Example:
    >>> from mechlib.types import Model
    >>> def n_heads(model: Model) -> int:
    ...     return model.cfg.n_heads
"""

from __future__ import annotations

from typing import TypeAlias

from transformer_lens.model_bridge import TransformerBridge

__all__ = ["Model"]

#: A TransformerLens bridge, as :func:`mechlib.models.load_model` returns it.
Model: TypeAlias = TransformerBridge
