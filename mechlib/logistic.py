"""Many multinomial logistic-regression probes fitted at once: one batched, full-batch L-BFGS.

A probing sweep fits the same kind of probe on every layer, for every seed's split, on the task and
on its control: dozens of small convex problems. Fitted one by one with scikit-learn they dominate
a notebook's time (each runs hundreds of L-BFGS iterations with per-call overhead, and the control
task often stops at ``max_iter`` before converging). :func:`fit_logistic` solves them together: the
problems' features are stacked, each problem has its own training rows, labels and classes, and
one L-BFGS minimises the sum of their objectives (which are independent, so the joint minimum is
each problem's own minimum).

The objective is scikit-learn's ``make_pipeline(StandardScaler(), LogisticRegression(C=C))``:
features standardised with the training rows' mean and (population) standard deviation, then
``C * sum_i CE(x_i W + b, y_i) + ||W||^2 / 2`` with the intercept unpenalised; a test checks the
coefficients against scikit-learn run to convergence. The objective is strictly convex, so the
solution does not depend on the solver. Problems on the same features (a layer's activations under
several splits and label sets) read them once per step, each problem's standardisation folded into
its weights; float32 by default, float64 on request.

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
        n_iter: L-BFGS iterations run.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    features: torch.Tensor
    grad_norm: torch.Tensor
    converged: torch.Tensor
    n_iter: int

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
            self.weight[sl], self.bias[sl], self.features[sl], self.grad_norm[sl], self.converged[sl], self.n_iter
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
) -> LogisticFit:
    """Fit one L2-regularised multinomial logistic regression per problem, on its training rows.

    Problems that share a feature matrix (one layer's activations, with several seeds' splits and
    the task and control labels) read it once per step: each problem's standardisation is folded
    into its weights, so the features are never copied per problem.

    Args:
        x: ``[groups, n, d]`` feature matrices.
        y: ``[problems, n]`` class index of every row, ``0..n_classes-1``.
        train: ``[problems, n]`` which rows each problem trains on (the others are ignored here).
        n_classes: Number of classes; a problem whose training rows lack a class never predicts it
            (as scikit-learn, which only knows the classes it was fitted on).
        features: ``[problems]`` the feature matrix of each problem (default: problem ``p`` reads
            ``x[p]``, so ``groups == problems``).
        C: Inverse regularisation strength, as scikit-learn's ``C``.
        max_iter: L-BFGS iterations at most (for all problems together).
        tol: Convergence: every problem's largest gradient entry (of its objective divided by
            ``C * n_train``) at most ``tol`` (default ``1e-4`` in float32, ``1e-7`` in float64; on
            SmolLM2's part-of-speech probes ``1e-5`` moved no held-out accuracy by more than 0.004).
            Problems that do not get there are flagged (``converged``) and a warning says how many.
        dtype: ``torch.float32`` (default; the features are read at that precision) or
            ``torch.float64`` (slower; for agreement with scikit-learn to many digits).

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
    w = train.to(dtype)
    n_train = w.sum(1)
    if bool((n_train == 0).any()):
        raise ValueError("a problem has no training rows")
    xd = x.to(dtype)
    # per-problem standardisation over its training rows (StandardScaler: population std, 0 -> 1)
    mean = torch.stack([(w[p, :, None] * xd[feats[p]]).sum(0) for p in range(P)]) / n_train[:, None]
    var = torch.stack([(w[p, :, None] * (xd[feats[p]] - mean[p]) ** 2).sum(0) for p in range(P)]) / n_train[:, None]
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    onehot = torch.nn.functional.one_hot(y, K).to(dtype)
    seen = (onehot * w[..., None]).sum(1) > 0  # [P, K] classes each problem trains on
    if bool((seen.sum(1) < 2).any()):
        raise ValueError("a problem's training rows hold one class only; there is nothing to fit")
    # The objective divided by C * n_train: the mean loss + ||W||^2 / (2 C n). With two classes
    # scikit-learn fits one weight vector v (the binomial model); the multinomial optimum has
    # w_1 = -w_0 = v / 2, so its penalty is halved: doubling it gives scikit-learn's solution.
    scale = torch.where(seen.sum(1) == 2, 2.0, 1.0).to(dtype) / (C * n_train)
    order = [torch.nonzero(feats == g).flatten() for g in range(G)]  # problems per feature matrix
    groups = [(g, idx) for g, idx in enumerate(order) if idx.numel()]

    W = torch.zeros(P, d, K, dtype=dtype, requires_grad=True)  # in standardised units
    b = torch.zeros(P, K, dtype=dtype, requires_grad=True)

    def objective() -> torch.Tensor:
        Wr = W / std[..., None]  # raw-feature weights: z W = x (W / std) - (mean / std) W
        br = b - (mean[..., None] * Wr).sum(1)
        total = 0.5 * (scale * W.pow(2).sum((1, 2))).sum()
        for g, idx in groups:
            m = idx.numel()
            logits = (xd[g] @ Wr[idx].permute(1, 0, 2).reshape(d, m * K)).view(n, m, K) + br[idx]
            logp = logits.masked_fill(~seen[idx], float("-inf")).log_softmax(-1).masked_fill(~seen[idx], 0.0)
            ce = -(logp * onehot[idx].transpose(0, 1)).sum(-1)  # [n, m]
            total = total + ((ce * w[idx].T).sum(0) / n_train[idx]).sum()
        return total

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
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        opt.zero_grad()
        objective().backward()
    grad = torch.maximum(W.grad.abs().amax((1, 2)), (b.grad * seen).abs().amax(1)).detach()
    converged = grad <= tol * 10
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    if not bool(converged.all()):
        warnings.warn(
            f"fit_logistic: {int((~converged).sum())} of {P} problems did not converge in {max_iter} "
            f"iterations (largest gradient {float(grad.max()):.2g} > tol {tol}); raise max_iter",
            stacklevel=2,
        )
    with torch.no_grad():
        weight = W.detach() / std[..., None]
        bias = b.detach() - (mean[..., None] * weight).sum(1)
        bias = bias.masked_fill(~seen, float("-inf"))
    return LogisticFit(weight, bias, feats, grad, converged, n_iter)
