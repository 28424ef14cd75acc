"""mechlib: a mechanistic-interpretability workbench on TransformerLens.

Modules, one per technique:

* :mod:`mechlib.models`: load ``smollm2-135m`` (offline default), GPT-2 and small random models.
* :mod:`mechlib.reports`: the findings records every notebook writes and asserts.
"""

from mechlib.models import DEFAULT_MODEL, list_models, load_model, random_model, set_threads

__all__ = ["DEFAULT_MODEL", "list_models", "load_model", "random_model", "set_threads"]
__version__ = "0.1.0"
