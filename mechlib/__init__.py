"""mechlib: a mechanistic-interpretability workbench on TransformerLens.

One module per technique (import them directly, e.g. ``from mechlib import patching``):

* :mod:`mechlib.models`: ``load_model`` (``smollm2-135m`` offline default, GPT-2, tiny random models).
* :mod:`mechlib.engine`: an exact mirror of the model's forward for batched, prefix-reusing sweeps.
* :mod:`mechlib.patching`, :mod:`mechlib.metrics`: activation, attribution and path patching.
* :mod:`mechlib.logit_attribution`: direct logit attribution and the logit lens.
* :mod:`mechlib.induction`, :mod:`mechlib.ablation`, :mod:`mechlib.toy`: induction heads.
* :mod:`mechlib.ioi`: indirect-object-identification prompts.
* :mod:`mechlib.facts`, :mod:`mechlib.causal_tracing`: ROME-style causal tracing.
* :mod:`mechlib.results`, :mod:`mechlib.views`, :mod:`mechlib.reports`: labelled results, offline
  attention views, findings records.
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
