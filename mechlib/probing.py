"""Probing with control tasks: what a layer's activations make decodable, and whether the probe did the work.

A *probe* is a shallow classifier trained on frozen activations to predict a label (a word's part of
speech, a subject's number). High held-out accuracy says the label is decodable there; it does not
say the model uses it, and a flexible probe can learn the task itself. Hewitt & Liang (2019,
"Designing and Interpreting Probes with Control Tasks") answer the second point with a *control
task*: every word type gets a fixed random label drawn from the empirical label distribution, so
the labels are a function of word identity alone, and a probe can only reach them by memorising
types. ``selectivity = task accuracy - control accuracy``: a selective probe is good at the task and
bad at the control.

What this module does, one step each:

* :func:`load_pos` / :func:`words_to_tokens` / :func:`labelled_tokens`: labelled tokens
  (:class:`LabelledTokens`): token sequences, the positions that carry a label (the last sub-word
  token of each word), the labels, the word types, and the sentence each token comes from.
* :func:`collect`: activations at any hooks (default :func:`resid_hooks`: the residual stream
  entering every layer, and after the last) for the labelled tokens, batched, with a progress bar;
  cached per (model, hook, data), so a layer sweep runs the model once.
* :func:`fit_probe`: a linear probe (multinomial logistic regression, scikit-learn's objective
  solved to convergence by :mod:`mechlib.logistic`) or a one-hidden-layer MLP (scikit-learn),
  trained on a seeded split *by sentence* (:func:`split_by_group`), scored on the held-out sentences.
* :func:`control_labels`: Hewitt & Liang's control task.
* :func:`sweep`: every layer x probe, task and control, over seeds, as :class:`SeedGrid` results
  (``Grid(layer, probe)`` with the per-seed values, intervals and a plot), gathered in a
  :class:`ProbeSweep`.
* :func:`position_sweep`: a binary label (e.g. a subject's number) decoded at every layer x
  position with TransformerLens's leakage-safe k-sparse probe
  (``transformer_lens.tools.analysis.sparse_probing``), held out by group, with its label-shuffle
  control: a grid to set beside an activation-patching grid of the same shape.

Example:
    >>> import mechlib                                                   # doctest: +SKIP
    >>> model = mechlib.load_model()                                     # doctest: +SKIP
    >>> data = load_pos(model)                                           # doctest: +SKIP
    >>> result = sweep(model, data, seeds=(0, 1, 2))                     # doctest: +SKIP
    >>> result.selectivity.ci(layer=5, probe="linear"); result.plot()    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlib.models import model_device
from mechlib.readout import activations
from mechlib.results import Grid
from mechlib.stats import Estimate, mean_ci
from mechlib.types import Model
from mechlib.validate import position_list

__all__ = [
    "LabelledTokens",
    "labelled_tokens",
    "words_to_tokens",
    "load_pos",
    "POS_DATA",
    "resid_hooks",
    "check_hooks",
    "collect",
    "clear_cache",
    "control_labels",
    "split_by_group",
    "PROBES",
    "make_probe",
    "ProbeFit",
    "fit_probe",
    "SeedGrid",
    "ProbeSweep",
    "sweep",
    "position_sweep",
]

POS_DATA = Path(__file__).resolve().parent / "data" / "pos_tags.json"
PROBES = ("linear", "mlp")


# ---- labelled tokens -------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledTokens:
    """Token sequences and the labelled positions in them.

    Attributes:
        tokens: One 1-D ``long`` tensor of token ids per sentence (lengths may differ).
        positions: Per sentence, the positions that carry a label (ascending).
        labels: One label per labelled position, flat, in sentence order.
        words: The word type of each labelled position (control tasks key on it).
        sentence: ``[n]`` sentence index of each labelled position (held-out splits go by it).
        name: What the data is (for messages and the activation cache).
        meta: Provenance (tagger, source), free-form.
    """

    tokens: tuple[torch.Tensor, ...]
    positions: tuple[tuple[int, ...], ...]
    labels: tuple[str, ...]
    words: tuple[str, ...]
    sentence: torch.Tensor
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def counts(self) -> dict[str, int]:
        """Tokens per label, most frequent first."""
        out: dict[str, int] = {}
        for lab in self.labels:
            out[lab] = out.get(lab, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def key(self) -> str:
        """A digest of the tokens and positions: what the activation cache keys on (labels are not part
        of it: relabelling the same tokens reuses the activations)."""
        h = hashlib.sha1()
        for t, p in zip(self.tokens, self.positions):
            h.update(t.numpy().astype(np.int64).tobytes())
            h.update(b"|")
            h.update(np.asarray(p, dtype=np.int64).tobytes())
            h.update(b";")
        return h.hexdigest()

    def relabel(self, labels: Sequence[str], name: Optional[str] = None) -> "LabelledTokens":
        """The same tokens with other labels (e.g. a control task's)."""
        labels = tuple(str(x) for x in labels)
        if len(labels) != len(self):
            raise ValueError(f"labels has {len(labels)} entries but the data has {len(self)} labelled tokens")
        return replace(self, labels=labels, name=self.name if name is None else name)


def labelled_tokens(
    tokens: Sequence[Union[torch.Tensor, Sequence[int]]],
    positions: Sequence[Sequence[int]],
    labels: Sequence[Any],
    words: Optional[Sequence[str]] = None,
    *,
    name: str = "",
    meta: Optional[dict[str, Any]] = None,
) -> LabelledTokens:
    """Build and check a :class:`LabelledTokens`.

    Args:
        tokens: Per sentence, token ids (a 1-D tensor or list).
        positions: Per sentence, the labelled positions (negative ones count from the end).
        labels: One label per labelled position, flat (any values; stored as strings).
        words: The word type per labelled position (default: the token id as a string).
        name: A name for messages.

    Raises:
        TypeError: Tokens that are not integers.
        ValueError: Counts that disagree (sentences vs positions, positions vs labels or words), a
            position out of range, an empty sentence or no labelled token at all.
    """
    if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
        tokens = list(tokens)
    if len(tokens) != len(positions):
        raise ValueError(
            f"tokens has {len(tokens)} sentences but positions has {len(positions)}; give one list of "
            "positions per sentence"
        )
    toks: list[torch.Tensor] = []
    pos: list[tuple[int, ...]] = []
    for i, (t, p) in enumerate(zip(tokens, positions)):
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.dtype == torch.bool or t.ndim != 1:
            raise TypeError(
                f"tokens[{i}] must be a 1-D sequence of integer token ids, got dtype {t.dtype}, shape {tuple(t.shape)}"
            )
        if t.numel() == 0:
            raise ValueError(f"tokens[{i}] is empty")
        n = t.numel()
        pp = []
        for q in p:
            q = int(q)
            if -n <= q < 0:
                q += n
            if not 0 <= q < n:
                raise ValueError(f"positions[{i}] holds {q}, out of range for a sentence of {n} tokens")
            pp.append(q)
        toks.append(t.long().cpu())
        pos.append(tuple(pp))
    n_pos = sum(len(p) for p in pos)
    labels = tuple(str(x) for x in labels)
    if len(labels) != n_pos:
        raise ValueError(
            f"labels has {len(labels)} entries but positions name {n_pos} labelled tokens; give one "
            "label per labelled position"
        )
    if n_pos == 0:
        raise ValueError("no labelled tokens: positions are all empty")
    if words is None:
        words = tuple(str(int(toks[i][q])) for i, p in enumerate(pos) for q in p)
    words = tuple(str(w) for w in words)
    if len(words) != n_pos:
        raise ValueError(f"words has {len(words)} entries but positions name {n_pos} labelled tokens")
    sentence = torch.tensor([i for i, p in enumerate(pos) for _ in p], dtype=torch.long)
    return LabelledTokens(tuple(toks), tuple(pos), labels, words, sentence, name, dict(meta or {}))


def words_to_tokens(
    model: Model,
    sentences: Sequence[Sequence[str]],
    labels: Sequence[Sequence[Any]],
    spaces: Optional[Sequence[Sequence[bool]]] = None,
    *,
    lowercase_types: bool = True,
    name: str = "",
    meta: Optional[dict[str, Any]] = None,
) -> LabelledTokens:
    """Tokenize word-split sentences so that every word ends on a known token; label that token.

    Each word is tokenized on its own (with a leading space where the previous word had one
    after it) and the pieces are concatenated, so word boundaries are token boundaries by
    construction. The label of a word sits on its *last* token (the first position where the
    whole word has been read).

    Args:
        model: A model with a tokenizer.
        sentences: Per sentence, its words.
        labels: Per sentence, one label per word.
        spaces: Per sentence, whether each word is followed by a space (default: all but the last).
        lowercase_types: Word types for control tasks are lower-cased (``The`` and ``the`` are one type).
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model has no tokenizer; build token ids yourself and use labelled_tokens(...)")
    if len(labels) != len(sentences):
        raise ValueError(f"labels has {len(labels)} sentences but sentences has {len(sentences)}")
    bos = []
    if getattr(model.cfg, "default_prepend_bos", False) and tok.bos_token_id is not None:
        bos = [int(tok.bos_token_id)]
    all_tokens, all_pos, flat_labels, flat_words = [], [], [], []
    for i, words in enumerate(sentences):
        if isinstance(words, str):
            raise TypeError(f"sentences[{i}] must be a list of words, got the string {words!r}")
        if len(labels[i]) != len(words):
            raise ValueError(f"sentence {i} has {len(words)} words but {len(labels[i])} labels")
        sp = list(spaces[i]) if spaces is not None else [True] * (len(words) - 1) + [False]
        ids, pos = list(bos), []
        for j, w in enumerate(words):
            piece = (" " if j > 0 and sp[j - 1] else "") + w
            ids.extend(tok.encode(piece, add_special_tokens=False))
            pos.append(len(ids) - 1)
            flat_words.append(w.lower() if lowercase_types else w)
        flat_labels.extend(labels[i])
        all_tokens.append(torch.tensor(ids, dtype=torch.long))
        all_pos.append(pos)
    return labelled_tokens(all_tokens, all_pos, flat_labels, flat_words, name=name, meta=meta)


def load_pos(model: Model, tagset: str = "upos", path: Union[str, Path, None] = None) -> LabelledTokens:
    """The part-of-speech data shipped in ``mechlib/data/pos_tags.json``, tokenized for ``model``.

    English prose written for mechlib, sentence-split and tagged by spaCy's small English pipeline
    (``scripts/make_pos_data.py`` made it; the file records the tagger and its version). Tags are
    tagger-made, not gold.

    Args:
        model: A model with a tokenizer.
        tagset: ``"upos"`` (17 coarse Universal POS tags) or ``"ptb"`` (Penn Treebank tags).
    """
    if tagset not in ("upos", "ptb"):
        raise ValueError(f"tagset must be 'upos' or 'ptb', got {tagset!r}")
    raw = json.loads(Path(path or POS_DATA).read_text())
    sents = raw["sentences"]
    meta = {k: raw[k] for k in ("description", "text_source", "tagger", "labels") if k in raw}
    meta["tagset"] = tagset
    return words_to_tokens(
        model,
        [s["words"] for s in sents],
        [s[tagset] for s in sents],
        [s["spaces"] for s in sents],
        name=f"pos-{tagset}",
        meta=meta,
    )


# ---- activations -----------------------------------------------------------------------------


def resid_hooks(model: Model) -> list[str]:
    """The residual stream entering every layer (``blocks.{l}.hook_resid_pre``) and after the last
    (``blocks.{n-1}.hook_resid_post``): ``n_layers + 1`` hooks; index ``l`` has seen ``l`` layers."""
    n = int(model.cfg.n_layers)
    return [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def check_hooks(model: Model, hooks: Any, name: str = "hooks") -> list[str]:
    """``hooks`` as a list of hook names the model has; ``ValueError`` naming any unknown one."""
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(hooks)
    if not hooks:
        raise ValueError(f"{name} is empty; pass hook names such as 'blocks.0.hook_resid_pre'")
    bad = [h for h in hooks if not isinstance(h, str)]
    if bad:
        raise TypeError(f"{name} must be hook names (str), got {bad[0]!r}")
    known = set(model.hook_dict)
    unknown = [h for h in hooks if h not in known]
    if unknown:
        raise ValueError(
            f"{name}: unknown hook {unknown[0]!r}; this model has e.g. "
            f"{resid_hooks(model)[:2] + ['blocks.0.hook_mlp_out']} (model.hook_dict lists all)"
        )
    return hooks


# model -> {(hook, data key): [n, d] float32 activations}
_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], torch.Tensor]]" = weakref.WeakKeyDictionary()


def clear_cache(model: Optional[Model] = None) -> None:
    """Forget cached activations (of one model, or all)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def collect(
    model: Model,
    data: LabelledTokens,
    hooks: Union[str, Iterable[str], None] = None,
    *,
    batch_size: int = 32,
    progress: bool = True,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Activations at ``hooks`` for every labelled token of ``data``.

    Sentences run in batches of similar length, right-padded (attention is causal, so padding after
    a token never changes it). Results are cached per (model, hook, data): asking again, or for a
    subset of the hooks, runs nothing.

    Args:
        model: A bridge from :func:`mechlib.load_model`.
        data: :class:`LabelledTokens`.
        hooks: Hook names (default :func:`resid_hooks`: the residual stream at every layer).
        batch_size: Sentences per forward pass.
        progress: Show a tqdm bar.
        cache: Keep the activations for later calls.

    Returns:
        ``{hook: [len(data), d] float32 tensor}``, rows in the order of ``data.labels``.
    """
    if not isinstance(data, LabelledTokens):
        raise TypeError(f"data must be LabelledTokens (labelled_tokens(...), load_pos(...)), got {type(data).__name__}")
    hooks = resid_hooks(model) if hooks is None else check_hooks(model, hooks)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    key = data.key()
    store = _CACHE.setdefault(model, {}) if cache else {}
    missing = [h for h in hooks if (h, key) not in store]
    if missing:
        vocab = int(model.cfg.d_vocab)
        for i, t in enumerate(data.tokens):
            if int(t.max()) >= vocab or int(t.min()) < 0:
                raise ValueError(f"data.tokens[{i}] holds ids outside the model's vocabulary [0, {vocab})")
        out = {h: [None] * len(data.tokens) for h in missing}
        order = sorted(range(len(data.tokens)), key=lambda i: len(data.tokens[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        device = model_device(model)
        wanted = set(missing)
        for batch in tqdm(batches, desc=f"activations ({data.name or 'data'})", disable=not progress, leave=False):
            T = max(len(data.tokens[i]) for i in batch)
            toks = torch.zeros(len(batch), T, dtype=torch.long)
            for r, i in enumerate(batch):
                toks[r, : len(data.tokens[i])] = data.tokens[i]
            with torch.no_grad():
                acts = activations(model, toks.to(device), lambda n: n in wanted)
            for h in missing:
                a = acts[h]
                for r, i in enumerate(batch):
                    out[h][i] = a[r, list(data.positions[i])].detach().float().cpu()
        for h in missing:
            store[(h, key)] = torch.cat(out[h], dim=0)
    return {h: store[(h, key)] for h in hooks}


# ---- control tasks and splits ----------------------------------------------------------------


def control_labels(words: Sequence[str], labels: Sequence[Any], seed: int = 0) -> list[str]:
    """Hewitt & Liang's control task: each word type gets one fixed label, drawn at random from the
    empirical label distribution; every token of that type carries it.

    Args:
        words: The word type of each token.
        labels: The task's label of each token (only their distribution is used).
        seed: Seed of the draw.

    Returns:
        One control label per token (a function of its word type only).
    """
    words = [str(w) for w in words]
    labels = [str(x) for x in labels]
    if len(words) != len(labels):
        raise ValueError(f"words has {len(words)} entries but labels has {len(labels)}")
    if not words:
        raise ValueError("words is empty")
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    types = sorted(set(words))
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(classes), size=len(types), p=counts / counts.sum())
    table = {t: str(classes[c]) for t, c in zip(types, drawn)}
    return [table[w] for w in words]


def split_by_group(groups: Any, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices with whole groups (sentences) on one side: never split by token.

    Args:
        groups: ``[n]`` group id of each row.
        test_fraction: Share of the groups held out (at least one group on each side).
        seed: Seed of the shuffle.
    """
    g = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups)
    if g.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {g.shape}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    uniq = np.unique(g)
    if len(uniq) < 2:
        raise ValueError(f"groups holds {len(uniq)} group(s); a held-out split needs at least 2 sentences")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(uniq)
    n_test = min(max(1, int(round(test_fraction * len(uniq)))), len(uniq) - 1)
    test_groups = set(perm[:n_test].tolist())
    is_test = np.array([x in test_groups for x in g.tolist()])
    return np.nonzero(~is_test)[0], np.nonzero(is_test)[0]


# ---- probes ----------------------------------------------------------------------------------


def make_probe(
    kind: str = "linear",
    seed: int = 0,
    *,
    hidden: int = 64,
    C: float = 1.0,
    max_iter: int = 300,
    early_stopping: bool = True,
    alpha: float = 1e-4,
) -> Any:
    """A fresh scikit-learn probe: standardised inputs, then

    * ``"linear"``: multinomial logistic regression (L2, ``C``), or
    * ``"mlp"``: one hidden ReLU layer of ``hidden`` units (Adam, L2 ``alpha``; with
      ``early_stopping`` training stops when 10% of the training rows held aside stop improving,
      otherwise it runs until the training loss stops falling or ``max_iter`` epochs).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "linear":
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    elif kind == "mlp":
        clf = MLPClassifier(
            hidden_layer_sizes=(hidden,),
            early_stopping=early_stopping,
            alpha=alpha,
            max_iter=max_iter,
            random_state=seed,
            n_iter_no_change=10,
        )
    else:
        raise ValueError(f"probe kind must be one of {PROBES}, got {kind!r}")
    return make_pipeline(StandardScaler(), clf)


@dataclass(frozen=True)
class ProbeFit:
    """One probe trained and scored.

    Attributes:
        kind: ``"linear"`` or ``"mlp"``.
        accuracy: Held-out accuracy (test sentences only).
        train_accuracy: Accuracy on the training rows.
        majority: Held-out accuracy of always answering the training set's most frequent label.
        n_train, n_test: Rows on each side.
        correct: ``[n_test]`` whether each held-out row was right (for :func:`mechlib.stats.rate_ci`).
        estimator: The fitted probe: a single-problem :class:`mechlib.logistic.LogisticFit` (linear) or a
            scikit-learn pipeline (MLP).
    """

    kind: str
    accuracy: float
    train_accuracy: float
    majority: float
    n_train: int
    n_test: int
    correct: np.ndarray = field(repr=False)
    estimator: Any = field(repr=False, default=None)


def _features(features: Any, name: str = "features") -> np.ndarray:
    x = features.detach().cpu().float().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, float)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [n, d], got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    return x


def fit_probe(
    features: Any,
    labels: Sequence[Any],
    groups: Any,
    *,
    kind: str = "linear",
    seed: int = 0,
    test_fraction: float = 0.2,
    split: Optional[tuple[np.ndarray, np.ndarray]] = None,
    **probe_kw: Any,
) -> ProbeFit:
    """Train a probe on part of the sentences and score it on the rest.

    Args:
        features: ``[n, d]`` activations (tensor or array).
        labels: ``[n]`` labels.
        groups: ``[n]`` sentence of each row: the split holds out whole sentences.
        kind: ``"linear"`` or ``"mlp"`` (:func:`make_probe`).
        seed: Seeds the split and the probe's initialisation.
        test_fraction: Share of sentences held out.
        split: ``(train_index, test_index)`` to use instead of drawing one.
        **probe_kw: ``C`` and ``max_iter`` (L-BFGS iterations) for the linear probe, which
            :func:`mechlib.logistic.fit_logistic` fits to convergence (scikit-learn's
            ``LogisticRegression`` objective; its own default stops at 300 iterations, often before
            converging on control tasks); ``hidden``, ``C``, ``max_iter`` (epochs) for the MLP
            probe (:func:`make_probe`).

    Raises:
        ValueError: Labels, groups and features of different lengths; a single class; a training
            side with a single class.
    """
    x = _features(features)
    y = np.asarray([str(v) for v in labels])
    g = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups)
    if len(y) != x.shape[0]:
        raise ValueError(f"labels has {len(y)} entries but features has {x.shape[0]} rows; give one label per row")
    if len(g) != x.shape[0]:
        raise ValueError(
            f"groups has {len(g)} entries but features has {x.shape[0]} rows; give one sentence id per row"
        )
    if len(np.unique(y)) < 2:
        raise ValueError(f"labels hold one class only ({y[0]!r}): there is nothing to probe")
    train, test = split if split is not None else split_by_group(g, test_fraction, seed)
    if len(np.unique(y[train])) < 2:
        raise ValueError("the training sentences hold one class only; use more data or another seed")
    if kind == "linear":
        classes, yi = np.unique(y, return_inverse=True)
        is_train = np.zeros(len(y), bool)
        is_train[train] = True
        est = _linear_fits([torch.from_numpy(x)], [(0, yi, is_train)], len(classes), **probe_kw)[0]
        pred = classes[est.predict(torch.from_numpy(x)[None])[0].numpy()]
    else:
        est = make_probe(kind, seed, **probe_kw)
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(x[train], y[train])
        pred = est.predict(x)
    correct = pred[test] == y[test]
    return ProbeFit(
        kind,
        float(correct.mean()),
        float((pred[train] == y[train]).mean()),
        _majority(y, train, test),
        len(train),
        len(test),
        correct,
        est,
    )


def _majority(y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out accuracy of always answering the training rows' most frequent label."""
    vals, counts = np.unique(y[train], return_counts=True)
    return float((y[test] == vals[counts.argmax()]).mean())


def _linear_fits(
    features: Sequence[torch.Tensor],
    problems: Sequence[tuple[int, np.ndarray, np.ndarray]],
    n_classes: int,
    *,
    C: float = 1.0,
    max_iter: int = 3000,
    progress: bool = False,
    **_unused: Any,
) -> list[Any]:
    """Linear probes for many problems ``(feature index, class indices [n], train mask [n])``,
    fitted by :func:`mechlib.logistic.fit_logistic`; one single-problem
    :class:`~mechlib.logistic.LogisticFit` per problem. MLP-only options (``hidden``, ...) are ignored."""
    from mechlib.logistic import fit_logistic

    x = torch.stack([f.float() for f in features])
    y = torch.stack([torch.as_tensor(yi, dtype=torch.long) for _, yi, _ in problems])
    tr = torch.stack([torch.as_tensor(m, dtype=torch.bool) for _, _, m in problems])
    fit = fit_logistic(
        x, y, tr, n_classes=n_classes, features=[f for f, _, _ in problems], C=C, max_iter=max_iter, progress=progress
    )
    return [fit[p] for p in range(len(problems))]


# ---- sweeps ----------------------------------------------------------------------------------


@dataclass(repr=False)
class SeedGrid(Grid):
    """A :class:`~mechlib.results.Grid` of means over seeds that keeps the per-seed values.

    ``values`` is the mean over seeds; ``samples`` is ``[seed, *values.shape]``. :meth:`ci` gives
    one cell's :class:`~mechlib.stats.Estimate` over seeds; :meth:`plot` draws lines along the
    first axis, one per entry of the second, with error bars.
    """

    samples: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples is None:
            self.samples = self.values[None]
        self.samples = torch.as_tensor(self.samples).detach().cpu().float()
        if tuple(self.samples.shape[1:]) != tuple(self.values.shape):
            raise ValueError(f"samples {tuple(self.samples.shape)} must be [seed, *{tuple(self.values.shape)}]")

    @classmethod
    def from_samples(
        cls, samples: torch.Tensor, dims: tuple[str, ...], labels: dict[str, list[str]], **kw: Any
    ) -> "SeedGrid":
        samples = torch.as_tensor(samples).float()
        return cls(samples.mean(0), dims, labels, samples=samples, **kw)

    def _index(self, coords: dict[str, Any]) -> tuple[int, ...]:
        idx = []
        for d in self.dims:
            if d not in coords:
                raise KeyError(f"give every axis: {self.dims}")
            c = coords[d]
            if isinstance(c, str):
                if c not in self.labels[d]:
                    raise KeyError(f"{d}={c!r} is not one of {self.labels[d]}")
                c = self.labels[d].index(c)
            idx.append(int(c))
        return tuple(idx)

    def ci(self, **coords: Any) -> Estimate:
        """Mean over seeds of one cell, with its bootstrap interval, e.g. ``ci(layer=5, probe="mlp")``
        (an int is an index along its axis, a string a label: ``layer="15"`` is the row labelled 15)."""
        return mean_ci(self.samples[(slice(None), *self._index(coords))])

    def at(self, **coords: Any) -> torch.Tensor:
        """Per-seed values of one cell."""
        return self.samples[(slice(None), *self._index(coords))]

    def argmax(self, dim: str, **coords: Any) -> int:
        """Index along ``dim`` where the mean peaks, the other axes fixed by ``coords``."""
        g = self
        for d, c in coords.items():
            g = g.select(**{d: g.labels[d].index(c) if isinstance(c, str) else int(c)})
        return int(torch.argmax(g.values))

    def plot(self, ax: Optional[Any] = None, *, lines: Optional[bool] = None, **kw: Any):
        """Lines along the first axis, one per entry of the second, with bootstrap error bars over
        seeds (``lines=True``; the default unless the second axis is ``pos``); otherwise
        ``Grid.plot``'s heatmap of the means."""
        if lines is None:
            lines = self.values.ndim == 2 and self.dims[1] != "pos"
        if not lines or self.values.ndim != 2:
            return super().plot(ax=ax, **kw)
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 3.5))
        x = np.arange(self.values.shape[0])
        for j, lab in enumerate(self.labels[self.dims[1]]):
            est = [self.ci(**{self.dims[0]: i, self.dims[1]: j}) for i in x]
            mean = np.array([e.value for e in est])
            err = np.array([[e.value - e.low for e in est], [e.high - e.value for e in est]])
            ax.errorbar(x, mean, yerr=err, marker="o", ms=3, capsize=2, label=lab, **kw)
        ax.set_xlabel(self.dims[0])
        ax.set_ylabel(self.metric)
        ax.set_title(self.title)
        ax.set_xticks(x, self.labels[self.dims[0]], fontsize=7, rotation=90 if len(x) > 16 else 0)
        ax.legend(fontsize=8)
        return ax.figure


@dataclass
class ProbeSweep:
    """Task and control probes at every layer.

    Attributes:
        accuracy: Held-out task accuracy, ``SeedGrid(layer, probe)``.
        control: Held-out control-task accuracy, same shape (``None`` without controls).
        selectivity: ``accuracy - control`` per seed, same shape.
        majority: ``[seed]`` held-out accuracy of the majority label (the baseline).
        hooks: The hook behind each layer row.
        meta: Seeds, sizes, and ``seen_type_share``: per seed, the share of held-out tokens whose
            word type occurs in the training sentences (only those can be right on the control
            task by memorisation; the rest are right by chance).
    """

    accuracy: SeedGrid
    control: Optional[SeedGrid]
    selectivity: Optional[SeedGrid]
    majority: torch.Tensor
    hooks: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def peak(self, what: str = "accuracy", probe: str = "linear") -> int:
        """Layer row where the mean of ``what`` (accuracy, control, selectivity) peaks for ``probe``."""
        return getattr(self, what).argmax("layer", probe=probe)

    def plot(self):
        """Task and control accuracy (with the majority baseline), and selectivity, per layer."""
        import matplotlib.pyplot as plt

        n = 2 if self.control is not None else 1
        fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 3.8), squeeze=False)
        ax = axes[0, 0]
        self.accuracy.plot(ax=ax)
        if self.control is not None:
            for line in list(ax.get_lines()):
                line.set_label(f"{line.get_label()} (task)")
            x = np.arange(self.control.values.shape[0])
            for j, lab in enumerate(self.control.labels["probe"]):
                ax.plot(x, self.control.values[:, j].numpy(), ls="--", marker=".", label=f"{lab} (control)")
        ax.axhline(float(self.majority.mean()), color="gray", lw=1, ls=":", label="majority label")
        ax.set_ylim(0, 1.02)
        ax.set_title("held-out accuracy")
        ax.legend(fontsize=7)
        if self.control is not None:
            self.selectivity.plot(ax=axes[0, 1])
            axes[0, 1].set_title("selectivity = task - control")
        fig.tight_layout()
        return fig


def sweep(
    model: Model,
    data: LabelledTokens,
    *,
    hooks: Union[str, Iterable[str], None] = None,
    probes: Sequence[str] = PROBES,
    seeds: Sequence[int] = (0, 1, 2),
    control: bool = True,
    test_fraction: float = 0.2,
    batch_size: int = 32,
    progress: bool = True,
    layer_labels: Optional[Sequence[str]] = None,
    **probe_kw: Any,
) -> ProbeSweep:
    """Probe every hook (layer) with every probe kind, on the task and on its control, over seeds.

    Each seed draws its own sentence split, its own control task (:func:`control_labels`) and its
    own probe initialisation; within a seed, task and control probes share the split. Every linear
    probe of the sweep (seeds x layers x task and control) is fitted to convergence by
    :func:`mechlib.logistic.fit_logistic`, each problem by its own L-BFGS.

    Args:
        model: A bridge.
        data: :class:`LabelledTokens` (e.g. :func:`load_pos`).
        hooks: Hook names, one per row (default :func:`resid_hooks`).
        probes: Probe kinds (``"linear"``, ``"mlp"``).
        seeds: Seeds; error bars are over them.
        control: Also train on the control task (and report selectivity).
        test_fraction: Share of sentences held out.
        layer_labels: Labels of the layer rows (default: ``0..len(hooks)-1``; with the default
            hooks, row ``l`` has passed ``l`` layers).
        **probe_kw: For :func:`make_probe`.

    Returns:
        A :class:`ProbeSweep`.
    """
    hooks = resid_hooks(model) if hooks is None else check_hooks(model, hooks)
    probes = list(probes)
    for p in probes:
        if p not in PROBES:
            raise ValueError(f"probes must be drawn from {PROBES}, got {p!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; pass e.g. seeds=(0, 1, 2)")
    if len(set(data.labels)) < 2:
        raise ValueError(f"data.labels hold one class only ({data.labels[0]!r}): there is nothing to probe")
    acts = collect(model, data, hooks, batch_size=batch_size, progress=progress)
    L, P, S = len(hooks), len(probes), len(seeds)
    task = torch.zeros(S, L, P)
    ctrl = torch.zeros(S, L, P)
    majority = torch.zeros(S)
    seen = torch.zeros(S)
    words = np.asarray(data.words)
    y_task = np.asarray(data.labels)
    classes = np.unique(y_task)
    splits = [split_by_group(data.sentence, test_fraction, seed) for seed in seeds]
    c_all = [np.asarray(control_labels(data.words, data.labels, seed)) if control else None for seed in seeds]
    for si, (train, test) in enumerate(splits):
        seen[si] = float(np.isin(words[test], words[train]).mean())
        majority[si] = _majority(y_task, train, test)
    # Linear probes: every (seed, layer, task/control) problem is convex; one call fits them all.
    if "linear" in probes:
        pi = probes.index("linear")
        feats = [acts[h].float() for h in hooks]
        jobs, problems = [], []
        for si, (train, test) in enumerate(splits):
            mask = np.zeros(len(y_task), bool)
            mask[train] = True
            for which, y in (("task", y_task), ("control", c_all[si])):
                if y is None:
                    continue
                yi = np.searchsorted(classes, y)
                for li in range(L):
                    jobs.append((si, li, which, test, yi))
                    problems.append((li, yi, mask))
        fits = _linear_fits(feats, problems, len(classes), progress=progress, **probe_kw)
        X = torch.stack(feats)
        for (si, li, which, test, yi), fit in zip(jobs, fits):
            pred = fit.predict(X)[0].numpy()
            acc = float((pred[test] == yi[test]).mean())
            (task if which == "task" else ctrl)[si, li, pi] = acc
    rest = [k for k in probes if k != "linear"]
    bar = tqdm(total=S * L * len(rest) * (2 if control else 1), desc="probes", disable=not progress, leave=False)
    for si, seed in enumerate(seeds):
        split = splits[si]
        for li, h in enumerate(hooks):
            for kind in rest:
                pi = probes.index(kind)
                fit = fit_probe(acts[h], data.labels, data.sentence, kind=kind, seed=seed, split=split, **probe_kw)
                task[si, li, pi] = fit.accuracy
                bar.update()
                if control:
                    cfit = fit_probe(acts[h], c_all[si], data.sentence, kind=kind, seed=seed, split=split, **probe_kw)
                    ctrl[si, li, pi] = cfit.accuracy
                    bar.update()
    bar.close()
    rows = list(layer_labels) if layer_labels is not None else [str(i) for i in range(L)]
    labels = {"layer": rows, "probe": probes}
    acc = SeedGrid.from_samples(
        task, ("layer", "probe"), labels, title=f"{data.name}: task accuracy", metric="held-out accuracy"
    )
    con = sel = None
    if control:
        con = SeedGrid.from_samples(
            ctrl, ("layer", "probe"), labels, title=f"{data.name}: control accuracy", metric="held-out accuracy"
        )
        sel = SeedGrid.from_samples(
            task - ctrl, ("layer", "probe"), labels, title=f"{data.name}: selectivity", metric="task - control accuracy"
        )
    return ProbeSweep(
        acc,
        con,
        sel,
        majority,
        hooks,
        {
            "seeds": seeds,
            "test_fraction": test_fraction,
            "n_tokens": len(data),
            "seen_type_share": seen.tolist(),
            "n_sentences": len(data.tokens),
            "probe_kw": probe_kw,
        },
    )


def position_sweep(
    model: Model,
    tokens: torch.Tensor,
    labels: Any,
    groups: Any,
    *,
    hooks: Union[str, Iterable[str], None] = None,
    positions: Optional[Sequence[int]] = None,
    k: Optional[int] = 64,
    seeds: Sequence[int] = (0, 1, 2),
    n_label_shuffles: int = 1,
    test_fraction: float = 0.3,
    pos_labels: Optional[Sequence[str]] = None,
    layer_labels: Optional[Sequence[str]] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[SeedGrid, SeedGrid]:
    """Where a binary label of each prompt is linearly decodable: every hook (layer) x position.

    Wraps TransformerLens's ``sweep_sparse_probe`` (k-sparse logistic probe, coordinates chosen on
    the training split only, label-shuffle control), holding out whole ``groups`` (e.g. the two
    prompts of a minimal pair) so a pair never straddles the split.

    Args:
        model: A bridge.
        tokens: ``[batch, pos]`` prompts of one length, aligned position by position.
        labels: ``[batch]`` binary labels (bools or two ints).
        groups: ``[batch]`` group ids.
        hooks: One per layer row (default :func:`resid_hooks` without the last, so rows match a
            ``resid_pre`` patching grid).
        positions: Positions to probe (default all); the grid's ``pos`` axis holds these only.
        k: Coordinates the probe may use, chosen on the training split by class-mean difference
            (``None``: all ``d_model``; a k-sparse probe is several times faster).
        seeds: Split seeds; error bars are over them.
        n_label_shuffles: Label-shuffle controls per cell and seed.

    Returns:
        ``(accuracy, shuffled)``: held-out accuracy of the probe and of its label-shuffle control,
        each ``SeedGrid(layer, pos)``.
    """
    from transformer_lens.tools.analysis.sparse_probing import sweep_sparse_probe

    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError("tokens must be a [batch, pos] tensor of prompts of one length")
    hooks = resid_hooks(model)[:-1] if hooks is None else check_hooks(model, hooks)
    y = torch.as_tensor(labels)
    g = torch.as_tensor(groups).long()
    B, T = tokens.shape
    if y.shape != (B,) or g.shape != (B,):
        raise ValueError(f"labels {tuple(y.shape)} and groups {tuple(g.shape)} must be [batch={B}]")
    if len(torch.unique(y)) != 2:
        raise ValueError(f"labels must hold exactly two classes, got {torch.unique(y).tolist()}")
    y = (y == torch.unique(y)[1]).long()
    pos = position_list(T, positions)
    if pos_labels is not None and len(pos_labels) != T:
        raise ValueError(f"pos_labels has {len(pos_labels)} entries for {T} positions")
    data = labelled_tokens(tokens, [list(range(T))] * B, [0] * (B * T), name="positions")
    acts = collect(model, data, hooks, batch_size=batch_size, progress=progress)
    d = next(iter(acts.values())).shape[1]
    k = d if k is None else min(int(k), d)
    S, L, P = len(seeds), len(hooks), len(pos)
    acc = torch.zeros(S, L, P)
    shuf = torch.zeros(S, L, P)
    bar = tqdm(total=S * L * P, desc="position probes", disable=not progress, leave=False)
    for si, seed in enumerate(seeds):
        for li, h in enumerate(hooks):
            a = acts[h].reshape(B, T, d)
            for pi, p in enumerate(pos):
                res = sweep_sparse_probe(
                    a[:, p].double(),
                    y,
                    ks=[k],
                    groups=g,
                    test_fraction=test_fraction,
                    preprocess="standardize",
                    n_label_shuffles=n_label_shuffles,
                    seed=int(seed),
                )
                acc[si, li, pi] = res.results[0].metrics.accuracy
                ctrl = res.label_shuffle_controls[0].accuracy
                shuf[si, li, pi] = float(ctrl.mean()) if ctrl.numel() else float("nan")
                bar.update()
    bar.close()
    labels_ = {
        "layer": list(layer_labels) if layer_labels is not None else [str(i) for i in range(L)],
        "pos": [str(pos_labels[p]) if pos_labels is not None else str(p) for p in pos],
    }
    return (
        SeedGrid.from_samples(acc, ("layer", "pos"), labels_, title="probe accuracy", metric="held-out accuracy"),
        SeedGrid.from_samples(
            shuf, ("layer", "pos"), labels_, title="label-shuffle control", metric="held-out accuracy"
        ),
    )
