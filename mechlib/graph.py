"""The computational graph of a transformer, edge by edge: scores, circuits, node summaries.

Nodes are the embeddings (``input``), every attention head (``L5H1``), every MLP (``MLP5``) and
the logits. An edge runs from an upstream node's output (a *sender*) to a downstream node's input
(a *receiver*). Receivers are finer than nodes: a head reads its queries (``L5H1.q``), keys and
values through separate inputs; on grouped-query models the keys and values belong to key/value
heads shared by several query heads (``L5KV0.k``, ``L5KV0.v``), so those edges exist once per KV
head. This is the convention of Hanna et al. 2024 (EAP-IG), where GPT-2 small has 32,491 edges.

A :class:`Graph` holds a score per edge (from :mod:`mechlib.eap`), optionally per prompt, and a
circuit (a boolean mask over the edges). It selects circuits (:meth:`Graph.top_n`,
:meth:`Graph.greedy`), prunes them to what connects the embeddings to the logits
(:meth:`Graph.prune`), summarises nodes (:meth:`Graph.node_scores`, :meth:`Graph.heads`,
:meth:`Graph.node_roc_auc`), plots itself and round-trips through JSON.

Example:
    >>> g = Graph.for_config(n_layers=12, n_heads=12, n_kv_heads=12)    # GPT-2 small's shape
    >>> g.n_edges
    32491
    >>> g.senders[:3], g.receivers[:2]
    (['input', 'L0H0', 'L0H1'], ['L0H0.q', 'L0H1.q'])
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from mechlib.results import Grid, head_label
from mechlib.stats import Estimate
from mechlib.types import Model
from mechlib.validate import parse_head

__all__ = ["Graph", "GraphShape"]


@dataclass(frozen=True)
class GraphShape:
    """The model dimensions a graph is built from."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    attn_only: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def grouped(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads


def _structure(shape: GraphShape):
    """Sender and receiver names, their stages, the receivers' nodes, and the edge mask."""
    L, H, K = shape.n_layers, shape.n_heads, shape.n_kv_heads
    senders, s_stage = ["input"], [0]
    receivers, r_stage, r_nodes, r_kind = [], [], [], []
    kvname = (lambda l, g: f"L{l}KV{g}") if shape.grouped else (lambda l, g: head_label(l, g))
    for l in range(L):
        att, mlp = 2 * l + 1, 2 * l + 2
        for h in range(H):
            receivers.append(f"{head_label(l, h)}.q")
            r_stage.append(att)
            r_nodes.append((head_label(l, h),))
            r_kind.append("q")
        for kind in ("k", "v"):
            for g in range(K):
                receivers.append(f"{kvname(l, g)}.{kind}")
                r_stage.append(att)
                r_nodes.append(tuple(head_label(l, h) for h in range(g * shape.group, (g + 1) * shape.group)))
                r_kind.append(kind)
        for h in range(H):
            senders.append(head_label(l, h))
            s_stage.append(att)
        if not shape.attn_only:
            receivers.append(f"MLP{l}")
            r_stage.append(mlp)
            r_nodes.append((f"MLP{l}",))
            r_kind.append("mlp")
            senders.append(f"MLP{l}")
            s_stage.append(mlp)
    receivers.append("logits")
    r_stage.append(2 * L + 1)
    r_nodes.append(("logits",))
    r_kind.append("logits")
    valid = torch.tensor(s_stage)[:, None] < torch.tensor(r_stage)[None, :]
    return senders, s_stage, receivers, r_stage, r_nodes, r_kind, valid


def _roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    s = torch.as_tensor(list(scores), dtype=torch.float64)
    y = torch.as_tensor(list(labels), dtype=torch.bool)
    pos, neg = s[y], s[~y]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("ROC-AUC needs at least one node in the reference set and one outside it")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


@dataclass
class Graph:
    """Per-edge scores over a model's graph, and optionally a circuit.

    Attributes:
        shape: The model dimensions (:class:`GraphShape`).
        scores: ``[n_senders, n_receivers]`` edge scores (0 where no edge exists), or ``None``.
        per_prompt: ``[batch, n_senders, n_receivers]`` scores per prompt, or ``None``.
        circuit: ``[n_senders, n_receivers]`` bool, the edges in the selected circuit, or ``None``.
        title, metric: For plots.
        meta: How the scores were made (method, direction, steps, clean/corrupted metric, ...).
    """

    shape: GraphShape
    scores: Optional[torch.Tensor] = None
    per_prompt: Optional[torch.Tensor] = None
    circuit: Optional[torch.Tensor] = None
    title: str = ""
    metric: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.senders, self._s_stage, self.receivers, self._r_stage, self._r_nodes, self._r_kind, self.valid) = (
            _structure(self.shape)
        )
        self._s_index = {n: i for i, n in enumerate(self.senders)}
        self._r_index = {n: i for i, n in enumerate(self.receivers)}
        S, R = self.valid.shape
        if self.scores is not None:
            self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
            if tuple(self.scores.shape) != (S, R):
                raise ValueError(f"scores must be [{S} senders, {R} receivers], got {tuple(self.scores.shape)}")
            self.scores = self.scores.masked_fill(~self.valid, 0.0)
        if self.per_prompt is not None:
            self.per_prompt = torch.as_tensor(self.per_prompt, dtype=torch.float32).detach().cpu()
            if self.per_prompt.ndim != 3 or tuple(self.per_prompt.shape[1:]) != (S, R):
                raise ValueError(f"per_prompt must be [batch, {S}, {R}], got {tuple(self.per_prompt.shape)}")
        if self.circuit is not None:
            self.circuit = self._as_mask(self.circuit, "circuit")

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def for_config(
        cls, n_layers: int, n_heads: int, n_kv_heads: Optional[int] = None, attn_only: bool = False, **kw: Any
    ) -> "Graph":
        """An empty graph (no scores) for a model of these dimensions."""
        return cls(GraphShape(n_layers, n_heads, n_kv_heads or n_heads, attn_only), **kw)

    @classmethod
    def for_model(cls, model: Model, **kw: Any) -> "Graph":
        """An empty graph for a TransformerBridge (or anything with a TransformerLens ``cfg``)."""
        cfg = model.cfg
        return cls.for_config(
            int(cfg.n_layers),
            int(cfg.n_heads),
            int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
            bool(cfg.attn_only),
            **kw,
        )

    def _as_mask(self, mask: Any, name: str) -> torch.Tensor:
        m = torch.as_tensor(mask).detach().cpu()
        if m.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool mask [{len(self.senders)}, {len(self.receivers)}], got {m.dtype}")
        if tuple(m.shape) != tuple(self.valid.shape):
            raise ValueError(f"{name} must have shape {tuple(self.valid.shape)}, got {tuple(m.shape)}")
        if bool((m & ~self.valid).any()):
            s, r = (m & ~self.valid).nonzero()[0].tolist()
            raise ValueError(
                f"{name} holds {self.senders[s]} -> {self.receivers[r]}, which is not an edge "
                "(a sender must sit upstream of its receiver)"
            )
        return m

    def with_circuit(self, circuit: Any) -> "Graph":
        """A copy holding ``circuit``: a bool mask, or a list of ``(sender, receiver)`` names."""
        if not isinstance(circuit, torch.Tensor):
            circuit = self.mask_of(circuit)
        return Graph(self.shape, self.scores, self.per_prompt, circuit, self.title, self.metric, dict(self.meta))

    # ---- names ---------------------------------------------------------------------------

    @property
    def n_edges(self) -> int:
        """Number of edges in the whole graph."""
        return int(self.valid.sum())

    @property
    def n_circuit_edges(self) -> int:
        return 0 if self.circuit is None else int(self.circuit.sum())

    def sender_index(self, name: str) -> int:
        if not isinstance(name, str):
            raise TypeError(f"a sender is named by a string like 'L5H1', 'MLP3' or 'input', got {name!r}")
        key = name if name in self._s_index else _canonical_head(name)
        if key not in self._s_index:
            raise ValueError(
                f"unknown sender {name!r}; senders are 'input', heads like 'L0H0' .. "
                f"'{self.senders[-1] if self.shape.attn_only else head_label(self.shape.n_layers - 1, self.shape.n_heads - 1)}'"
                + ("" if self.shape.attn_only else f", MLPs 'MLP0' .. 'MLP{self.shape.n_layers - 1}'")
            )
        return self._s_index[key]

    def receiver_index(self, name: str) -> int:
        if not isinstance(name, str):
            raise TypeError(f"a receiver is named by a string like 'L5H1.q', 'MLP3' or 'logits', got {name!r}")
        if name not in self._r_index:
            kv = "'L5KV0.k'" if self.shape.grouped else "'L5H1.k'"
            raise ValueError(
                f"unknown receiver {name!r}; receivers look like 'L5H1.q', {kv}, 'MLP5', 'logits' "
                f"(this graph has {len(self.receivers)})"
            )
        return self._r_index[name]

    def edge_name(self, s: int, r: int) -> str:
        return f"{self.senders[s]} -> {self.receivers[r]}"

    def mask_of(self, edges: Iterable[Union[tuple[str, str], str]]) -> torch.Tensor:
        """A bool edge mask from ``(sender, receiver)`` pairs or ``"sender -> receiver"`` strings."""
        if isinstance(edges, (str, bytes)):
            raise TypeError("edges must be a list of (sender, receiver) pairs, not a single string")
        m = torch.zeros_like(self.valid)
        for e in edges:
            if isinstance(e, str):
                if "->" not in e:
                    raise ValueError(f"cannot read an edge from {e!r}; write 'L3H1 -> L5H2.q' or ('L3H1', 'L5H2.q')")
                e = tuple(p.strip() for p in e.split("->", 1))
            if not isinstance(e, (tuple, list)) or len(e) != 2:
                raise ValueError(f"an edge is a (sender, receiver) pair, got {e!r}")
            s, r = self.sender_index(e[0]), self.receiver_index(e[1])
            if not bool(self.valid[s, r]):
                raise ValueError(f"{e[0]} -> {e[1]} is not an edge: {e[0]} does not sit upstream of {e[1]}")
            m[s, r] = True
        return m

    def edges(self, mask: Optional[torch.Tensor] = None) -> list[tuple[str, str]]:
        """Edge names ``(sender, receiver)`` of a mask (default: the circuit)."""
        m = self.circuit if mask is None else mask
        if m is None:
            raise ValueError("this graph holds no circuit; select one with top_n() or greedy(), or pass a mask")
        return [(self.senders[s], self.receivers[r]) for s, r in m.nonzero().tolist()]

    # ---- scores --------------------------------------------------------------------------

    def _need_scores(self) -> torch.Tensor:
        if self.scores is None:
            raise ValueError("this graph holds no scores; make them with mechlib.eap.eap / eap_ig")
        return self.scores

    def top(self, k: int = 10, *, absolute: bool = True) -> list[tuple[tuple[str, str], float]]:
        """The ``k`` highest-scoring edges (by absolute score by default), as ``((sender, receiver), score)``."""
        scores = self._need_scores()
        key = (scores.abs() if absolute else scores).masked_fill(~self.valid, float("-inf")).flatten()
        k = min(int(k), self.n_edges)
        idx = torch.topk(key, k).indices.tolist()
        R = len(self.receivers)
        return [((self.senders[i // R], self.receivers[i % R]), float(scores.flatten()[i])) for i in idx]

    def score(self, sender: str, receiver: str) -> float:
        s, r = self.sender_index(sender), self.receiver_index(receiver)
        if not bool(self.valid[s, r]):
            raise ValueError(f"{sender} -> {receiver} is not an edge")
        return float(self._need_scores()[s, r])

    def input_of(self, head: Union[str, tuple[int, int]], kind: str) -> str:
        """The receiver through which query head ``head`` reads its ``kind`` (``"q"``, ``"k"`` or
        ``"v"``) input: ``L5H1.q``, and on grouped-query models the shared ``L5KV0.k``."""
        if kind not in ("q", "k", "v"):
            raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
        layer, h = parse_head(head)
        if not (0 <= layer < self.shape.n_layers and 0 <= h < self.shape.n_heads):
            raise ValueError(
                f"head {head!r} does not exist in a {self.shape.n_layers}-layer, {self.shape.n_heads}-head graph"
            )
        if kind == "q" or not self.shape.grouped:
            return f"{head_label(layer, h)}.{kind}"
        return f"L{layer}KV{h // self.shape.group}.{kind}"

    def ranked_into(
        self, receivers: Iterable[str], *, heads_only: bool = False, absolute: bool = True
    ) -> list[tuple[tuple[str, str], float]]:
        """Every edge into ``receivers``, best first: ``((sender, receiver), score)``.

        Args:
            receivers: Receiver names (e.g. from :meth:`input_of`).
            heads_only: Keep only attention-head senders (drop ``input`` and MLPs).
            absolute: Rank by ``|score|`` (the score itself is returned signed).
        """
        scores = self._need_scores()
        out = []
        for name in dict.fromkeys(receivers):
            r = self.receiver_index(name)
            for s in self.valid[:, r].nonzero().flatten().tolist():
                sender = self.senders[s]
                if heads_only and not sender.startswith("L"):
                    continue
                out.append(((sender, name), float(scores[s, r])))
        out.sort(key=lambda e: -abs(e[1]) if absolute else -e[1])
        return out

    def edge_list(self) -> list[tuple[int, int]]:
        """Every edge as ``(sender index, receiver index)``, in row-major order."""
        return [tuple(x) for x in self.valid.nonzero().tolist()]

    # ---- node summaries ------------------------------------------------------------------

    def node_scores(self, *, absolute: bool = False) -> dict[str, float]:
        """Each sender's total score: the sum of its outgoing edge scores (of ``|score|`` with
        ``absolute``). Summed signed, it is the node's own attribution score (every node feeds the
        logits and all later receivers, so the edge gradients add up to the node gradient)."""
        s = self._need_scores()
        s = s.abs() if absolute else s
        tot = (s * self.valid).sum(1)
        return {n: float(v) for n, v in zip(self.senders, tot.tolist())}

    def heads(self, *, absolute: bool = False) -> Grid:
        """Head totals as a ``(layer, head)`` :class:`~mechlib.results.Grid`."""
        ns = self.node_scores(absolute=absolute)
        L, H = self.shape.n_layers, self.shape.n_heads
        v = torch.tensor([[ns[head_label(l, h)] for h in range(H)] for l in range(L)])
        return Grid(
            v,
            ("layer", "head"),
            title=f"{self.title}: head totals" if self.title else "head totals",
            metric=self.metric,
            meta=dict(self.meta),
        )

    def circuit_nodes(self) -> list[str]:
        """The nodes (``input``, heads, MLPs, ``logits``) touched by the circuit's edges."""
        if self.circuit is None:
            raise ValueError("this graph holds no circuit")
        # a head reached only through its KV group's key or value counts when it also sends a circuit edge
        sending = {self.senders[s] for s in self.circuit.any(1).nonzero().flatten().tolist()}
        out: set[str] = set(sending)
        for r in self.circuit.any(0).nonzero().flatten().tolist():
            nodes = self._r_nodes[r]
            out.update(nodes if self._r_kind[r] in ("q", "mlp", "logits") else [n for n in nodes if n in sending])
        return sorted(out, key=lambda n: (self._node_stage(n), n))

    def _node_stage(self, n: str) -> int:
        if n == "input":
            return 0
        if n == "logits":
            return 2 * self.shape.n_layers + 1
        if n.startswith("MLP"):
            return 2 * int(n[3:]) + 2
        return 2 * parse_head(n)[0] + 1

    def node_roc_auc(
        self,
        reference: Iterable[Union[str, tuple[int, int]]],
        *,
        scores: Optional[dict[str, float]] = None,
        absolute: bool = True,
        heads_only: bool = True,
    ) -> float:
        """ROC-AUC of node scores against a reference node set (Conmy et al. 2023).

        Args:
            reference: The nodes that should rank high: head labels (``"L5H1"``, ``(5, 1)``) or MLPs.
            scores: Node scores to rank (default: :meth:`node_scores` with ``absolute``).
            absolute: Rank by the sum of ``|edge score|`` (default) rather than the signed sum.
            heads_only: Rank attention heads only (default), as the paper's head-level circuits do.

        Raises:
            ValueError: An unknown node, or no node inside or outside the reference.
        """
        if isinstance(reference, (str, bytes)):
            raise TypeError("reference must be a list of nodes, e.g. ['L5H1', 'L9H6']")
        ref = set()
        for n in reference:
            name = head_label(*parse_head(n)) if isinstance(n, tuple) else n
            ref.add(self.senders[self.sender_index(name)])
        ns = dict(scores) if scores is not None else self.node_scores(absolute=absolute)
        names = [n for n in self.senders if n != "input" and (not heads_only or not n.startswith("MLP"))]
        missing = [n for n in names if n not in ns]
        if missing:
            raise ValueError(f"scores miss nodes {missing[:3]}")
        if heads_only and any(n.startswith("MLP") or n == "input" for n in ref):
            raise ValueError("reference holds MLPs or the input while heads_only=True")
        return _roc_auc([ns[n] for n in names], [n in ref for n in names])

    def node_roc_auc_interval(
        self,
        reference: Iterable[Union[str, tuple[int, int]]],
        *,
        n_boot: int = 200,
        seed: int = 0,
        confidence: float = 0.95,
        absolute: bool = True,
    ):
        """:meth:`node_roc_auc` with a percentile-bootstrap interval over prompts.

        Each resample averages the per-prompt edge scores of prompts drawn with replacement and
        ranks the nodes again. Needs ``per_prompt`` scores.

        Returns:
            A :class:`mechlib.stats.Estimate` (value: the AUC on all prompts).
        """
        if self.per_prompt is None:
            raise ValueError("this graph holds no per-prompt scores (score it with a per-prompt [batch] metric)")
        reference = list(reference)
        value = self.node_roc_auc(reference, absolute=absolute)
        B = self.per_prompt.shape[0]
        gen = torch.Generator().manual_seed(seed)
        aucs = []
        for _ in range(int(n_boot)):
            idx = torch.randint(0, B, (B,), generator=gen)
            g = Graph(self.shape, self.per_prompt[idx].mean(0))
            aucs.append(g.node_roc_auc(reference, absolute=absolute))
        a = torch.tensor(aucs, dtype=torch.float64)
        lo, hi = torch.quantile(
            a, torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
        ).tolist()
        return Estimate(value, min(lo, value), max(hi, value), B, confidence, "bootstrap", float(a.std()))

    # ---- selection -----------------------------------------------------------------------

    def _receivers_of_node(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for r, nodes in enumerate(self._r_nodes):
            for n in nodes:
                out.setdefault(n, []).append(r)
        return out

    def prune(self, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keep only the edges on a path from ``input`` to ``logits`` (a bool mask).

        A head is reached from the input when any of its inputs (its query, or its KV group's key
        or value) receives a kept edge from a reached sender; it reaches the logits when any kept
        edge leaves it towards a receiver whose node reaches the logits. With the corrupted run as
        the ablation, pruning never changes a circuit's faithfulness: a node cut off from the
        input computes its corrupted output anyway, and one cut off from the logits is never read.
        """
        m = self._as_mask(self.circuit if mask is None else mask, "mask")
        S, R = m.shape
        order = sorted(range(S), key=lambda i: self._s_stage[i])  # senders by stage, input first
        rec_of = self._receivers_of_node()
        reached = torch.zeros(S, dtype=torch.bool)  # sender reached from the input
        reached[0] = True
        for s in order[1:]:
            rs = rec_of.get(self.senders[s], [])
            reached[s] = bool((m[:, rs] & reached[:, None]).any())
        leads = torch.zeros(R, dtype=torch.bool)  # receiver whose node reaches the logits
        leads[-1] = True
        for s in reversed(order[1:]):
            if bool((m[s] & leads).any()):
                leads[rec_of.get(self.senders[s], [])] = True
        return m & reached[:, None] & leads[None, :]

    def top_n(self, n: int, *, absolute: bool = True, prune: bool = True) -> "Graph":
        """The circuit of the ``n`` highest-scoring edges (pruned to what connects input to logits)."""
        scores = self._need_scores()
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        m = _top_mask(scores, self.valid, min(n, self.n_edges), absolute)
        return self.with_circuit(self.prune(m) if prune else m)

    def greedy(self, n: int, *, absolute: bool = True, prune: bool = True) -> "Graph":
        """Grow a circuit from the logits: repeatedly add the best edge into a node already in it.

        Starts from the logits; an edge is a candidate once its receiver belongs to a node in the
        circuit (a KV receiver once any head of its group is); adding it brings its sender in. This
        is Hanna et al.'s greedy selection; the result is pruned to paths from the input.
        """
        scores = self._need_scores()
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        key = scores.abs() if absolute else scores
        rec_of = self._receivers_of_node()
        m = torch.zeros_like(self.valid)
        heap: list[tuple[float, int, int]] = []
        opened: set[int] = set()

        def open_node(node: str) -> None:
            for r in rec_of.get(node, []):
                if r in opened:
                    continue
                opened.add(r)
                for s in self.valid[:, r].nonzero().flatten().tolist():
                    heapq.heappush(heap, (-float(key[s, r]), s, r))

        open_node("logits")
        in_nodes = {"logits"}
        count = 0
        while heap and count < n:
            _, s, r = heapq.heappop(heap)
            if m[s, r]:
                continue
            m[s, r] = True
            count += 1
            node = self.senders[s]
            if node not in in_nodes and node != "input":
                in_nodes.add(node)
                open_node(node)
        return self.with_circuit(self.prune(m) if prune else m)

    # ---- I/O -----------------------------------------------------------------------------

    def to_dict(self, *, per_prompt: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "shape": {
                "n_layers": self.shape.n_layers,
                "n_heads": self.shape.n_heads,
                "n_kv_heads": self.shape.n_kv_heads,
                "attn_only": self.shape.attn_only,
            },
            "senders": self.senders,
            "receivers": self.receivers,
            "title": self.title,
            "metric": self.metric,
            "meta": _jsonable(self.meta),
            "scores": None if self.scores is None else self.scores.tolist(),
            "circuit": None if self.circuit is None else self.edges(),
        }
        if per_prompt and self.per_prompt is not None:
            d["per_prompt"] = self.per_prompt.tolist()
        return d

    def save(self, path: Union[str, Path], *, per_prompt: bool = False) -> Path:
        """Write the graph as JSON (per-prompt scores only with ``per_prompt=True``: they are large)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(per_prompt=per_prompt)))
        return p

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Graph":
        shape = GraphShape(**d["shape"])
        g = cls(
            shape,
            scores=None if d.get("scores") is None else torch.tensor(d["scores"]),
            per_prompt=None if d.get("per_prompt") is None else torch.tensor(d["per_prompt"]),
            title=d.get("title", ""),
            metric=d.get("metric", ""),
            meta=dict(d.get("meta") or {}),
        )
        if d.get("senders") not in (None, g.senders) or d.get("receivers") not in (None, g.receivers):
            raise ValueError(
                "the saved node names do not match the graph's shape; the file is damaged or from "
                "another version of mechlib"
            )
        if d.get("circuit") is not None:
            g.circuit = g.mask_of([tuple(e) for e in d["circuit"]])
        return g

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Graph":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        s = self.shape
        what = f"{s.n_layers} layers x {s.n_heads} heads ({s.n_kv_heads} KV)"
        best = ""
        if self.scores is not None:
            best = "; top " + ", ".join(f"{a} -> {b} {v:+.3g}" for (a, b), v in self.top(3))
        circ = f"; circuit of {self.n_circuit_edges} edges" if self.circuit is not None else ""
        return f"Graph({self.title or 'edges'}: {what}, {self.n_edges} edges{best}{circ})"

    # ---- plot ----------------------------------------------------------------------------

    def plot(self, ax: Optional[Any] = None, *, k: int = 60, label_nodes: bool = True):
        """Draw the circuit (at most its ``k`` strongest edges; without a circuit, the graph's ``k``
        strongest edges): nodes by layer, edges by score.

        Edge colour is the sign (blue positive, red negative), width the absolute score.
        Returns the matplotlib figure.
        """
        import matplotlib.pyplot as plt

        mask = self.circuit if self.circuit is not None else self.valid
        shown = int(mask.sum())
        if shown > k:  # draw the k strongest edges only (thousands of arrows are unreadable and slow)
            key = self.scores.abs() if self.scores is not None else torch.ones(mask.shape)
            mask = _top_mask(key.masked_fill(~mask, 0.0), mask, k, True)
        pairs = mask.nonzero().tolist()
        scores = self.scores if self.scores is not None else torch.ones_like(self.valid, dtype=torch.float32)
        nodes = set()
        for s, r in pairs:
            nodes.add(self.senders[s])
            nodes.update(self._r_nodes[r][:1] if self._r_kind[r] != "q" else self._r_nodes[r])
        nodes.update({"input", "logits"})
        by_stage: dict[int, list[str]] = {}
        for n in sorted(nodes, key=lambda n: (self._node_stage(n), n)):
            by_stage.setdefault(self._node_stage(n), []).append(n)
        pos = {}
        for st, ns in by_stage.items():
            for i, n in enumerate(ns):
                pos[n] = (i - (len(ns) - 1) / 2, st)
        if ax is None:
            _, ax = plt.subplots(figsize=(8, max(4, 0.28 * len(by_stage) + 2)))
        vmax = max((abs(float(scores[s, r])) for s, r in pairs), default=1.0) or 1.0
        for s, r in pairs:
            a = pos[self.senders[s]]
            b = pos[self._r_nodes[r][0]]
            v = float(scores[s, r])
            ax.annotate(
                "",
                xy=b,
                xytext=a,
                arrowprops=dict(
                    arrowstyle="-|>", lw=0.3 + 2.5 * abs(v) / vmax, color="tab:blue" if v >= 0 else "tab:red", alpha=0.6
                ),
            )
        for n, (x, y) in pos.items():
            ax.scatter([x], [y], s=30, color="black", zorder=3)
            if label_nodes:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel("input (bottom) to logits (top)")
        what = "circuit" if self.circuit is not None else "graph"
        ax.set_title(
            f"{self.title or 'graph'}: {len(pairs)} strongest of the {what}'s {shown} edges"
            if shown > len(pairs)
            else f"{self.title or 'graph'}: {what} of {len(pairs)} edges"
        )
        return ax.figure


def _top_mask(scores: torch.Tensor, valid: torch.Tensor, n: int, absolute: bool) -> torch.Tensor:
    key = (scores.abs() if absolute else scores).masked_fill(~valid, float("-inf")).flatten()
    m = torch.zeros(valid.numel(), dtype=torch.bool)
    if n > 0:
        m[torch.topk(key, n).indices] = True
    return m.view_as(valid) & valid


def _canonical_head(name: str) -> str:
    try:
        return head_label(*parse_head(name))
    except (ValueError, TypeError):
        return name


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
