"""Train a 2-layer attention-only model until induction heads form (Olsson et al. 2022).

The training data are random tokens holding repeated segments of RANDOM period: per sequence one
long repeat (length 5-15) and two short ones (length 2-4) copied to random later positions. With
a fixed period the model can learn a positional look-back instead of induction; the short
repeats keep it honest.

During training the model is measured every ``log_every`` steps on a fixed batch of repeated
random tokens (:func:`mechlib.induction.repeated_tokens`, two halves of ``n_ctx // 2``): loss on
the first and second repeat and every head's induction / previous-token / duplicate-token score.
The second-repeat loss collapses abruptly (the phase change) when a previous-token head appears
in layer 0 and induction heads in layer 1.

A run is deterministic (one torch thread), so ``cache=True`` keeps it in ``$MECHLIB_CACHE/toy``
keyed by everything that decides it (steps, seed, config, logging, threads, the torch and
TransformerLens versions, and the source of this module and of the code it measures with): the
same call again, e.g. notebook 01 on another model, loads the run instead of training for a minute.
Any change to those trains afresh.

Example:
    >>> result = train_induction_model(steps=20, log_every=10, progress=False)
    >>> [r.step for r in result.history]
    [0, 10, 20]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Int

from mechlib import induction, models
from mechlib.induction import HEAD_KINDS, head_scores, repeat_loss, repeated_tokens
from mechlib.models import random_model
from mechlib.results import Grid
from mechlib.types import Model

__all__ = ["ToyConfig", "ToyLog", "ToyResult", "repeat_task_batch", "toy_cache_path", "train_induction_model"]


@dataclass(frozen=True)
class ToyConfig:
    """Model and training settings (defaults: the recipe measured on this CPU)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    d_vocab: int = 256
    n_ctx: int = 32
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    long_repeat: tuple[int, int] = (5, 15)
    short_repeat: tuple[int, int] = (2, 4)
    n_short: int = 2
    eval_batch: int = 64


def repeat_task_batch(
    batch: int,
    n_ctx: int,
    d_vocab: int,
    generator: torch.Generator,
    *,
    long_repeat: tuple[int, int] = (5, 15),
    short_repeat: tuple[int, int] = (2, 4),
    n_short: int = 2,
) -> Int[torch.Tensor, "batch n_ctx"]:
    """Random tokens with one long and ``n_short`` short repeated segments of random length.

    Each repeat copies a segment of length ``L`` (uniform in the given inclusive range) from a
    random start ``a`` to a random later start ``b >= a + L``; later repeats may overwrite earlier
    ones.
    """
    x = torch.randint(0, d_vocab, (batch, n_ctx), generator=generator)
    ranges = [long_repeat] + [short_repeat] * n_short
    for i in range(batch):
        for lo, hi in ranges:
            L = int(torch.randint(lo, hi + 1, (1,), generator=generator))
            if 2 * L > n_ctx:
                raise ValueError(f"a repeat of length {L} does not fit twice in n_ctx={n_ctx}")
            a = int(torch.randint(0, n_ctx - 2 * L + 1, (1,), generator=generator))
            b = int(torch.randint(a + L, n_ctx - L + 1, (1,), generator=generator))
            x[i, b : b + L] = x[i, a : a + L]
    return x


@dataclass
class ToyLog:
    """One measurement during training."""

    step: int
    train_loss: float
    first: float
    second: float
    scores: dict[str, torch.Tensor]  # kind -> [layer, head]
    seconds: float


@dataclass
class ToyResult:
    """A trained toy model and what was measured while it trained.

    Attributes:
        model: The trained TransformerBridge (eval mode).
        history: One :class:`ToyLog` per logged step.
        config: The :class:`ToyConfig` used.
        seed: The seed.
        wall_time: Training seconds (measurements included).
        eval_tokens: The fixed repeated-token batch the logs were measured on.
    """

    model: Model
    history: list[ToyLog]
    config: ToyConfig
    seed: int
    wall_time: float
    eval_tokens: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return [h.step for h in self.history]

    def series(self, name: str) -> torch.Tensor:
        """``"first"``, ``"second"``, ``"train_loss"`` per log, or a score kind ``[log, layer, head]``."""
        if name in HEAD_KINDS:
            return torch.stack([h.scores[name] for h in self.history])
        return torch.tensor([getattr(h, name) for h in self.history])

    def phase_change_step(self, ratio: float = 0.5) -> Optional[int]:
        """First logged step where second-repeat loss < ``ratio`` x first-repeat loss.

        Before the phase change both repeats sit near chance (``ln(vocab)``); after it the second
        drops to a small fraction. ``None`` if it never happened.
        """
        for h in self.history:
            if h.second < ratio * h.first:
                return h.step
        return None

    def scores(self, step: Optional[int] = None) -> dict[str, Grid]:
        """Head scores (Grids) at a logged step (default: the last)."""
        log = self.history[-1] if step is None else next((h for h in self.history if h.step == step), None)
        if log is None:
            raise KeyError(f"step {step} was not logged; logged steps are {self.steps}")
        return {
            k: Grid(
                v,
                ("layer", "head"),
                title=f"{k.replace('_', '-')} score, step {log.step}",
                metric="attention to target",
            )
            for k, v in log.scores.items()
        }

    def summary(self) -> dict[str, Any]:
        """Phase-change step, final losses and the best layer-0 previous-token / layer-1 induction heads."""
        last = self.history[-1]
        prev0 = last.scores["previous_token"][0]
        ind1 = last.scores["induction"][1] if last.scores["induction"].shape[0] > 1 else last.scores["induction"][0]
        return {
            "seed": self.seed,
            "wall_time_s": round(self.wall_time, 1),
            "phase_change_step": self.phase_change_step(),
            "first_loss": round(last.first, 3),
            "second_loss": round(last.second, 3),
            "prev_token_head": f"L0H{int(prev0.argmax())}",
            "prev_token_score": round(float(prev0.max()), 3),
            "induction_head": f"L1H{int(ind1.argmax())}",
            "induction_score": round(float(ind1.max()), 3),
        }

    def plot(self):
        """Loss on both repeats and the best layer-0 previous-token / layer-1 induction scores."""
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
        steps = self.steps
        a.plot(steps, self.series("first"), label="first repeat")
        a.plot(steps, self.series("second"), label="second repeat")
        a.axhline(math.log(self.config.d_vocab), color="k", ls="--", lw=0.8, label=f"ln({self.config.d_vocab})")
        pc = self.phase_change_step()
        for ax in (a, b):
            if pc is not None:
                ax.axvline(pc, color="gray", ls=":", label="phase change")
            ax.set_xlabel("training step")
        a.set_ylabel("loss (nats)")
        a.legend(fontsize=7)
        prev = self.series("previous_token")[:, 0].amax(-1)
        ind = self.series("induction")[:, -1].amax(-1)
        b.plot(steps, prev, label="best layer-0 previous-token score")
        b.plot(steps, ind, label=f"best layer-{self.config.n_layers - 1} induction score")
        b.set_ylim(0, 1)
        b.set_ylabel("score")
        b.legend(fontsize=7)
        fig.suptitle(f"2-layer attention-only model, seed {self.seed}")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        return f"ToyResult({self.summary()})"


def train_induction_model(
    steps: int = 2000,
    *,
    seed: int = 0,
    config: Optional[ToyConfig] = None,
    log_every: int = 50,
    threads: Optional[int] = 1,
    progress: bool = True,
    cache: bool = False,
) -> ToyResult:
    """Train a 2-layer attention-only transformer on repeated segments; log repeat loss and head scores.

    Deterministic for a given seed (one torch thread by default, restored afterwards; one thread
    is much faster than two for a model this small). With the defaults, the phase change comes at
    about step 1100-1300 (about a minute on one CPU core).

    Args:
        steps: Optimiser steps.
        seed: Seeds the initialisation, the data and the evaluation batch.
        config: Model / training settings.
        log_every: Measure every this many steps (and at step 0 and the last step).
        threads: ``torch.set_num_threads`` during training (``None``: leave as is).
        progress: Show a tqdm bar.
        cache: Load this run from ``$MECHLIB_CACHE/toy`` if it was trained before with the same
            settings and code (:func:`toy_cache_path`), else train it and store it there
            (written whole or not at all). ``result.meta["cache"]`` says which happened.

    Returns:
        A :class:`ToyResult`.
    """
    from tqdm.auto import tqdm

    cfg = config or ToyConfig()
    if steps < 1 or log_every < 1:
        raise ValueError("steps and log_every must be at least 1")
    if cache:
        path = toy_cache_path(steps, seed=seed, config=cfg, log_every=log_every, threads=threads)
        if path.is_file():
            result = _load(path, cfg, seed)
            result.meta["cache"] = f"loaded from {path}"
            return result
        result = train_induction_model(
            steps, seed=seed, config=cfg, log_every=log_every, threads=threads, progress=progress
        )
        _store(result, path)
        result.meta["cache"] = f"trained and stored in {path}"
        return result
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = _toy_model(cfg, seed)
        gen = torch.Generator().manual_seed(seed)
        eval_tokens = repeated_tokens(model, cfg.eval_batch, cfg.n_ctx // 2, seed=seed + 10_000, bos=False)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        history: list[ToyLog] = []
        t0 = time.perf_counter()

        def measure(step: int, train_loss: float) -> None:
            model.eval()
            rl = repeat_loss(model, eval_tokens)
            sc = head_scores(model, eval_tokens)
            history.append(
                ToyLog(
                    step,
                    train_loss,
                    rl.first,
                    rl.second,
                    {k: g.values for k, g in sc.items()},
                    time.perf_counter() - t0,
                )
            )
            model.train()

        measure(0, float("nan"))
        bar = tqdm(range(1, steps + 1), disable=not progress, desc=f"training (seed {seed})", mininterval=2.0)
        for step in bar:
            x = repeat_task_batch(
                cfg.batch,
                cfg.n_ctx,
                cfg.d_vocab,
                gen,
                long_repeat=cfg.long_repeat,
                short_repeat=cfg.short_repeat,
                n_short=cfg.n_short,
            )
            model.train()
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.d_vocab), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == steps:
                measure(step, loss.item())
                bar.set_postfix(second=f"{history[-1].second:.2f}")
        model.eval()
        wall = time.perf_counter() - t0
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    return ToyResult(model, history, cfg, seed, wall, eval_tokens)


def _toy_model(cfg: ToyConfig, seed: int) -> Model:
    """The untrained toy model (seeded initialisation)."""
    return random_model(
        seed=seed,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        attn_only=True,
        normalization_type="LN",
    )


def toy_cache_path(
    steps: int, *, seed: int = 0, config: Optional[ToyConfig] = None, log_every: int = 50, threads: Optional[int] = 1
) -> Path:
    """Where ``train_induction_model(..., cache=True)`` keeps this run: a file named by a hash of the
    arguments, the torch and TransformerLens versions, and the source of :mod:`mechlib.toy`,
    :mod:`mechlib.induction` (the measurements) and :mod:`mechlib.models` (the initialisation)."""
    import transformer_lens

    sources = [Path(m.__file__).read_bytes() for m in (induction, models)] + [Path(__file__).read_bytes()]
    key = {
        "steps": int(steps),
        "seed": int(seed),
        "config": dataclasses.asdict(config or ToyConfig()),
        "log_every": int(log_every),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", "?"),
        "sources": [hashlib.sha256(src).hexdigest() for src in sources],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return models.cache_dir() / "toy" / f"induction-{digest}.pt"


def _store(result: ToyResult, path: Path) -> None:
    """Write ``result`` to ``path`` through a temporary file in the same folder (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        "history": [dataclasses.asdict(h) for h in result.history],
        "eval_tokens": result.eval_tokens,
        "wall_time": float(result.wall_time),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, cfg: ToyConfig, seed: int) -> ToyResult:
    payload = torch.load(path, weights_only=True)
    model = _toy_model(cfg, seed)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    history = [ToyLog(**h) for h in payload["history"]]
    return ToyResult(model, history, cfg, seed, payload["wall_time"], payload["eval_tokens"])
