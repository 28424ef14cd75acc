"""ROME's token roles: which positions of a fact's prompt each averaged causal-trace row covers.

:data:`TOKEN_ROLES` (in plot order), :func:`role_positions` (positions per role),
:func:`token_roles` (one label per position) and :func:`role_means` (a per-position quantity
averaged per role).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float

__all__ = ["BEFORE_SUBJECT", "TOKEN_ROLES", "role_means", "role_positions", "token_roles"]

#: The token roles of ROME's averaged causal-trace figures, in the order they are plotted
#: (top to bottom). See :func:`role_positions` for which positions each role covers.
TOKEN_ROLES: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)

#: The role :func:`token_roles` gives to tokens before the subject. ROME's figures do not
#: average these, so it is not one of :data:`TOKEN_ROLES`.
BEFORE_SUBJECT = "before subject"


def _check_span(n_tokens: int, subject_start: int, subject_end: int) -> None:
    if not (0 <= subject_start < subject_end <= n_tokens):
        raise ValueError(
            f"subject span [{subject_start}, {subject_end}) does not fit a prompt of {n_tokens} tokens; "
            "need 0 <= start < end <= n_tokens"
        )


def role_positions(n_tokens: int, subject_start: int, subject_end: int) -> dict[str, list[int]]:
    """The positions each of ROME's token roles averages over (roles may share a position).

    With the subject at ``[s, e)`` in a prompt of ``n`` tokens:

    * ``first subject token``: ``[s]``
    * ``middle subject tokens``: ``s+1 .. e-2`` (empty for subjects of one or two tokens)
    * ``last subject token``: ``[e-1]``; for a one-token subject this is also the first subject
      token, as in ROME, where both rows read the same position
    * ``first subsequent token``: ``[e]`` (empty when the prompt ends with the subject)
    * ``further tokens``: ``e+1 .. n-2``
    * ``last token``: ``[n-1]``; it may coincide with the first subsequent token (subject
      just before the last token) or with the last subject token (prompt ends with the subject)

    Tokens before the subject belong to no role (ROME's figures leave them out).

    Example:
        >>> role_positions(8, 1, 4)["middle subject tokens"]
        [2]
        >>> role_positions(8, 1, 4)["further tokens"]
        [5, 6]
    """
    _check_span(n_tokens, subject_start, subject_end)
    s, e, n = subject_start, subject_end, n_tokens
    return {
        "first subject token": [s],
        "middle subject tokens": list(range(s + 1, e - 1)),
        "last subject token": [e - 1],
        "first subsequent token": [e] if e < n else [],
        "further tokens": list(range(e + 1, n - 1)),
        "last token": [n - 1],
    }


def token_roles(n_tokens: int, subject_start: int, subject_end: int) -> list[str]:
    """One role name per position, for labelling plots.

    Where :func:`role_positions` lets roles share a position, this gives each position one name,
    by precedence: ``last token`` > ``last subject token`` > ``first subject token`` >
    ``first subsequent token`` > ``middle subject tokens`` / ``further tokens``. So a one-token
    subject is the ``last subject token``; the prompt's final position is always the
    ``last token`` (even when it is the first token after the subject or, if the prompt ends
    with the subject, the last subject token). Positions before the subject are
    :data:`BEFORE_SUBJECT`.

    Example:
        >>> token_roles(6, 1, 3)
        ['before subject', 'first subject token', 'last subject token', 'first subsequent token', 'further tokens', 'last token']
    """
    _check_span(n_tokens, subject_start, subject_end)
    roles = [BEFORE_SUBJECT] * subject_start
    for p in range(subject_start, n_tokens):
        if p == n_tokens - 1:
            roles.append("last token")
        elif p == subject_end - 1:
            roles.append("last subject token")
        elif p == subject_start:
            roles.append("first subject token")
        elif p < subject_end:
            roles.append("middle subject tokens")
        elif p == subject_end:
            roles.append("first subsequent token")
        else:
            roles.append("further tokens")
    return roles


def role_means(
    values: Float[torch.Tensor, "... pos"],
    subject_start: int,
    subject_end: int,
) -> Float[torch.Tensor, "... 6"]:
    """Average a per-position quantity over each of :data:`TOKEN_ROLES`.

    The last axis of ``values`` is the position axis of one prompt (e.g. a causal trace
    ``[layer, pos]``). Returns the mean over :func:`role_positions` for each role, in
    :data:`TOKEN_ROLES` order; a role with no positions in this prompt is ``nan`` (average over
    prompts with ``torch.nanmean``).

    Example:
        >>> role_means(torch.tensor([0., 1., 2., 3., 4., 5.]), 1, 4)
        tensor([1., 2., 3., 4., nan, 5.])
    """
    values = torch.as_tensor(values)
    n = values.shape[-1]
    positions = role_positions(n, subject_start, subject_end)
    out = []
    for role in TOKEN_ROLES:
        pos = positions[role]
        if pos:
            out.append(values[..., pos].float().mean(dim=-1))
        else:
            out.append(torch.full(values.shape[:-1], math.nan, device=values.device))
    return torch.stack(out, dim=-1)
