"""Many one-hidden-layer MLP probes trained side by side: scikit-learn's ``MLPClassifier`` recipe,
batched over problems.

A probing sweep trains an MLP probe on every layer, for every seed's split, on the task and on its
control. scikit-learn trains them one at a time, and each of its minibatch steps is a few small
matrix multiplies wrapped in Python; :func:`fit_mlp` takes a step of every problem at once (one
batched multiply per layer of the probe), so a sweep's MLP probes cost about what one of them does.

The recipe is ``make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(hidden,),
alpha=alpha, early_stopping=..., n_iter_no_change=10))`` with scikit-learn's defaults:

* features standardised with the training rows' mean and population standard deviation;
* one hidden ReLU layer; Glorot-uniform initialisation (bound ``sqrt(6 / (fan_in + fan_out))``,
  biases too); softmax output over the classes the training rows hold (scikit-learn uses one
  logistic unit for two classes, the same family of classifiers);
* Adam (learning rate 1e-3, betas 0.9 / 0.999, eps 1e-8) on minibatches of ``min(200, n)`` rows,
  reshuffled every epoch; loss = mean cross-entropy + ``alpha / 2 * ||W||^2 / batch rows``;
* with ``early_stopping``: 10% of the training rows (stratified by class) held aside; training stops
  once their accuracy has not improved by ``tol`` for more than ``n_iter_no_change`` epochs, and the
  weights of the best epoch are kept. Without it: the same rule on the epoch's training loss.

Each problem draws its initialisation, validation rows and shuffles from its own generator
(``seeds``), so a problem's probe does not depend on which others share the call. The random
draws are torch's, not NumPy's: a probe is not scikit-learn's probe to the bit, but the same
procedure; the tests compare held-out accuracies with scikit-learn's on the same problems.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(1, 400, 2, generator=g)
    >>> y = ((x[..., 0] > 0) ^ (x[..., 1] > 0)).long()      # XOR: no linear probe can
    >>> train = torch.arange(400) < 300
    >>> fit = fit_mlp(x, y, train[None], n_classes=2, hidden=32)
    >>> bool((fit.predict(x)[0, 300:] == y[0, 300:]).float().mean() > 0.9)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from mechlib.validate import finite, whole

__all__ = ["MLPFit", "fit_mlp"]


@dataclass
class MLPFit:
    """Trained MLP probes, one per problem (weights act on standardised features).

    Attributes:
        w1, b1: ``[problems, d, hidden]``, ``[problems, hidden]``.
        w2, b2: ``[problems, hidden, classes]``, ``[problems, classes]`` (classes a problem never
            saw in training are ``-inf`` in ``b2``).
        mean, scale: ``[problems, d]`` each problem's standardisation (training rows).
        features: ``[problems]`` which feature matrix each problem reads.
        n_epochs: ``[problems]`` epochs each problem trained.
        best_score: ``[problems]`` the best validation accuracy (early stopping) or the lowest
            training loss (without).
        stopped: ``[problems]`` whether the stopping rule ended training before ``max_iter``.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    features: torch.Tensor
    n_epochs: torch.Tensor
    best_score: torch.Tensor
    stopped: torch.Tensor

    def logits(self, x: Float[torch.Tensor, "groups n d"]) -> Float[torch.Tensor, "problems n classes"]:
        """Each problem's logits on its own feature matrix ``x[features[p]]``."""
        z = (x.float()[self.features] - self.mean[:, None]) / self.scale[:, None]
        h = torch.relu(torch.baddbmm(self.b1[:, None], z, self.w1))
        return torch.baddbmm(self.b2[:, None], h, self.w2)

    def predict(self, x: Float[torch.Tensor, "groups n d"]) -> Int[torch.Tensor, "problems n"]:
        return self.logits(x).argmax(-1)

    def __getitem__(self, p: int) -> "MLPFit":
        """Problem ``p`` alone (its ``features`` index kept)."""
        sl = slice(p, p + 1)
        return MLPFit(*(getattr(self, f)[sl] for f in self.__dataclass_fields__))


def _stratified_holdout(rows: torch.Tensor, y: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """A mask over ``rows``: about ``fraction`` of each class's rows (at least one of a class with two or
    more rows, never all of a class), drawn with ``g``."""
    hold = torch.zeros(len(rows), dtype=torch.bool)
    labels = y[rows]
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            continue
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        hold[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    return hold


def fit_mlp(
    x: Float[torch.Tensor, "groups n d"],
    y: Int[torch.Tensor, "problems n"],
    train: Bool[torch.Tensor, "problems n"],
    *,
    n_classes: int,
    features: Optional[Sequence[int]] = None,
    seeds: Optional[Sequence[int]] = None,
    hidden: int = 64,
    alpha: float = 1e-4,
    max_iter: int = 300,
    early_stopping: bool = True,
    validation_fraction: float = 0.1,
    n_iter_no_change: int = 10,
    tol: float = 1e-4,
    batch_size: int = 200,
    learning_rate: float = 1e-3,
    progress: bool = False,
) -> MLPFit:
    """Train one MLP probe per problem on its training rows, all problems side by side (the
    recipe in the module's docstring).

    Args:
        x: ``[groups, n, d]`` feature matrices.
        y: ``[problems, n]`` class index of every row, ``0..n_classes-1``.
        train: ``[problems, n]`` which rows each problem trains on.
        n_classes: Number of classes (a problem never predicts a class its training rows lack).
        features: ``[problems]`` the feature matrix of each problem (default: problem ``p`` reads ``x[p]``).
        seeds: ``[problems]`` each problem's seed (initialisation, validation rows, shuffles); default 0.
        hidden: Hidden units.
        alpha: L2 penalty, as scikit-learn's ``alpha``.
        max_iter: Epochs at most.
        early_stopping: Stop on held-aside training rows' accuracy (else on the training loss).
        validation_fraction: Share of each problem's training rows held aside for early stopping.
        n_iter_no_change, tol: The stopping rule: more than ``n_iter_no_change`` epochs without an
            improvement of ``tol``.
        batch_size: Minibatch rows (``min(batch_size, n_fit)`` per problem).
        learning_rate: Adam's step size.
        progress: A bar over epochs.

    Returns:
        An :class:`MLPFit`.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be [groups, n, d], got shape {tuple(x.shape)}")
    G, n, d = x.shape
    if y.ndim != 2 or y.shape[1] != n or train.shape != y.shape:
        raise ValueError(f"y {tuple(y.shape)} and train {tuple(train.shape)} must both be [problems, n={n}]")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    P = y.shape[0]
    if features is None:
        if P != G:
            raise ValueError(f"{P} problems but {G} feature matrices: pass features=[...] (one index per problem)")
        features = list(range(P))
    feats = torch.as_tensor([whole(f, "features", minimum=0, maximum=G - 1) for f in features], dtype=torch.long)
    if feats.shape != (P,):
        raise ValueError(f"features must hold one index per problem ({P}), got {feats.numel()}")
    seeds = [0] * P if seeds is None else [whole(s, "seeds", minimum=0) for s in seeds]
    if len(seeds) != P:
        raise ValueError(f"seeds must hold one seed per problem ({P}), got {len(seeds)}")
    K = whole(n_classes, "n_classes", minimum=2)
    if bool((y < 0).any()) or bool((y >= K).any()):
        raise ValueError(f"y must hold class indices in 0..{K - 1}")
    H = whole(hidden, "hidden", minimum=1)
    alpha = finite(alpha, "alpha", minimum=0.0)
    max_iter = whole(max_iter, "max_iter", minimum=1)
    frac = finite(validation_fraction, "validation_fraction", minimum=0.0, maximum=0.5)
    patience = whole(n_iter_no_change, "n_iter_no_change", minimum=1)
    tol = finite(tol, "tol", minimum=0.0)
    bs_max = whole(batch_size, "batch_size", minimum=1)
    lr = finite(learning_rate, "learning_rate", minimum=1e-12)
    if not isinstance(early_stopping, bool):
        raise TypeError(f"early_stopping must be True or False, got {early_stopping!r}")
    if early_stopping and frac == 0:
        raise ValueError("early_stopping needs validation_fraction > 0")

    xf = x.float()
    seen = (torch.nn.functional.one_hot(y, K).bool() & train[..., None]).any(1)  # [P, K]
    if bool((seen.sum(1) < 2).any()):
        raise ValueError("a problem's training rows hold one class only; there is nothing to fit")
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    fit_rows, val_rows = [], []
    mean = torch.zeros(P, d)
    scale = torch.ones(P, d)
    w1, b1, w2, b2 = torch.zeros(P, d, H), torch.zeros(P, H), torch.zeros(P, H, K), torch.zeros(P, K)
    for p in range(P):
        rows = train[p].nonzero().flatten()
        if len(rows) < 2:
            raise ValueError(f"problem {p} has {len(rows)} training rows; it needs at least 2")
        xr = xf[feats[p]][rows]
        mean[p], std = xr.mean(0), xr.std(0, correction=0)
        scale[p] = torch.where(std > 0, std, torch.ones_like(std))
        # Glorot-uniform for ReLU networks (scikit-learn's _init_coef), weights then biases per layer
        for fan_in, fan_out, w, b in ((d, H, w1, b1), (H, K, w2, b2)):
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w[p] = torch.rand(fan_in, fan_out, generator=gens[p]) * 2 * bound - bound
            b[p] = torch.rand(fan_out, generator=gens[p]) * 2 * bound - bound
        hold = _stratified_holdout(rows, y[p], frac, gens[p]) if early_stopping else torch.zeros(len(rows), dtype=bool)
        fit_rows.append(rows[~hold])
        val_rows.append(rows[hold])
    b2 = b2.masked_fill(~seen, float("-inf"))
    n_fit = torch.tensor([len(r) for r in fit_rows])
    bsz = n_fit.clamp(max=bs_max)  # scikit-learn: min(batch_size, n_samples)
    n_steps = int(((n_fit + bsz - 1) // bsz).max())

    params = [w1, b1, w2, b2]
    m = [torch.zeros_like(t) for t in params]
    v = [torch.zeros_like(t) for t in params]
    t = torch.zeros(P)  # Adam's step count, per problem
    best = [t_.clone() for t_ in params]
    best_score = torch.full((P,), -math.inf if early_stopping else math.inf)
    no_improve = torch.zeros(P, dtype=torch.long)
    active = torch.ones(P, dtype=torch.bool)
    n_epochs = torch.zeros(P, dtype=torch.long)
    stopped = torch.zeros(P, dtype=torch.bool)
    absent = ~seen

    def standardised(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        z = xf[feats[:, None], rows.clamp(min=0)]  # [P, r, d]
        return ((z - mean[:, None]) / scale[:, None]) * valid[..., None]

    if early_stopping:
        nv = max(len(r) for r in val_rows)
        val_idx = torch.full((P, nv), -1, dtype=torch.long)
        for p, r in enumerate(val_rows):
            val_idx[p, : len(r)] = r
        val_ok = val_idx >= 0
        z_val = standardised(val_idx, val_ok)
        y_val = y.gather(1, val_idx.clamp(min=0))

    bar = tqdm(range(max_iter), desc="MLP probes", disable=not progress, leave=False)
    for _epoch in bar:
        order = torch.full((P, n_steps * int(bsz.max())), -1, dtype=torch.long)
        for p in range(P):
            if active[p]:
                perm = fit_rows[p][torch.randperm(int(n_fit[p]), generator=gens[p])]
                # scikit-learn's gen_batches: consecutive slices of min(batch_size, n) rows
                for j in range(0, int(n_fit[p]), int(bsz[p])):
                    chunk = perm[j : j + int(bsz[p])]
                    at = (j // int(bsz[p])) * int(bsz.max())
                    order[p, at : at + len(chunk)] = chunk
        epoch_loss = torch.zeros(P)
        width = int(bsz.max())
        for s in range(n_steps):
            idx = order[:, s * width : (s + 1) * width]
            ok = idx >= 0
            rows_here = ok.sum(1)
            step = active & (rows_here > 0)
            if not bool(step.any()):
                continue
            z = standardised(idx, ok)
            target = y.gather(1, idx.clamp(min=0))
            with torch.enable_grad():
                for q in params:
                    q.requires_grad_(True)
                h = torch.relu(torch.baddbmm(b1[:, None], z, w1))
                logits = torch.baddbmm(b2[:, None], h, w2)
                ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [P, r]
                denom = rows_here.clamp(min=1).float()
                loss = (ce * ok).sum(1) / denom + 0.5 * alpha * (w1.pow(2).sum((1, 2)) + w2.pow(2).sum((1, 2))) / denom
                grads = torch.autograd.grad(loss.sum(), params)
            for q in params:
                q.requires_grad_(False)
            epoch_loss += loss.detach() * rows_here * step
            t = t + step.float()
            bias1 = 1 - 0.9 ** t.clamp(min=1)
            bias2 = 1 - 0.999 ** t.clamp(min=1)
            step_size = lr * bias2.sqrt() / bias1
            for q, g, m_, v_ in zip(params, grads, m, v):
                g = torch.nan_to_num(g, nan=0.0)  # absent classes: -inf logits carry no gradient
                shape = (P,) + (1,) * (q.ndim - 1)
                on = step.view(shape)
                m_.copy_(torch.where(on, 0.9 * m_ + 0.1 * g, m_))
                v_.copy_(torch.where(on, 0.999 * v_ + 0.001 * g * g, v_))
                upd = step_size.view(shape) * m_ / (v_.sqrt() + 1e-8)
                q.sub_(torch.where(on & torch.isfinite(q), upd, torch.zeros_like(q)))
        n_epochs += active.long()
        if early_stopping:
            with torch.no_grad():
                h = torch.relu(torch.baddbmm(b1[:, None], z_val, w1))
                pred = torch.baddbmm(b2[:, None], h, w2).argmax(-1)
                score = ((pred == y_val) & val_ok).sum(1).float() / val_ok.sum(1).clamp(min=1)
            worse = score < best_score + tol
            better = score > best_score
        else:
            score = epoch_loss / n_fit
            worse = score > best_score - tol
            better = score < best_score
        no_improve = torch.where(active, torch.where(worse, no_improve + 1, torch.zeros_like(no_improve)), no_improve)
        keep = active & better
        best_score = torch.where(keep, score, best_score)
        if early_stopping:
            for q, bq in zip(params, best):
                bq.copy_(torch.where(keep.view((P,) + (1,) * (q.ndim - 1)), q, bq))
        done = active & (no_improve > patience)
        stopped |= done
        active &= ~done
        if not bool(active.any()):
            break
    bar.close()
    if early_stopping:
        w1, b1, w2, b2 = best
    return MLPFit(w1, b1, w2, b2.masked_fill(absent, float("-inf")), mean, scale, feats, n_epochs, best_score, stopped)
