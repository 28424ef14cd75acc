"""mechlib.logistic against scikit-learn's StandardScaler + LogisticRegression, run to convergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mechlib.logistic import fit_logistic


def _problem(K, seed=0, n=300, d=12):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g)
    y = (x0[:, :3] @ torch.randn(3, K, generator=g) + torch.randn(n, K, generator=g)).argmax(-1)
    x = x0 * torch.linspace(0.2, 4, d) + torch.linspace(-3, 3, d)  # unstandardised on purpose
    train = torch.rand(n, generator=g) < 0.7
    return x, y, train


def _sklearn(x, y, train, C):
    sk = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=100000, tol=1e-12))
    sk.fit(x[train].numpy(), y[train].numpy())
    sc, lr = sk[0], sk[-1]
    W = lr.coef_.T / sc.scale_[:, None]
    return sk, W, lr.intercept_ - sc.mean_ @ W


@pytest.mark.parametrize("K,C", [(4, 1.0), (5, 0.1), (2, 1.0), (2, 0.3)])
def test_equals_sklearn_at_convergence(K, C):
    x, y, train = _problem(K, seed=K)
    fit = fit_logistic(x[None], y[None], train[None], n_classes=K, C=C, dtype=torch.float64)
    sk, W, b = _sklearn(x, y, train, C)
    ours_W, ours_b = fit.weight[0].numpy(), fit.bias[0].numpy()
    if K == 2:  # scikit-learn's binomial model: one vector, the difference of the two classes'
        ours_W, ours_b = ours_W[:, 1:] - ours_W[:, :1], ours_b[1:] - ours_b[:1]
    assert bool(fit.converged.all())
    np.testing.assert_allclose(ours_W, W, atol=2e-3 * np.abs(W).max())
    np.testing.assert_allclose(ours_b, b, atol=2e-3 * max(1.0, np.abs(b).max()))
    assert (fit.predict(x[None])[0].numpy() == sk.predict(x.numpy())).mean() >= 0.995


def test_problems_fitted_in_one_call_equal_each_fitted_alone():
    """Two feature matrices; three problems on the first (other splits, other labels), one on the second."""
    probs = [_problem(4, seed=s) for s in range(4)]
    x = torch.stack([probs[0][0], probs[3][0]])
    y = torch.stack([probs[0][1], probs[1][1], probs[2][1], probs[3][1]])
    train = torch.stack([p[2] for p in probs])
    feats = [0, 0, 0, 1]
    together = fit_logistic(x, y, train, n_classes=4, features=feats, dtype=torch.float64)
    assert bool(together.converged.all())
    for i, f in enumerate(feats):
        alone = fit_logistic(x[f : f + 1], y[i : i + 1], train[i : i + 1], n_classes=4, dtype=torch.float64)
        torch.testing.assert_close(together.weight[i], alone.weight[0], atol=1e-4, rtol=1e-3)
        one = together[i]
        assert torch.equal(one.predict(x)[0], alone.predict(x[f : f + 1])[0])
    # float32 (the default) finds the same probes to float32's precision
    single = fit_logistic(x, y, train, n_classes=4, features=feats)
    torch.testing.assert_close(single.weight.double(), together.weight, atol=2e-3, rtol=2e-2)


def test_a_class_absent_from_training_is_never_predicted():
    x, y, train = _problem(4, seed=1)
    train = train & (y != 3)
    fit = fit_logistic(x[None], y[None], train[None], n_classes=4)
    assert bool(fit.converged.all())
    assert not bool((fit.predict(x[None]) == 3).any())
    assert float(fit.bias[0, 3]) == float("-inf")


def test_bad_input_is_refused():
    x, y, train = _problem(3)
    with pytest.raises(ValueError, match=r"x must be \[groups, n, d\]"):
        fit_logistic(x, y[None], train[None], n_classes=3)
    with pytest.raises(ValueError, match="class indices in 0..1"):
        fit_logistic(x[None], y[None], train[None], n_classes=2)
    with pytest.raises(TypeError, match="integer class indices"):
        fit_logistic(x[None], y[None].float(), train[None], n_classes=3)
    with pytest.raises(ValueError, match="one class only"):
        fit_logistic(x[None], torch.zeros_like(y)[None], train[None], n_classes=3)
    with pytest.raises(ValueError, match="no training rows"):
        fit_logistic(x[None], y[None], torch.zeros_like(train)[None], n_classes=3)
    with pytest.warns(UserWarning, match="did not converge"):
        fit_logistic(x[None], y[None], train[None], n_classes=3, max_iter=2)
    with pytest.raises(ValueError, match="pass features="):
        fit_logistic(x[None], torch.stack([y, y]), torch.stack([train, train]), n_classes=3)
    with pytest.raises(ValueError, match="features must be at most 0"):
        fit_logistic(x[None], y[None], train[None], n_classes=3, features=[1])
