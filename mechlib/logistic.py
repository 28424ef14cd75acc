"""Many multinomial logistic-regression probes, each fitted to convergence by its own full-batch L-BFGS.

A probing sweep fits the same kind of probe on every layer, for every seed's split, on the task and
on its control: dozens of small convex problems. scikit-learn's default stops at 300 iterations,
often before a control task has converged. :func:`fit_logistic` takes the problems as one batch
(each with its own training rows, labels and classes, several problems sharing a feature matrix)
and fits each with its own L-BFGS on its training rows only, to a gradient tolerance.

Each problem gets its own optimiser, not one L-BFGS over the sum of the objectives: the sum has one
minimum (the problems are independent), but a joint solver shares one step length and one curvature
history among problems of very different difficulty and runs every problem until the slowest has
converged; on SmolLM2's part-of-speech sweep that took several times the iterations, and the time,
of the problems fitted one by one.

The objective is scikit-learn's ``make_pipeline(StandardScaler(), LogisticRegression(C=C))``:
features standardised with the training rows' mean and (population) standard deviation, then
``C * sum_i CE(x_i W + b, y_i) + ||W||^2 / 2`` with the intercept unpenalised; a test checks the
coefficients against scikit-learn run to convergence. The objective is strictly convex, so the
solution does not depend on the solver. float32 by default, float64 on request.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(2, 60, 5, generator=g)              # two problems, 60 rows, 5 features
    >>> y = (x[..., 0] > 0).long()                           # the label is feature 0's sign
    >>> train = torch.arange(60) < 40                        # rows 0..39 train, 40..59 test
    >>> fit = fit_logistic(x, y, train.expand(2, -1), n_classes=2)
    >>> bool((fit.predict(x)[:, 40:] == y[:, 40:]).float().mean() > 0.9)
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from mechlib.validate import finite, whole

__all__ = ["LogisticFit", "fit_logistic"]


@dataclass
class LogisticFit:
    """Fitted probes, one per problem, in the original (unstandardised) feature space.

    Attributes:
        weight: ``[problems, d, classes]``.
        bias: ``[problems, classes]``; classes a problem never saw in training are ``-inf``.
        features: ``[problems]`` which feature matrix each problem was fitted on.
        grad_norm: ``[problems]`` the largest gradient entry of each objective at the solution
            (in units of the objective divided by ``C * n_train``).
        converged: ``[problems]`` whether that is below the tolerance.
        n_iter: ``[problems]`` L-BFGS iterations each problem ran.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    features: torch.Tensor
    grad_norm: torch.Tensor
    converged: torch.Tensor
    n_iter: torch.Tensor

    def logits(self, x: Float[torch.Tensor, "groups n d"]) -> Float[torch.Tensor, "problems n classes"]:
        """Each problem's logits on its own feature matrix ``x[features[p]]``."""
        x = x.to(self.weight.dtype)
        return torch.stack([x[int(g)] @ self.weight[p] + self.bias[p] for p, g in enumerate(self.features)])

    def predict(self, x: Float[torch.Tensor, "groups n d"]) -> Int[torch.Tensor, "problems n"]:
        return self.logits(x).argmax(-1)

    def __getitem__(self, p: int) -> "LogisticFit":
        """Problem ``p`` alone (its ``features`` index kept)."""
        sl = slice(p, p + 1)
        return LogisticFit(
            self.weight[sl], self.bias[sl], self.features[sl], self.grad_norm[sl], self.converged[sl], self.n_iter[sl]
        )


def fit_logistic(
    x: Float[torch.Tensor, "groups n d"],
    y: Int[torch.Tensor, "problems n"],
    train: Bool[torch.Tensor, "problems n"],
    *,
    n_classes: int,
    features: Optional[Sequence[int]] = None,
    C: float = 1.0,
    max_iter: int = 1000,
    tol: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> LogisticFit:
    """Fit one L2-regularised multinomial logistic regression per problem, on its training rows,
    each by its own L-BFGS (see the module's docstring for why not one joint solver).

    Args:
        x: ``[groups, n, d]`` feature matrices.
        y: ``[problems, n]`` class index of every row, ``0..n_classes-1``.
        train: ``[problems, n]`` which rows each problem trains on (the others are ignored here).
        n_classes: Number of classes; a problem whose training rows lack a class never predicts it
            (as scikit-learn, which only knows the classes it was fitted on).
        features: ``[problems]`` the feature matrix of each problem (default: problem ``p`` reads
            ``x[p]``, so ``groups == problems``).
        C: Inverse regularisation strength, as scikit-learn's ``C``.
        max_iter: L-BFGS iterations at most, per problem.
        tol: Convergence: a problem's largest gradient entry (of its objective divided by
            ``C * n_train``) at most ``tol`` (default ``1e-4`` in float32, ``1e-7`` in float64; on
            SmolLM2's part-of-speech probes ``1e-5`` moved no held-out accuracy by more than 0.004).
            Problems that do not get there are flagged (``converged``) and a warning says how many.
        dtype: ``torch.float32`` (default; the features are read at that precision) or
            ``torch.float64`` (slower; for agreement with scikit-learn to many digits).
        progress: Show a progress bar over the problems.

    Returns:
        A :class:`LogisticFit`.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be [groups, n, d], got shape {tuple(x.shape)}")
    G, n, d = x.shape
    if y.ndim != 2 or y.shape[1] != n or train.shape != y.shape:
        raise ValueError(f"y {tuple(y.shape)} and train {tuple(train.shape)} must both be [problems, n={n}]")
    P = y.shape[0]
    if features is None:
        if P != G:
            raise ValueError(f"{P} problems but {G} feature matrices: pass features=[...] (one index per problem)")
        features = list(range(P))
    feats = torch.as_tensor([whole(f, "features", minimum=0, maximum=G - 1) for f in features], dtype=torch.long)
    if feats.shape != (P,):
        raise ValueError(f"features must hold one index per problem ({P}), got {feats.numel()}")
    K = whole(n_classes, "n_classes", minimum=2)
    C = finite(C, "C", minimum=1e-12)
    max_iter = whole(max_iter, "max_iter", minimum=1)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    tol = (1e-4 if dtype == torch.float32 else 1e-7) if tol is None else finite(tol, "tol", minimum=0.0)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    if bool((y < 0).any()) or bool((y >= K).any()):
        raise ValueError(f"y must hold class indices in 0..{K - 1}")
    n_train = train.sum(1).to(dtype)
    if bool((n_train == 0).any()):
        raise ValueError("a problem has no training rows")
    xd = x.to(dtype)
    seen = (torch.nn.functional.one_hot(y, K).bool() & train[..., None]).any(1)  # [P, K] classes each trains on
    if bool((seen.sum(1) < 2).any()):
        raise ValueError("a problem's training rows hold one class only; there is nothing to fit")
    # The objective divided by C * n_train: the mean loss + ||W||^2 / (2 C n). With two classes
    # scikit-learn fits one weight vector v (the binomial model); the multinomial optimum has
    # w_1 = -w_0 = v / 2, so its penalty is halved: doubling it gives scikit-learn's solution.
    scale = torch.where(seen.sum(1) == 2, 2.0, 1.0).to(dtype) / (C * n_train)
    weight = torch.zeros(P, d, K, dtype=dtype)
    bias = torch.zeros(P, K, dtype=dtype)
    grad = torch.zeros(P, dtype=dtype)
    n_iter = torch.zeros(P, dtype=torch.long)
    for p in tqdm(range(P), desc="logistic probes", disable=not progress, leave=False):
        rows = train[p].nonzero().flatten()
        xr = xd[feats[p]][rows]
        # StandardScaler on the training rows: population standard deviation, 0 -> 1
        mean, std = xr.mean(0), xr.std(0, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        W, b, grad[p], n_iter[p] = _lbfgs((xr - mean) / std, y[p][rows], ~seen[p], float(scale[p]), max_iter, tol)
        weight[p] = W / std[:, None]
        bias[p] = (b - (mean[:, None] * weight[p]).sum(0)).masked_fill(~seen[p], float("-inf"))
    converged = grad <= tol * 10
    if not bool(converged.all()):
        warnings.warn(
            f"fit_logistic: {int((~converged).sum())} of {P} problems did not converge in {max_iter} "
            f"iterations (largest gradient {float(grad.max()):.2g} > tol {tol}); raise max_iter",
            stacklevel=2,
        )
    return LogisticFit(weight, bias, feats, grad, converged, n_iter)


def _lbfgs(
    z: torch.Tensor, target: torch.Tensor, absent: torch.Tensor, scale: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One problem on standardised rows ``z``: ``mean CE + scale * ||W||^2 / 2``, classes ``absent``
    from training masked out. Returns the weights, bias, largest gradient entry and iterations."""
    d, K = z.shape[1], absent.numel()
    W = torch.zeros(d, K, dtype=z.dtype, requires_grad=True)
    b = torch.zeros(K, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tol,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (z @ W + b).masked_fill(absent, float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, target) + 0.5 * scale * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        closure()
    grad = torch.maximum(W.grad.abs().max(), (b.grad * ~absent).abs().max()).detach()
    return W.detach(), b.detach(), grad, int(opt.state[opt._params[0]].get("n_iter", 0))
