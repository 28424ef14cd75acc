"""A lean, exact mirror of a TransformerBridge's forward pass, built for sweeps.

Patching and causal tracing run thousands of forward passes that differ from one base run in a
single place. Three things make them cheap, and the bridge's own forward can use none of them:

* **Batching many interventions into one call.** The bridge pays ~100 ms of Python overhead per
  call whatever its size; this mirror pays about a millisecond per layer.
* **Reusing the base run below the intervened layer.** An intervention at layer ``L`` leaves
  layers ``< L`` as they were, so the run resumes at ``L`` from the cached residual stream.
* **Reusing positions before the intervened one.** Attention is causal: an intervention at
  position ``p`` leaves every position ``< p`` untouched at every layer. The run resumes on the
  suffix ``p:`` only, attending to the cached keys and values of the prefix.

The mirror computes with the bridge's own processed weights (``W_Q``, ``W_K``, ... after
``enable_compatibility_mode()``), fires interventions at the bridge's hook names
(``blocks.{l}.attn.hook_z``, ``blocks.{l}.hook_resid_pre``, ...) with the same shapes, and matches
the bridge's activations and logits to float32 rounding (``tests/test_engine.py`` checks every
hook on four architectures). Supported: LayerNorm or RMSNorm (folded), learned or rotary
positions, grouped-query attention, gated or plain MLPs, attention-only models, and Gemma 3's
additions (scaled embeddings, query/key RMSNorms, post-attention and post-MLP RMSNorms,
sliding-window and global layers with their own rotary bases). ``Engine(model, "bfloat16")`` (what
:func:`get_engine` builds under the :mod:`mechlib.precision` opt-in) keeps the matrix multiplies'
weights in bfloat16 and is close to, not equal to, the bridge. Anything else raises
:class:`UnsupportedModelError`, and callers fall back to the bridge's hooks.

Example:
    >>> import torch
    >>> from mechlib.models import load_model
    >>> model = load_model("tiny-llama-2l")
    >>> engine = Engine(model)
    >>> tokens = torch.randint(0, 256, (2, 6))
    >>> base = engine.run(tokens)                    # logits + every activation
    >>> zero_z = lambda z, ctx: z * 0
    >>> patched = engine.resume(base, start_layer=1, start_pos=3,
    ...                         edits={"blocks.1.attn.hook_z": zero_z})
    >>> patched.shape                                # [batch, pos, vocab]: prefix from the base
    torch.Size([2, 6, 256])

Layout: :mod:`mechlib.engine.forward` (the :class:`Engine` and :func:`get_engine`),
:mod:`mechlib.engine.architecture` (which models it mirrors and their extra parts),
:mod:`mechlib.engine.runs` (:class:`BaseRun`, :class:`EditContext`, :data:`HOOKS_PER_LAYER`).
Every name is importable from ``mechlib.engine``.
"""

from mechlib.engine.architecture import UnsupportedModelError
from mechlib.engine.forward import Engine, get_engine
from mechlib.engine.runs import HOOKS_PER_LAYER, BaseRun, EditContext, EditFn

__all__ = ["BaseRun", "EditContext", "EditFn", "Engine", "UnsupportedModelError", "get_engine", "HOOKS_PER_LAYER"]
