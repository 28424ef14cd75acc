"""mechlib.mlp_probe: scikit-learn's MLPClassifier recipe, batched over problems, against
scikit-learn itself (held-out accuracy on the same problems) and against itself (a problem alone
or in a batch)."""

import warnings

import numpy as np
import pytest
import torch

from mechlib.mlp_probe import fit_mlp


def _teacher(n=3000, d=40, k=6, seed=0):
    """Labels from a random one-hidden-layer teacher plus noise: a probe can learn them, not perfectly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w1, w2 = torch.randn(d, 16, generator=g), torch.randn(16, k, generator=g)
    y = (torch.tanh(x @ w1) @ w2 + 0.5 * torch.randn(n, k, generator=g)).argmax(-1)
    return x, y


@pytest.mark.parametrize("early_stopping", [True, False])
def test_held_out_accuracy_matches_scikit_learn(early_stopping):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _teacher()
    train = torch.arange(len(y)) < 2000
    seeds = [0, 1, 2]
    ours = fit_mlp(
        x[None],
        y.expand(3, -1),
        train.expand(3, -1),
        n_classes=6,
        features=[0, 0, 0],
        seeds=seeds,
        early_stopping=early_stopping,
        max_iter=120,
    )
    ours_acc = (ours.predict(x[None])[:, 2000:] == y[2000:]).float().mean(1).numpy()
    theirs_acc = []
    for s in seeds:
        clf = MLPClassifier(
            hidden_layer_sizes=(64,), early_stopping=early_stopping, max_iter=120, random_state=s, n_iter_no_change=10
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = make_pipeline(StandardScaler(), clf).fit(x[:2000].numpy(), y[:2000].numpy())
        theirs_acc.append((clf.predict(x[2000:].numpy()) == y[2000:].numpy()).mean())
    majority = float((y[2000:] == y[:2000].mode().values).float().mean())
    assert min(ours_acc) > majority + 0.2, (ours_acc, majority)
    assert abs(float(np.mean(ours_acc)) - float(np.mean(theirs_acc))) < 0.03, (ours_acc, theirs_acc)
    if early_stopping:
        assert bool(ours.stopped.all()) and int(ours.n_epochs.max()) < 120
        assert 0.4 < float(ours.best_score.min()) <= 1.0, "best validation accuracy"


def test_a_problem_alone_equals_the_problem_in_a_batch():
    x, y = _teacher(n=800, d=12, k=4, seed=1)
    g = torch.Generator().manual_seed(5)
    xs = torch.stack([x, x + 0.3 * torch.randn(x.shape, generator=g)])
    ys = torch.stack([y, y.roll(7)])
    train = torch.stack([torch.arange(800) < 600, torch.arange(800) >= 200])
    both = fit_mlp(xs, ys, train, n_classes=4, seeds=[3, 4], max_iter=40)
    alone = fit_mlp(xs[1:], ys[1:], train[1:], n_classes=4, seeds=[4], max_iter=40)
    assert int(both.n_epochs[1]) == int(alone.n_epochs[0])
    assert torch.allclose(both.w1[1], alone.w1[0], atol=1e-4) and torch.allclose(both.w2[1], alone.w2[0], atol=1e-4)
    assert torch.equal(both.predict(xs)[1], alone.predict(xs[1:])[0])
    assert not torch.allclose(both.w1[0], both.w1[1]), "different problems and seeds train different probes"


def test_classes_absent_from_training_are_never_predicted_and_bad_input_is_refused():
    x, y = _teacher(n=600, d=8, k=5, seed=2)
    train = (torch.arange(600) < 400) & (y != 4)
    fit = fit_mlp(x[None], y[None], train[None], n_classes=5, max_iter=30)
    assert not bool((fit.predict(x[None]) == 4).any()) and fit.b2[0, 4] == float("-inf")
    with pytest.raises(ValueError, match="one class only"):
        fit_mlp(x[None], torch.zeros(1, 600, dtype=torch.long), train[None], n_classes=2)
    with pytest.raises(TypeError, match="y must hold integer class indices"):
        fit_mlp(x[None], y[None].float(), train[None], n_classes=5)
    with pytest.raises(ValueError, match="seeds must hold one seed per problem"):
        fit_mlp(x[None], y[None], train[None], n_classes=5, seeds=[0, 1])
    with pytest.raises(ValueError, match="validation_fraction"):
        fit_mlp(x[None], y[None], train[None], n_classes=5, validation_fraction=0.0)
    with pytest.raises(ValueError, match="y must hold class indices in 0..4"):
        fit_mlp(x[None], y[None] + 1, train[None], n_classes=5)
