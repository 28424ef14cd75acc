"""The one validation layer at mechlib's public boundary: every technique checks its inputs here.

Checks: token ids (:func:`token_tensor`, :func:`token_pair`), index lists (:func:`layer_list`,
:func:`head_list`, :func:`position_list`), head specs (:func:`head_specs`, via the strict
:func:`parse_head`), per-prompt positions (:func:`prompt_positions`), token spans
(:func:`span`), numbers and options (:func:`whole`, :func:`choice`), lists of strings
(:func:`str_list`) and a metric's output (:func:`metric_values`: finite floats, scalar or
``[batch]``; :meth:`mechlib.metrics.Metric.check` adds the ``last_only`` proof on a base run).

Each check either returns the input in canonical form (sorted unique ``int`` lists, a ``long``
token tensor on the model's device) or raises ``TypeError`` / ``ValueError`` whose message names
the argument and says how to fix it. Nothing is coerced silently: ``layers=[0.7]`` is an error,
not layer 0; ``layers=1`` (a bare int) is an error, not ``[1]``; a ``str`` given where a list of
strings is wanted is an error, not a list of letters.

Example:
    >>> from mechlib.models import load_model
    >>> model = load_model("tiny-attn-2l")
    >>> layer_list(model, [1, 0])
    [0, 1]
    >>> layer_list(model, [0.7])
    Traceback (most recent call last):
    ...
    TypeError: layers must hold whole numbers (int), got 0.7 (float); pass layers=[0, 1]
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Iterable, Optional, Sequence

import torch

from mechlib.types import Model

__all__ = [
    "whole",
    "finite",
    "int_list",
    "is_head",
    "layer_list",
    "head_list",
    "position_list",
    "token_tensor",
    "token_pair",
    "str_list",
    "n_kv_heads",
    "head_specs",
    "parse_head",
    "metric_values",
    "span",
    "choice",
    "prompt_positions",
    "folded_model",
]


def _is_int(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return x.ndim == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral)


def whole(value: Any, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int``; ``TypeError`` for floats, bools and strings, ``ValueError`` out of range."""
    if not _is_int(value):
        raise TypeError(f"{name} must be a whole number (int), got {value!r} ({type(value).__name__})")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {v}")
    return v


def finite(value: Any, name: str, *, minimum: Optional[float] = None, maximum: Optional[float] = None) -> float:
    """``value`` as a finite ``float``; ``TypeError`` for bools, strings and tensors of more than one
    element, ``ValueError`` for nan, infinity or out of range."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise TypeError(f"{name} must be one number, got a tensor of shape {tuple(value.shape)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {v}")
    return v


def int_list(
    values: Any,
    name: str,
    *,
    n: int,
    what: str,
    example: str,
    allow_negative: bool = False,
    owner: Optional[str] = None,
) -> list[int]:
    """Sorted unique ints in ``[0, n)`` (negative ones counted from the end if ``allow_negative``)."""
    if isinstance(values, (str, bytes)) or _is_int(values) or not isinstance(values, Iterable):
        raise TypeError(
            f"{name} must be a list of ints, got {values!r} ({type(values).__name__}); pass {name}={example}"
        )
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold whole numbers (int), got a {values.dtype} tensor; pass {name}={example}")
        values = values.reshape(-1).tolist()
    out = []
    for v in values:
        if not _is_int(v):
            raise TypeError(
                f"{name} must hold whole numbers (int), got {v!r} ({type(v).__name__}); pass {name}={example}"
            )
        v = int(v)
        if allow_negative and -n <= v < 0:
            v += n
        if not 0 <= v < n:
            lo = f"-{n}..-1 or " if allow_negative else ""
            who = owner or ("the prompts have" if what == "positions" else "this model has")
            raise ValueError(f"{name}: {v} is out of range; {who} {what} {lo}0..{n - 1}")
        out.append(v)
    if not out:
        raise ValueError(f"{name} is empty: nothing to compute; pass None for all {what}, or e.g. {name}={example}")
    return sorted(set(out))


def layer_list(model: Model, layers: Any, name: str = "layers") -> list[int]:
    """Every layer for ``None``; else sorted unique layer indices, checked against the model."""
    n = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n))
    return int_list(layers, name, n=n, what="layers", example=f"[0, {n - 1}]")


def n_kv_heads(model: Model) -> int:
    """Key/value heads per layer (``n_heads`` on models without grouped-query attention)."""
    return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)


def head_list(model: Model, heads: Any, *, kv: bool = False, name: str = "heads") -> list[int]:
    """Every head for ``None``; else sorted unique head indices within one layer."""
    n = n_kv_heads(model) if kv else int(model.cfg.n_heads)
    if heads is None:
        return list(range(n))
    what = "key/value heads per layer" if kv else "heads per layer"
    return int_list(heads, name, n=n, what=what, example="[0, 1]")


def position_list(n_pos: int, positions: Any, name: str = "positions") -> list[int]:
    """Every position for ``None``; else sorted unique positions (negative ones from the end)."""
    if positions is None:
        return list(range(n_pos))
    return int_list(positions, name, n=n_pos, what="positions", example="[0, -1]", allow_negative=True)


def token_tensor(tokens: Any, model: Optional[Model] = None, name: str = "tokens") -> torch.Tensor:
    """A ``[batch, pos]`` integer token tensor, checked against the model's vocabulary and context."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"{name} must be a [batch, pos] torch tensor of token ids, got {type(tokens).__name__}; "
            "use model.to_tokens(prompts)"
        )
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}; use model.to_tokens(prompts)")
    if tokens.ndim != 2:
        raise ValueError(
            f"{name} must be [batch, pos], got shape {tuple(tokens.shape)}; "
            "a single prompt is tokens[None] or model.to_tokens(prompt)"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)}): give at least one prompt of one token")
    if model is not None:
        vocab = int(model.cfg.d_vocab)
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab}): min {lo}, max {hi}")
        n_ctx = int(model.cfg.n_ctx)
        if tokens.shape[1] > n_ctx:
            raise ValueError(f"{name} has {tokens.shape[1]} positions, more than the model's context (n_ctx={n_ctx})")
    return tokens.long()


def token_pair(clean: Any, corrupted: Any, model: Optional[Model] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted token tensors of one shape (patching pairs them row by row)."""
    clean = token_tensor(clean, model, "clean")
    corrupted = token_tensor(corrupted, model, "corrupted")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)} differ in shape; "
            "patching pairs them row by row and position by position, so build prompts of equal token length "
            "(e.g. mechlib.ioi.make_ioi_dataset)"
        )
    return clean, corrupted


def str_list(values: Any, name: str, *, min_len: int = 1) -> list[str]:
    """A list of strings; a bare ``str`` is refused (it would be read as a list of letters)."""
    if isinstance(values, str):
        raise TypeError(
            f"{name} must be a list of strings, got the single string {values!r}; "
            f"pass {name}={values.split()!r} if you meant its words"
        )
    if not isinstance(values, Sequence) and not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    out = list(values)
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold strings only, got {bad[0]!r} ({type(bad[0]).__name__})")
    if len(out) < min_len:
        raise ValueError(f"{name} needs at least {min_len} entries, got {len(out)}")
    return out


def choice(value: Any, name: str, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options`` (strings), else ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def parse_head(label: str | tuple[int, int]) -> tuple[int, int]:
    """``"L5H1"``, ``"5.1"``, ``(5, 1)`` or ``[5, 1]`` -> ``(5, 1)``; anything else is an error.

    Strict: ``"L0H1x"``, ``"L1.5H2"``, ``(1.0, 2)``, ``(True, 1)`` and negative indices are refused
    (``ValueError`` for a malformed label or a negative index, ``TypeError`` for another type), never
    read as the nearest head.
    """
    if isinstance(label, (tuple, list)):
        if len(label) != 2:
            raise ValueError(f"a head is (layer, head), got {label!r} with {len(label)} entries")
        try:
            layer, head = whole(label[0], "the head's layer"), whole(label[1], "the head's index")
        except TypeError as exc:
            raise TypeError(f"cannot read a head from {label!r}: {exc}") from None
        if layer < 0 or head < 0:
            raise ValueError(f"a head's layer and index are non-negative, got {label!r}")
        return layer, head
    if not isinstance(label, str):
        raise TypeError(f"a head is 'L5H1', '5.1' or (5, 1), got {label!r} ({type(label).__name__})")
    m = _HEAD_RE.fullmatch(label.strip())
    if m is None:
        raise ValueError(f"cannot read a head from {label!r}; write it as 'L5H1', '5.1' or (5, 1)")
    a, b = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    return int(a), int(b)


_HEAD_RE = re.compile(r"[Ll]([0-9]+)[Hh]([0-9]+)|([0-9]+)\.([0-9]+)")


def is_head(value: Any) -> bool:
    """Whether ``value`` names one head (``"L5H1"`` or ``(5, 1)``) rather than a list of heads."""
    return isinstance(value, str) or (isinstance(value, tuple) and len(value) == 2 and all(_is_int(x) for x in value))


def head_specs(model: Model, heads: Any, name: str = "heads") -> list[tuple[int, int]]:
    """``"L5H1"`` / ``(5, 1)`` or a list of them as unique ``(layer, head)`` pairs (in the given
    order), read by :func:`parse_head` and checked against the model."""
    if heads is None:
        raise TypeError(f"{name} must be heads like ['L5H1', (5, 1)], got None")
    if is_head(heads):
        heads = [heads]
    if not isinstance(heads, Iterable) or isinstance(heads, torch.Tensor):
        raise TypeError(f"{name} must be heads like ['L5H1', (5, 1)], got {heads!r} ({type(heads).__name__})")
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    out: list[tuple[int, int]] = []
    for h in heads:
        try:
            layer, head = parse_head(h)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"{name}: head {h!r}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}"
            )
        if not 0 <= head < n_heads:
            raise ValueError(
                f"{name}: head {h!r}: head {head} is out of range; this model has heads 0..{n_heads - 1} per layer"
            )
        out.append((layer, head))
    if not out:
        raise ValueError(f"{name} is empty; give at least one head, e.g. {name}=['L0H1'] or [(0, 1)]")
    return list(dict.fromkeys(out))


def metric_values(out: Any, logits: torch.Tensor, name: str) -> torch.Tensor:
    """A metric's output, checked: a finite floating-point scalar or ``[batch]`` tensor.

    ``out`` is what the metric returned for ``logits`` ``[batch, pos, vocab]``; plain Python
    numbers become 0-d float tensors. Raises ``TypeError`` (not a number, an integer or bool
    tensor) or ``ValueError`` (wrong shape, NaN or infinite values) naming the metric.
    """
    batch = int(logits.shape[0])
    if not isinstance(out, torch.Tensor) and hasattr(out, "__array__") and not isinstance(out, numbers.Number):
        out = torch.as_tensor(out)  # numpy arrays
    if isinstance(out, torch.Tensor):
        if not (out.is_floating_point() or out.is_complex()):
            raise TypeError(
                f"metric {name!r} returned a {out.dtype} tensor; a metric must return floats such as a logit "
                "difference or a probability (integer counts or votes have no gradient and are usually a mistake; "
                "if you mean them, return them .float())"
            )
        if out.is_complex():
            raise TypeError(f"metric {name!r} returned a complex tensor ({out.dtype}); return real floats")
    elif isinstance(out, bool) or not isinstance(out, numbers.Real):
        raise TypeError(f"metric {name!r} returned {type(out).__name__} ({out!r}), not a float tensor or number")
    else:
        out = torch.tensor(float(out))
    if not (out.ndim == 0 or (out.ndim == 1 and out.shape[0] == batch)):
        raise ValueError(
            f"metric {name!r} returned shape {tuple(out.shape)} for logits of shape {tuple(logits.shape)}; a metric "
            f"must return a scalar or one value per prompt [batch={batch}] (e.g. reduce over the vocabulary and "
            "positions, then .mean() or not)"
        )
    finite = torch.isfinite(out.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        cause = (
            "the logits it was given are not finite either"
            if not bool(torch.isfinite(logits.detach()).all())
            else "from finite logits"
        )
        raise ValueError(
            f"metric {name!r} returned {bad} NaN or infinite value(s) ({cause}); a patching result built "
            "on it would be meaningless. Check the metric (a division by zero, log of 0?)"
        )
    return out


def span(start: Any, end: Any, n: int, name: str = "span") -> tuple[int, int]:
    """A half-open token span ``[start, end)`` inside ``n`` tokens, non-empty, as two ints."""
    s = whole(start, f"{name} start")
    e = whole(end, f"{name} end")
    if not 0 <= s < e <= n:
        raise ValueError(f"{name} [{s}, {e}) is not a non-empty span inside {n} tokens (need 0 <= start < end <= {n})")
    return s, e


def prompt_positions(pos: Any, batch: int, n_pos: int, name: str = "pos") -> torch.Tensor:
    """One position per prompt as a ``[batch]`` long tensor: an int for all, or ``batch`` ints
    (a list or an integer tensor); negative ones count from the end; each checked in range."""
    if isinstance(pos, torch.Tensor):
        if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise TypeError(f"{name} must hold whole numbers (positions), got a {pos.dtype} tensor")
        p = pos.detach().long().flatten().cpu()
    elif isinstance(pos, (list, tuple)):
        p = torch.tensor([whole(x, name) for x in pos], dtype=torch.long)
    else:
        p = torch.tensor([whole(pos, name)], dtype=torch.long)
    if p.numel() == 1:
        p = p.repeat(batch)
    if p.numel() != batch:
        raise ValueError(f"{name}: got {p.numel()} positions for {batch} prompts; give one position or one per prompt")
    p = torch.where(p < 0, p + n_pos, p)
    if bool(((p < 0) | (p >= n_pos)).any()):
        raise ValueError(
            f"{name}: positions must lie in [-{n_pos}, {n_pos}) for prompts of {n_pos} tokens, "
            f"got {pos if not isinstance(pos, torch.Tensor) else pos.tolist()}"
        )
    return p


def folded_model(model: Model, operation: str, name: str = "model") -> None:
    """Refuse a model whose final norm is not folded into the unembedding (as TransformerLens's DLA does).

    Direct logit attribution reads each component through the frozen final norm and ``W_U``; that is the
    model's logit only in compatibility mode (``enable_compatibility_mode()``: the final norm's weight and
    bias folded into ``W_U``/``b_U``, ``W_U`` centred). Outside it the numbers would be silently wrong.

    Raises:
        ValueError: naming ``name``, ``operation`` and the fix.
    """
    fix = (
        "load it with mechlib.load_model(...) (which enables compatibility mode) or call "
        "model.enable_compatibility_mode() with its default weight processing first"
    )
    if not getattr(model, "compatibility_mode", False):
        raise ValueError(f"{name} is not in compatibility mode, so {operation} would give wrong numbers; {fix}")
    ln_final = getattr(model, "ln_final", None)
    weight = getattr(ln_final, "weight", None)
    if isinstance(weight, torch.Tensor):
        identity = (
            torch.zeros_like(weight) if getattr(model.cfg, "rmsnorm_uses_offset", False) else torch.ones_like(weight)
        )
        if not torch.equal(weight, identity):
            raise ValueError(f"{name}'s final norm weight is not folded into W_U, so {operation} would be wrong; {fix}")
    bias = getattr(ln_final, "bias", None)
    if isinstance(bias, torch.Tensor) and bool(bias.detach().any()):
        raise ValueError(f"{name}'s final norm bias is not folded into b_U, so {operation} would be wrong; {fix}")
