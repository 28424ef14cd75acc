"""The precision of the engine's sweeps: ``float32`` (the default and the reference) or the
``bfloat16`` opt-in.

Patching, path patching, circuit evaluation and causal tracing spend nearly all their time in the
engine's matrix multiplies (:mod:`mechlib.engine`). Under ``bfloat16`` those multiplies (the
blocks' and the unembedding's) take bfloat16 inputs and weights and accumulate in float32; the
residual stream, norms, attention scores and softmax stay float32. On a CPU with AVX512-BF16 or AMX
that roughly doubles a sweep's speed (``benchmarks/flopmeter.py``, ``benchmarks/patching.py
--precision bfloat16``); on one without (AVX2 only) bfloat16 multiplies are several times *slower*,
so measure before relying on it.

Everything else stays float32 whatever the setting: the bridge's own forwards (caches, probing,
attribution, logit attribution) and edge attribution patching's gradients.

The setting is ``$MECHLIB_PRECISION`` (``make reproduce PRECISION=bfloat16``), or :func:`use` in a
``with`` block. A run under ``bfloat16`` saves its findings records apart from float32's
(``<notebook>--<model>--bfloat16.json``, :func:`mechlib.reports.record_stem`), and ``make
reproduce`` prints every finding's difference from the float32 record beside it
(:func:`mechlib.reports.compare_precisions`), so what the opt-in changed is always on screen.

Example:
    >>> import mechlib.precision as precision
    >>> precision.current()
    'float32'
    >>> with precision.use("bfloat16"):
    ...     precision.current()
    'bfloat16'
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

__all__ = ["PRECISIONS", "REFERENCE", "check", "current", "resolve", "use"]

#: The precisions a sweep can run at; the first is the default and the reference.
PRECISIONS = ("float32", "bfloat16")
REFERENCE = PRECISIONS[0]
ENV = "MECHLIB_PRECISION"

_override: list[str] = []


def check(value: object, where: str = "precision") -> str:
    """``value`` if it names a precision, else a ``ValueError`` naming ``where`` and the choices."""
    if not isinstance(value, str) or value.strip().lower() not in PRECISIONS:
        raise ValueError(f"{where} must be one of {PRECISIONS}, got {value!r}")
    return value.strip().lower()


def current() -> str:
    """The precision in force: the innermost :func:`use`, else ``$MECHLIB_PRECISION``, else
    ``float32``."""
    if _override:
        return _override[-1]
    env = os.environ.get(ENV)
    return REFERENCE if env is None or not env.strip() else check(env, f"${ENV}")


def resolve(precision: Optional[str]) -> str:
    """``precision`` checked, or :func:`current` where it is ``None``."""
    return current() if precision is None else check(precision)


@contextlib.contextmanager
def use(precision: str) -> Iterator[str]:
    """Run the sweeps inside the ``with`` block at ``precision`` (``"float32"`` or ``"bfloat16"``)."""
    _override.append(check(precision))
    try:
        yield _override[-1]
    finally:
        _override.pop()
