"""mechlib: a mechanistic-interpretability workbench on TransformerLens.

One module per technique (import them directly, e.g. ``from mechlib import patching``):

* :mod:`mechlib.models`: ``load_model`` (``smollm2-135m`` offline default, GPT-2, tiny random models).
* :mod:`mechlib.engine`: an exact mirror of the model's forward for batched, prefix-reusing sweeps.
* :mod:`mechlib.interventions`, :mod:`mechlib.backends`: one intervention language (sites and
  operations as data) executed by the ``engine``, ``bridge`` or ``nnsight`` backend.
* :mod:`mechlib.patching`, :mod:`mechlib.metrics`: activation, attribution and path patching.
* :mod:`mechlib.logit_attribution`: direct logit attribution and the logit lens.
* :mod:`mechlib.induction`, :mod:`mechlib.ablation`, :mod:`mechlib.toy`: induction heads.
* :mod:`mechlib.ioi`: indirect-object-identification prompts.
* :mod:`mechlib.facts`, :mod:`mechlib.causal_tracing`: ROME-style causal tracing.
* :mod:`mechlib.interventions`, :mod:`mechlib.backends`: interventions as data, run by the engine,
  the bridge or nnsight.
* :mod:`mechlib.graph`, :mod:`mechlib.eap`: edge attribution patching (EAP, EAP-IG), circuits.
* :mod:`mechlib.probing`, :mod:`mechlib.minimal_pairs`: probes with control tasks; minimal pairs.
* :mod:`mechlib.attribution`, :mod:`mechlib.self_explain`: input attribution and its faithfulness;
  the model's own explanations.
* :mod:`mechlib.results`, :mod:`mechlib.views`, :mod:`mechlib.reports`, :mod:`mechlib.stats`:
  labelled results, offline attention views, findings records, error bars.
* :mod:`mechlib.validate`: the input checks every public function shares.
"""

from typing import Any

__all__ = ["DEFAULT_MODEL", "list_models", "load_model", "random_model", "set_threads"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m mechlib.models` does not import mechlib.models twice.
    if name in __all__:
        from mechlib import models

        return getattr(models, name)
    raise AttributeError(f"module 'mechlib' has no attribute {name!r}")
