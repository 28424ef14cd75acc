"""mechlib.toy: the 2-layer attention-only induction trainer (short runs only; the full run is a benchmark)."""

import pytest
import torch

from mechlib.toy import ToyConfig, repeat_task_batch, toy_cache_path, train_induction_model


def test_repeat_task_batch_holds_repeats_of_random_period():
    gen = torch.Generator().manual_seed(0)
    x = repeat_task_batch(16, 32, 256, gen)
    assert x.shape == (16, 32) and int(x.max()) < 256
    # every row holds a repeated bigram (the last repeat copied is never overwritten)
    periods = set()
    for row in x.tolist():
        found = [d for d in range(2, 31) for i in range(32 - d - 1) if row[i : i + 2] == row[i + d : i + d + 2]]
        assert found, row
        periods.add(found[0])
    assert len(periods) > 3  # the period is not fixed
    with pytest.raises(ValueError, match="fit"):
        repeat_task_batch(1, 8, 10, gen, long_repeat=(5, 5))


def test_training_is_deterministic_and_logged():
    cfg = ToyConfig(batch=8, eval_batch=4)
    a = train_induction_model(6, seed=1, config=cfg, log_every=3, progress=False)
    b = train_induction_model(6, seed=1, config=cfg, log_every=3, progress=False)
    assert a.steps == [0, 3, 6]
    assert [h.second for h in a.history] == [h.second for h in b.history]
    assert a.series("induction").shape == (3, 2, 4)
    assert a.history[-1].train_loss < 6.0 and not a.model.training
    assert a.phase_change_step() is None  # 6 steps: no induction yet
    assert set(a.scores()) == {"induction", "previous_token", "duplicate_token"}
    with pytest.raises(KeyError, match="not logged"):
        a.scores(step=4)
    s = a.summary()
    assert s["prev_token_head"].startswith("L0H") and s["induction_head"].startswith("L1H")


def test_phase_change_detection_on_a_synthetic_history():
    cfg = ToyConfig(batch=4, eval_batch=2)
    r = train_induction_model(2, seed=0, config=cfg, log_every=1, progress=False)
    r.history[1].second = 0.4 * r.history[1].first
    assert r.phase_change_step() == 1
    assert r.phase_change_step(ratio=0.1) is None


def test_a_cached_run_is_the_run_and_any_change_trains_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHLIB_CACHE", str(tmp_path))
    cfg = ToyConfig(batch=8, eval_batch=4)
    first = train_induction_model(6, seed=1, config=cfg, log_every=3, progress=False, cache=True)
    assert first.meta["cache"].startswith("trained and stored")
    path = toy_cache_path(6, seed=1, config=cfg, log_every=3)
    assert path.is_file() and not list(path.parent.glob("*.part"))  # written whole, no leftovers
    again = train_induction_model(6, seed=1, config=cfg, log_every=3, progress=False, cache=True)
    assert again.meta["cache"] == f"loaded from {path}"
    fresh = train_induction_model(6, seed=1, config=cfg, log_every=3, progress=False)  # what it stands for
    assert "cache" not in fresh.meta
    for a, b in ((again, first), (again, fresh)):
        assert a.steps == b.steps and [h.second for h in a.history] == [h.second for h in b.history]
        for name in ("induction", "previous_token"):
            assert torch.equal(a.series(name), b.series(name))
        assert torch.equal(a.eval_tokens, b.eval_tokens)
        for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
    assert not again.model.training
    # another seed, step count, config or logging interval is another run
    others = {
        toy_cache_path(6, seed=2, config=cfg, log_every=3),
        toy_cache_path(7, seed=1, config=cfg, log_every=3),
        toy_cache_path(6, seed=1, config=ToyConfig(batch=9, eval_batch=4), log_every=3),
        toy_cache_path(6, seed=1, config=cfg, log_every=2),
    }
    assert path not in others and len(others) == 4
