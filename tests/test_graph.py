"""mechlib.graph: the edge graph's shape, circuit selection and pruning, node summaries, JSON."""

from __future__ import annotations

import pytest
import torch

from mechlib.graph import Graph, GraphShape
from mechlib.models import random_model


def _edges_by_formula(L: int, H: int, K: int, attn_only: bool = False) -> int:
    # receivers of layer l read the input and every node of earlier layers (and an MLP its own layer's heads)
    per_layer = H + (0 if attn_only else 1)
    n = 0
    for l in range(L):
        upstream = 1 + l * per_layer
        n += (H + 2 * K) * upstream
        if not attn_only:
            n += upstream + H
    return n + 1 + L * per_layer


def test_gpt2_small_has_32491_edges_on_a_gpt2_shaped_model():
    # GPT-2 small's shape (12 layers x 12 heads, MLPs) with a small width: the EAP-IG paper's count
    model = random_model(n_layers=12, n_heads=12, d_model=48, d_head=4, d_mlp=96, seed=0)
    g = Graph.for_model(model)
    assert g.n_edges == 32491 == _edges_by_formula(12, 12, 12)
    assert len(g.senders) == 1 + 12 * 13 and len(g.receivers) == 12 * (36 + 1) + 1


def test_smollm2_shape_counts_kv_receivers_once_per_kv_head():
    g = Graph.for_config(30, 9, 3)
    assert g.n_edges == 70651 == _edges_by_formula(30, 9, 3)
    assert "L5KV2.k" in g.receivers and "L5H2.k" not in g.receivers
    assert Graph.for_config(2, 4, 4, attn_only=True).n_edges == _edges_by_formula(2, 4, 4, attn_only=True)


def _scored(seed=0, L=3, H=4, K=2):
    g = Graph.for_config(L, H, K)
    scores = torch.randn(g.valid.shape, generator=torch.Generator().manual_seed(seed))
    return Graph(g.shape, scores * g.valid, title="random")


def test_top_n_is_the_largest_absolute_scores_pruned():
    g = _scored()
    raw = g.top_n(15, prune=False)
    assert raw.n_circuit_edges == 15
    kept = g.scores.abs()[raw.circuit]
    assert float(kept.min()) >= float(g.scores.abs()[g.valid & ~raw.circuit].max())
    pruned = g.top_n(15)
    assert bool((pruned.circuit <= raw.circuit).all())
    assert torch.equal(g.prune(pruned.circuit), pruned.circuit)  # idempotent
    assert g.top(1)[0][1] == pytest.approx(float(g.scores.flatten()[g.scores.abs().argmax()]))


def test_prune_keeps_exactly_the_paths_from_input_to_logits():
    g = Graph.for_config(2, 2, 2, attn_only=True)
    m = g.mask_of(
        [
            ("input", "L0H0.q"),
            ("L0H0", "logits"),  # a path
            ("input", "L0H1.q"),  # dead end: L0H1 sends nothing
            ("L0H1", "L1H0.q"),
        ]
    )  # L1H0 reaches nothing, L0H1 not needed
    kept = set(g.edges(g.prune(m)))
    assert kept == {("input", "L0H0.q"), ("L0H0", "logits")}
    # a grouped key: an edge into L1H1's KV group reaches L1H1
    gg = Graph.for_config(2, 2, 1, attn_only=True)
    m = gg.mask_of([("input", "L1KV0.k"), ("L1H1", "logits")])
    assert set(gg.edges(gg.prune(m))) == {("input", "L1KV0.k"), ("L1H1", "logits")}
    assert not gg.prune(gg.mask_of([("input", "L0H0.q")])).any()


def test_greedy_grows_from_the_logits():
    g = _scored(1)
    c = g.greedy(12, prune=False)
    assert c.n_circuit_edges == 12
    # every edge's receiver node is the logits or a node that sends an edge in the circuit
    senders = {g.senders[s] for s in c.circuit.any(1).nonzero().flatten().tolist()}
    for _s, r in c.circuit.nonzero().tolist():
        nodes = g._r_nodes[r]
        assert "logits" in nodes or any(n in senders for n in nodes)
    # the first edge is the best edge into the logits
    best = int(g.scores[:, -1].abs().argmax())
    assert bool(g.greedy(1, prune=False).circuit[best, -1])


def test_node_scores_sum_outgoing_edges_and_heads_grid():
    g = _scored(2)
    ns = g.node_scores()
    s = g.sender_index("L1H3")
    assert ns["L1H3"] == pytest.approx(float(g.scores[s].sum()), abs=1e-5)
    assert float(g.heads().values[1, 3]) == pytest.approx(ns["L1H3"], abs=1e-5)
    assert g.heads(absolute=True).values.min() >= 0


def test_roc_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    g = _scored(3)
    ref = ["L2H1", "L0H3", (1, 2)]
    auc = g.node_roc_auc(ref)
    names = [n for n in g.senders if n.startswith("L")]
    ns = g.node_scores(absolute=True)
    expect = roc_auc_score([n in {"L2H1", "L0H3", "L1H2"} for n in names], [ns[n] for n in names])
    assert auc == pytest.approx(expect)
    perfect = {n: (1.0 if n in ("L2H1", "L0H3", "L1H2") else 0.0) for n in g.senders}
    assert g.node_roc_auc(ref, scores=perfect) == 1.0
    with pytest.raises(ValueError, match="unknown sender"):
        g.node_roc_auc(["L9H9"])
    with pytest.raises(TypeError):
        g.node_roc_auc("L2H1")


def test_json_round_trip(tmp_path):
    g = _scored(4).top_n(20)
    g.meta.update({"method": "EAP", "clean": 1.5, "list": [1, 2]})
    path = g.save(tmp_path / "g.json")
    h = Graph.load(path)
    assert h.shape == g.shape and torch.allclose(h.scores, g.scores) and torch.equal(h.circuit, g.circuit)
    assert h.meta == g.meta and h.title == g.title
    fig = h.plot()
    assert fig is not None


def test_bad_input():
    g = _scored(5)
    with pytest.raises(ValueError, match="unknown receiver"):
        g.mask_of([("input", "L0H0.z")])
    with pytest.raises(ValueError, match="not an edge"):
        g.mask_of([("L2H0", "L1H0.q")])
    with pytest.raises(ValueError, match="sender"):
        g.score("MLP9", "logits")
    with pytest.raises(ValueError):
        g.top_n(-1)
    with pytest.raises(ValueError, match="scores must be"):
        Graph(g.shape, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="multiple"):
        GraphShape(2, 4, 3)
    with pytest.raises(ValueError, match="no scores"):
        Graph.for_config(1, 2).top(3)
    bad = torch.zeros_like(g.valid)
    bad[-1, 0] = True
    with pytest.raises(ValueError, match="not an edge"):
        g.with_circuit(bad)


def test_circuit_nodes():
    g = Graph.for_config(2, 2, 1, attn_only=True)
    c = g.with_circuit(g.mask_of([("input", "L1KV0.k"), ("input", "L0H1.q"), ("L0H1", "logits"), ("L1H1", "logits")]))
    # L1H0 shares the KV head L1KV0 but sends nothing: not in the circuit
    assert c.circuit_nodes() == ["input", "L0H1", "L1H1", "logits"]


def test_input_of_names_the_shared_kv_receiver_on_grouped_models():
    g = Graph.for_config(n_layers=2, n_heads=6, n_kv_heads=2)
    assert g.input_of("L1H4", "q") == "L1H4.q"
    assert g.input_of((1, 4), "k") == "L1KV1.k"  # heads 3..5 share KV head 1
    assert g.input_of("L0H2", "v") == "L0KV0.v"
    assert Graph.for_config(n_layers=2, n_heads=4).input_of("L1H3", "k") == "L1H3.k"
    with pytest.raises(ValueError, match="kind"):
        g.input_of("L1H1", "z")
    with pytest.raises(ValueError, match="does not exist"):
        g.input_of("L5H0", "k")


def test_ranked_into_lists_every_edge_into_the_receivers_best_first():
    g = Graph.for_config(n_layers=2, n_heads=2, n_kv_heads=2)
    scores = torch.zeros(g.valid.shape)
    r = g.receiver_index("L1H0.k")
    scores[g.sender_index("L0H1"), r] = -3.0
    scores[g.sender_index("L0H0"), r] = 1.0
    scores[g.sender_index("input"), r] = 2.0
    g = Graph(g.shape, scores=scores)
    ranked = g.ranked_into(["L1H0.k"])
    assert [e for e, _ in ranked[:3]] == [("L0H1", "L1H0.k"), ("input", "L1H0.k"), ("L0H0", "L1H0.k")]
    assert ranked[0][1] == -3.0  # ranked by |score|, returned signed
    assert len(ranked) == int(g.valid[:, r].sum())
    heads = g.ranked_into(["L1H0.k"], heads_only=True)
    assert {s for (s, _), _ in heads} == {"L0H0", "L0H1"}
    assert [e for e, _ in g.ranked_into(["L1H0.k"], absolute=False)][0] == ("input", "L1H0.k")
