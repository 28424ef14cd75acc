# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The indirect-object-identification circuit
#
# **Finding.** Given *"When Mary and John went to the store, John gave a drink to"*, a language model
# predicts *" Mary"*: the **indirect object** (IO), not the repeated **subject** (S). Wang et al. (2022)
# reverse-engineered how GPT-2 small does it, with a circuit of 26 attention heads in classes:
#
# * **name movers** (9.9, 9.6, 10.0) at the last token attend to IO and copy it to the logits;
#   **negative name movers** (10.7, 11.10) do the same with the opposite sign;
# * **S-inhibition heads** (7.3, 7.9, 8.6, 8.10) tell the name movers' *queries* to avoid S;
# * **induction** (5.5, 6.9) and **duplicate-token heads** (0.1, 3.0) at S2 detect that S is repeated,
#   which the S-inhibition heads read; previous-token heads (2.2, 4.11) feed the induction heads;
# * mean-ablating every other head keeps 87% of the logit difference.
#
# SmolLM2-135M (30 layers x 9 query heads, 3 KV heads) has no published circuit: this notebook
# **discovers** it with the same tools, class by class, and checks each class the way the paper did:
# direct logit attribution (who writes the answer), attention (to IO or to S?), activation patching
# (which heads matter at all), path patching (through which path), head scores (induction, duplicate
# tokens), and mean ablation of everything outside the circuit (faithfulness). It also checks
# attribution patching (the gradient approximation) against exact patching on the head grid.
#
# *Sources:* Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object
# Identification in GPT-2 small", arXiv 2211.00593; Nanda 2023, "Attribution Patching".

# %% tags=["parameters"]
import mechlib.reports

MODEL = "smollm2-135m"   # or "gpt2-small" where the Hugging Face hub is reachable
SEED = 0
QUICK = mechlib.reports.quick()

N_PROMPTS = 12 if QUICK else 32     # IOI prompts (BABA and ABBA alternating); ABC corruptions alongside
N_HELD_OUT = 64 if QUICK else 256   # a second draw of IOI prompts: the circuit is found on the first, its
                                     # claims (behaviour, S-inhibition path, faithfulness) confirmed on these
DLA_FRAC = 0.05                      # a head "writes the answer" if |DLA| >= 5% of the logit difference
PATH_FRAC = 0.04                     # a sender matters if its path carries >= 4% of the effect
MAX_CLASS = 4                        # at most this many heads per upstream class
N_RANDOM = 5 if QUICK else 20        # random circuits of the same size, for the faithfulness control
SENDER_SPAN = 10 if QUICK else None  # path patching sweeps senders from this many layers below the
                                     # receivers (None: every earlier layer)

# %%
import random

import torch

import mechlib
from mechlib.attribution_patching import attribution_patch, compare
from mechlib.induction import head_scores, repeated_tokens
from mechlib.ioi import ioi_baseline, make_ioi_dataset
from mechlib.logit_attribution import direct_logit_attribution, ioi_logit_attribution
from mechlib.metrics import ioi_metric
from mechlib.patching import CircuitEvaluator, head_attention, patch
from mechlib.path_patching import path_patch, path_patch_many, path_patch_sweep
from mechlib.reports import FindingsRecord
from mechlib.results import head_label
from mechlib.stats import mean_ci, paired_pvalue

mechlib.set_threads()
torch.manual_seed(SEED)
model = mechlib.load_model(MODEL)
cfg = model.cfg
ds = make_ioi_dataset(model, N_PROMPTS, seed=SEED)
metric = ioi_metric(ds)              # logit(IO) - logit(S) at END, per prompt
ALL = [(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
print(f"{MODEL}: {cfg.n_layers} layers x {cfg.n_heads} heads ({getattr(cfg, 'n_key_value_heads', None) or cfg.n_heads} KV heads)")
print(ds.report())

# %% [markdown]
# ## 1 · Baseline
#
# The metric throughout is the **logit difference** `logit(IO) - logit(S)` at the last token (END).
# The ABC corruption replaces all three names by fresh ones, so no name repeats: the signal the
# circuit uses is gone, while the template, place and object stay.

# %%
base = ioi_baseline(model, ds)
print(base)
LD = base.logit_diff
# the claims rest on a second, larger draw of prompts: the circuit is found on `ds`, confirmed on `held`
held = make_ioi_dataset(model, N_HELD_OUT, seed=SEED + 1)
held_metric = ioi_metric(held)
wide = ioi_baseline(model, held)
wide_p = paired_pvalue(wide.per_prompt - wide.corrupted_per_prompt, seed=SEED)
print(f"{N_HELD_OUT} held-out prompts: logit diff {wide.logit_diff_ci()}, IO > S {wide.accuracy_ci()}, "
      f"ABC {wide.corrupted_ci()}; clean vs ABC paired p = {wide_p:.2g}")

# %% [markdown]
# ## 2 · Direct logit attribution: which heads write the answer
#
# Each head's output at END, projected on the `IO - S` unembedding direction (final norm scale frozen),
# averaged over prompts. Heads that write a large share of the logit difference, in either direction,
# are the candidates for the last stage of the circuit.

# %%
dla = ioi_logit_attribution(model, ds, progress=False)
print(dla.summary(k=8))
# |LD|: where the logit difference is negative (a model that does not do IOI), DLA_FRAC * LD would admit every head
direct = [(c["layer"], c["head"]) for c, v in dla.heads.top(len(ALL), absolute=True) if abs(v) >= DLA_FRAC * abs(LD)]
print(f"heads with |DLA| >= {DLA_FRAC:.0%} of the logit diff ({DLA_FRAC * abs(LD):.2f}):",
      ", ".join(f"{head_label(*h)} {float(dla.heads.values[h]):+.2f}" for h in direct))
dla.heads.plot();

# %% [markdown]
# ## 3 · Where do they look? Attention from END to IO and to S
#
# A name mover attends from END to the IO token and copies it. We measure, per head, the attention
# from END to IO, to S1 and to S2, averaged over prompts, and classify the direct heads:
#
# * **name movers**: positive DLA, attend to IO more than to both S tokens together;
# * **negative name movers**: negative DLA, attend to IO more than to S;
# * **S-suppression heads** (no GPT-2 counterpart in the paper, but the mirror image of its negative
#   name movers, and of copy suppression): positive DLA while attending to **S**, i.e. they push the
#   S logit *down*. We check that by attributing the S logit alone;
# * the rest write to the logits without looking at either name.

# %%
keys = {"IO": ds.pos("IO"), "S1": ds.pos("S1"), "S2": ds.pos("S2")}
att = head_attention(model, ds.tokens, [head_label(*h) for h in direct], ds.pos("END"), keys)
s_dla = direct_logit_attribution(model, ds.tokens, ds.s_ids, pos=ds.pos("END"), progress=False).heads
io_dla = direct_logit_attribution(model, ds.tokens, ds.io_ids, pos=ds.pos("END"), progress=False).heads
classes = {"name mover": [], "negative name mover": [], "S-suppression": [], "other direct": []}
for i, h in enumerate(direct):
    io, s = float(att.values[i, 0]), float(att.values[i, 1] + att.values[i, 2])
    d = float(dla.heads.values[h])
    if d > 0 and io > s:
        classes["name mover"].append(h)
    elif d < 0 and io > s:
        classes["negative name mover"].append(h)
    elif d > 0 and s > io and float(s_dla.values[h]) < 0:
        classes["S-suppression"].append(h)
    else:
        classes["other direct"].append(h)
    print(f"{head_label(*h):>6}: DLA {d:+.2f} (IO logit {float(io_dla.values[h]):+.2f}, S logit {float(s_dla.values[h]):+.2f});"
          f" attention END->IO {io:.2f}, ->S1 {float(att.values[i, 1]):.2f}, ->S2 {float(att.values[i, 2]):.2f}")
for k, v in classes.items():
    print(f"{k:>20}: {', '.join(head_label(*h) for h in v) or '-'}")
NM, NEG, SSUP = classes["name mover"], classes["negative name mover"], classes["S-suppression"]
att.plot(cmap="Blues", center=None);

# %%
# Per prompt: does each name mover attend to IO more than to S (S1 + S2)?
nm_att = head_attention(model, ds.tokens, [head_label(*h) for h in NM], ds.pos("END"), keys) if NM else None
per = nm_att.meta["per_prompt"] if NM else torch.zeros(0, len(keys), len(ds.tokens))  # [head, key, prompt]
io_over_s = (per[:, 0] > per[:, 1] + per[:, 2]).float().mean(1)
for h, frac in zip(NM, io_over_s.tolist()):
    print(f"{head_label(*h)} attends to IO more than to S on {frac:.0%} of prompts")
nm_io = float(per[:, 0].mean())
nm_s = float((per[:, 1] + per[:, 2]).mean())
print(f"name movers, mean attention END->IO {nm_io:.3f} vs END->S {nm_s:.3f}")
# per prompt (NM heads averaged): attention to IO minus 1.5x attention to S, and the NM's DLA as a share of LD
nm_att_margin = mean_ci((per[:, 0] - 1.5 * (per[:, 1] + per[:, 2])).mean(0)) if NM else None
nm_dla_share = mean_ci(sum(dla.heads.at(layer=l, head=h) for l, h in NM) / LD) if NM else None
print(f"name movers: END->IO minus 1.5x END->S {nm_att_margin}; DLA share of the logit diff {nm_dla_share}")

# %% [markdown]
# ## 4 · Activation patching of every head
#
# Noising, all positions at once: each head's output is replaced by its output on the ABC prompt, in
# the clean run. `1` = no effect, `0` = as bad as the fully corrupted run. Heads far below 1 carry
# the task; heads above 1 were working *against* it (negative name movers). Heads that matter
# without writing to the logits directly are upstream: next we find out what they feed.

# %%
exact = patch(model, ds.tokens, ds.corrupted_tokens, metric, "head_out", direction="noise", progress=False)
print("most damaging when noised:", ", ".join(f"{exact.label(**c)} {v:.2f}" for c, v in exact.top(10, largest=False)))
print("most helpful when noised: ", ", ".join(f"{exact.label(**c)} {v:.2f}" for c, v in exact.top(5)))
exact.plot();


# %% [markdown]
# ## 5 · Path patching: S-inhibition heads act through the name movers' queries
#
# The paper's S-inhibition heads were found by path patching into the name movers' **queries**: the
# sender's corrupted output reaches only the name movers' query input, every other head is frozen to
# its clean output (MLPs recomputed, as in the paper). On SmolLM2 a query belongs to one query head,
# so the receivers are exactly the name movers (keys and values would be shared by a KV group of 3).
# The heads are found on the `N_PROMPTS` prompts; the class's path, and its control, are then
# measured on the `N_HELD_OUT` held-out prompts, where a 95% interval over prompts is informative.

# %%
def senders_below(layer):
    lo = 0 if SENDER_SPAN is None else max(0, layer - SENDER_SPAN)
    return [(l, h) for l in range(lo, layer) for h in range(cfg.n_heads)]

SINH = []  # found through the name movers' queries: none without name movers
if NM:
    first_nm = min(l for l, _ in NM)
    pq = path_patch_sweep(model, ds.tokens, ds.corrupted_tokens, metric, [head_label(*h) for h in NM],
                          component="q", senders=senders_below(first_nm), progress=False)
    print("senders -> name movers' queries, lowest:",
          ", ".join(f"{pq.label(**c)} {v:.3f}" for c, v in pq.top(8, largest=False)))
    SINH = [(c["layer"], c["head"]) for c, v in pq.top(MAX_CLASS, largest=False) if 1 - v >= PATH_FRAC]
    pq.plot();
print("S-inhibition-like heads:", ", ".join(head_label(*h) for h in SINH) or "none (no name movers, or no sender passes PATH_FRAC)")

# %%
# The class together, through the name movers' queries only; and a control: as many random heads
# from the same layers (none of the class).
# on the held-out prompts: the heads were chosen on `ds`
rng = random.Random(SEED)
sinh_path, ctrl_results = None, []
if SINH:  # no S-inhibition heads: nothing to measure or control
    ctrls = [[(l, rng.choice([h for h in range(cfg.n_heads) if (l, h) not in SINH])) for l, _ in SINH] for _ in range(3)]
    # the class and its controls in one call: the held-out runs are cached once for all four
    sinh_path, *ctrl_results = path_patch_many(model, held.tokens, held.corrupted_tokens, held_metric, [SINH] + ctrls,
                                               [head_label(*h) for h in NM], component="q")
controls = [r.effect for r in ctrl_results]
print(sinh_path)
if SINH:
    print(f"S-inhibition class -> name-mover queries carries {sinh_path.effect:.1%} of the clean-corrupted difference; "
          f"random same-layer heads: {', '.join(f'{c:.1%}' for c in controls)}")


def effect_per_prompt(r):
    """A path's share of the effect, per prompt (1 - value when noising, as PathPatchResult.effect)."""
    return 1 - r.per_prompt if r.meta.get("direction") == "noise" else r.per_prompt


sinh_effect = sinh_margin = sinh_p = sinh_att = None
if SINH:
    sinh_effect = mean_ci(effect_per_prompt(sinh_path))
    best_ctrl = ctrl_results[max(range(len(controls)), key=lambda i: controls[i])]  # the strongest control
    sinh_margin = mean_ci(effect_per_prompt(sinh_path) - 2 * effect_per_prompt(best_ctrl))
    sinh_p = paired_pvalue(effect_per_prompt(sinh_path) - effect_per_prompt(best_ctrl), seed=SEED)
    print(f"S-inhibition effect {sinh_effect}; minus 2x the strongest control {sinh_margin}; paired p = {sinh_p:.2g}")
    # Where do the S-inhibition heads look? In GPT-2 they attend from END to S2.
    sinh_att = head_attention(model, ds.tokens, [head_label(*h) for h in SINH], ds.pos("END"), keys)
    print(sinh_att.values)

# %% [markdown]
# ## 6 · Upstream: induction, duplicate-token and previous-token heads
#
# In GPT-2 the S-inhibition heads learn that S is repeated from heads at S2: **duplicate-token heads**
# (attend from S2 to S1) and **induction heads** (attend from S2 to S1+1), the latter fed by
# **previous-token heads**. We take the heads below the S-inhibition heads whose activation patching
# (section 4) moves the logit difference by at least `PATH_FRAC`, and classify them by what they do:
# their attention from S2 on the IOI prompts, and `mechlib.induction`'s scores on repeated random
# tokens. Then path patching checks the routes: the duplicate and induction heads into the
# S-inhibition heads' keys and values (on SmolLM2 keys and values belong to KV heads shared by three
# query heads: the result's meta lists the KV heads patched), and the previous-token heads into the
# induction heads' keys (K-composition).

# %%
scores = head_scores(model, repeated_tokens(model, 8, 40, seed=SEED))
s2 = head_attention(model, ds.tokens, [head_label(*h) for h in ALL], ds.pos("S2"),
                    {"S1": ds.pos("S1"), "S1+1": ds.pos("S1+1")})
dup_ioi = s2.values[:, 0].reshape(cfg.n_layers, cfg.n_heads)
ind_ioi = s2.values[:, 1].reshape(cfg.n_layers, cfg.n_heads)
top_sinh = max((l for l, _ in SINH), default=0)  # no S-inhibition heads: nothing is upstream of them
known = set(direct + SINH)
upstream = [(c["layer"], c["head"]) for c, v in exact.top(len(ALL), largest=False)
            if 1 - v >= PATH_FRAC and c["layer"] < top_sinh and (c["layer"], c["head"]) not in known]
IND = [h for h in upstream if float(ind_ioi[h]) >= 0.2 and float(ind_ioi[h]) > float(dup_ioi[h])][:MAX_CLASS]
DUP = [h for h in upstream if float(dup_ioi[h]) >= 0.2 and h not in IND][:MAX_CLASS]
PREV = [h for h in upstream if float(scores["previous_token"].values[h]) >= 0.5 and h not in IND + DUP][:MAX_CLASS]
print("upstream heads (activation patching effect >= PATH_FRAC):",
      ", ".join(f"{head_label(*h)} {1 - float(exact.values[h]):.2f}" for h in upstream))
for name, hs in (("induction", IND), ("duplicate-token", DUP), ("previous-token", PREV)):
    for h in hs:
        print(f"{name:>16} {head_label(*h)}: noising effect {1 - float(exact.values[h]):.2f}; IOI attention "
              f"S2->S1+1 {float(ind_ioi[h]):.2f}, S2->S1 {float(dup_ioi[h]):.2f}; repeated tokens: induction "
              f"{float(scores['induction'].values[h]):.2f}, duplicate {float(scores['duplicate_token'].values[h]):.2f}, "
              f"previous {float(scores['previous_token'].values[h]):.2f}")
for kind in ("induction", "duplicate_token", "previous_token"):
    print(f"top {kind} heads (repeated tokens):", ", ".join(f"{scores[kind].label(**c)} {v:.2f}" for c, v in scores[kind].top(5)))

# %%
sinh_names = [head_label(*h) for h in SINH]
routes = {}
if IND + DUP:
    for comp in ("k", "v"):
        routes[f"induction+duplicate -> S-inhibition {comp}"] = path_patch(
            model, ds.tokens, ds.corrupted_tokens, metric, IND + DUP, sinh_names, component=comp)
if PREV and IND:
    routes["previous-token -> induction k"] = path_patch(
        model, ds.tokens, ds.corrupted_tokens, metric, PREV, [head_label(*h) for h in IND], component="k")
for name, r in routes.items():
    print(f"{name}: effect {r.effect:.1%}  (KV heads patched: {r.meta.get('kv_receivers')})")

# %% [markdown]
# ## 7 · The assembled circuit: faithfulness
#
# Every head outside the circuit is mean-ablated (its output replaced by its mean over the ABC
# prompts of the same template, per position: the paper's procedure), MLPs and embeddings left as
# they are. Faithfulness = the circuit's logit difference / the full model's. A random set of as
# many heads, ablating the rest the same way, is the control. The circuit was found on the
# `N_PROMPTS` prompts; it is scored on the `N_HELD_OUT` held-out ones.

# %%
CIRCUIT = sorted(set(NM + NEG + SSUP + classes["other direct"] + SINH + IND + DUP + PREV))
groups = held.template_ids.tolist()  # on the held-out prompts: the circuit was found on `ds`
# the means over the ABC prompts and the intact run are computed once for every circuit scored here
score = CircuitEvaluator(model, held.tokens, held_metric, reference=held.corrupted_tokens, groups=groups)
circ = score(CIRCUIT)
rng = random.Random(SEED + 1)
rand_circuits = score.many([rng.sample(ALL, len(CIRCUIT)) for _ in range(N_RANDOM)])
rand = [r.faithfulness for r in rand_circuits]
# per prompt, on the intact model's mean logit difference as the unit (CircuitScore.faithfulness_ci)
faith = circ.per_prompt / circ.model_value
rand_faith = torch.stack([r.per_prompt / r.model_value for r in rand_circuits])  # [random circuit, prompt]
best_rand = rand_faith[max(range(N_RANDOM), key=lambda i: rand[i])]
faith_vs_mean = mean_ci(faith - rand_faith.mean(0))
faith_vs_best = mean_ci(faith - best_rand)
faith_p = paired_pvalue(faith - rand_faith.mean(0), seed=SEED)
rank_p = (1 + sum(r >= circ.faithfulness for r in rand)) / (1 + N_RANDOM)  # permutation p over random circuits
print(f"faithfulness {circ.faithfulness_ci()}; minus the random circuits' mean {faith_vs_mean} (paired p = {faith_p:.2g}); "
      f"minus the best random circuit {faith_vs_best}; rank p among {N_RANDOM} random circuits {rank_p:.2g}")
print(circ)
print(f"random circuits of {len(CIRCUIT)} heads: faithfulness {', '.join(f'{r:.2f}' for r in rand)} "
      f"(mean {sum(rand) / len(rand):.2f})")
no_nm = score([h for h in CIRCUIT if h not in NM])
print(f"circuit without its name movers: faithfulness {no_nm.faithfulness:.2f}")

# %% [markdown]
# ## 8 · Attribution patching against exact patching
#
# The gradient approximation of the same head grid (section 4) from two forward passes and one
# backward pass. Nanda found it good for head outputs on GPT-2 small's IOI.

# %%
approx = attribution_patch(model, ds.tokens, ds.corrupted_tokens, metric, "head_out", direction="noise")
cmp = compare(approx, exact)
print(cmp, "correlation over prompts:", cmp.correlation_ci())
cmp.plot();

# %% [markdown]
# ## 9 · The circuit, in the paper's terms
#
# The classes this run found, beside the paper's GPT-2 small heads, with the measurements that put
# each head in its class. The table and the summary below are rendered from this run's
# measurements; the findings record at the end re-derives every class from them, never from text.
# What to look for:
#
# * the **last stage** (name movers, negative name movers) should sit in the late layers, as in
#   GPT-2 small (layers 9-11 of 12): name movers attend from END to IO and copy it, negative name
#   movers write against IO;
# * an **S-suppression** head (not in the paper) attends from END to S2 and pushes the S logit
#   down: the mirror image of a negative name mover, close to copy suppression;
# * the **S-inhibition heads** attend from END to S2 and act through the name movers' **queries**;
#   they read, through their keys and values at S2, the heads that detect the repeated name:
#   **induction heads** (fed by **previous-token heads** through their keys) and **duplicate-token
#   heads**. Where a model shares keys and values between query heads (grouped-query attention,
#   as SmolLM2), those paths end at KV heads: no finer split exists for them;
# * **faithfulness** is compared with the paper's 87% with 26 heads, and with random circuits of
#   the same size. What the circuit keeps without its name movers shows whether other heads back
#   them up, as the paper's backup name movers did; what it misses can be carried by MLPs'
#   interaction with ablated heads and by heads below the effect thresholds.

# %%
from IPython.display import Markdown


def heads(hs):
    return ", ".join(head_label(*h) for h in hs) or "none found"


def each(hs, describe):
    return "; ".join(f"{head_label(*h)}: {describe(h)}" for h in hs) or "-"


nm_dla = sum(float(dla.heads.values[h]) for h in NM)
att_of = {h: att.values[i] for i, h in enumerate(direct)}  # END -> IO, S1, S2
dla_rank = {(c["layer"], c["head"]): rank for rank, (c, _) in enumerate(dla.heads.top(len(ALL), absolute=True), 1)}
route = {name: r.effect for name, r in routes.items()}
kv = sorted({str(k) for r in routes.values() for k in (r.meta.get("kv_receivers") or [])})
CLASSES = {  # class -> (heads, GPT-2 small's heads in the paper, evidence measured here)
    "name movers": (NM, "9.9, 9.6, 10.0",
                    f"DLA {nm_dla:+.2f} together; END->IO {nm_io:.2f} vs END->S {nm_s:.2f}"),
    "negative name movers": (NEG, "10.7, 11.10", each(NEG, lambda h: (
        f"END->IO {float(att_of[h][0]):.2f}, DLA {float(dla.heads.values[h]):+.2f}"))),
    "S-suppression (new)": (SSUP, "(none listed)", each(SSUP, lambda h: (
        f"END->S2 {float(att_of[h][2]):.2f}, S logit {float(s_dla.values[h]):+.2f}, "
        f"rank {dla_rank[h]} of {len(ALL)} by abs DLA, noised alone: {float(exact.values[h]):.2f} of the logit diff"))),
    "other direct": (classes["other direct"], "-", each(classes["other direct"], lambda h: (
        f"DLA {float(dla.heads.values[h]):+.2f}"))),
    "S-inhibition": (SINH, "7.3, 7.9, 8.6, 8.10",
                     f"END->S2 {', '.join(f'{float(v):.2f}' for v in sinh_att.values[:, 2])}; path into the name movers' "
                     f"queries alone: {sinh_path.effect:.0%} of the effect (random same-layer heads: "
                     f"{', '.join(f'{c:.0%}' for c in controls)})" if SINH else "-"),
    "induction": (IND, "5.5, 6.9", each(IND, lambda h: (
        f"S2->S1+1 {float(ind_ioi[h]):.2f}, induction score {float(scores['induction'].values[h]):.2f}"))),
    "previous-token": (PREV, "2.2, 4.11", each(PREV, lambda h: (
        f"previous-token score {float(scores['previous_token'].values[h]):.2f}"))
        + (f"; path into the induction heads' keys: {route['previous-token -> induction k']:.0%}"
           if "previous-token -> induction k" in route else "")),
    "duplicate-token": (DUP, "0.1, 3.0", each(DUP, lambda h: f"S2->S1 {float(dup_ioi[h]):.2f}")),
}
table = [f"| class | {MODEL} (found here) | GPT-2 small (paper) | evidence here |", "|---|---|---|---|"]
table += [f"| {name} | {heads(hs)} | {paper} | {evidence} |" for name, (hs, paper, evidence) in CLASSES.items()]
last = sorted({l for l, _ in NM + NEG})
summary = [
    f"* **Last stage**: layers {', '.join(map(str, last))} of {cfg.n_layers} (GPT-2 small: 9-11 of 12).",
    "* **Routes into the S-inhibition heads and the induction heads** (share of the effect): "
    + (", ".join(f"{name} {effect:.0%}" for name, effect in route.items()) or "none tested")
    + (f"; KV heads patched: {', '.join(kv)}" if kv else "") + ".",
    f"* **Faithfulness** ({'quick' if QUICK else 'full'} profile, {N_HELD_OUT} held-out prompts): mean-ablating the other "
    f"{len(ALL) - len(CIRCUIT)} heads keeps {circ.faithfulness:.0%} of the logit difference with {len(CIRCUIT)} heads "
    f"(GPT-2 small: 87% with 26); random circuits of the same size keep {sum(rand) / len(rand):+.2f} on average; "
    f"without its name movers the circuit keeps {no_nm.faithfulness:.0%}.",
    f"* **Attribution patching** against exact patching: r = {cmp.correlation:.2f} over {cmp.n} heads.",
]
Markdown("\n".join(table) + "\n\n" + "\n".join(summary))

# %%
record = FindingsRecord("02_ioi_circuit", model=MODEL)
record.parameters = dict(n_prompts=N_PROMPTS, n_held_out=N_HELD_OUT, n_random=N_RANDOM, dla_frac=DLA_FRAC,
                         path_frac=PATH_FRAC, max_class=MAX_CLASS, sender_span=SENDER_SPAN, seed=SEED)
src = "Wang et al. 2022"


def check_class(claim, heads_found, estimate, **kw):
    """record.check where the class was found; a claim that does not hold where it was not."""
    if heads_found and estimate is not None:
        return record.check(claim, estimate, source=src, **kw)
    thresholds = {k: kw.pop(k) for k in ("above", "below") if k in kw}
    return record.add(claim, "no such heads found", holds=False, source=src, **thresholds, **kw)


record.check(
    "The model does IOI: mean logit difference IO - S above 1 (logits)",
    wide.logit_diff_ci(), above=1.0, reference="GPT-2 small: logit diff 3.56", source=src, n_prompts=N_HELD_OUT,
)
record.check(
    "The model does IOI: IO > S on more than 80% of prompts",
    wide.accuracy_ci(), above=0.8, reference="GPT-2 small: IO > S in 99.3%", source=src, n_prompts=N_HELD_OUT,
)
record.check(
    "The ABC corruption removes the preference: mean logit difference on ABC prompts within half the clean one "
    "(clean vs ABC paired p-value recorded)",
    wide.corrupted_ci(), above=-0.5 * wide.logit_diff, below=0.5 * wide.logit_diff,
    reference="ABC prompts carry no IO/S signal", source=src, clean=wide.logit_diff_ci().to_dict(), p_value=wide_p,
)
check_class(
    "Name movers: together they write more than 15% of the logit difference directly (DLA, per prompt)",
    NM, nm_dla_share, above=0.15, reference="GPT-2 small: 9.9, 9.6, 10.0", heads=[head_label(*h) for h in NM],
)
check_class(
    "Name movers attend from END to IO more than 1.5x as much as to S (S1 + S2), per prompt",
    NM, nm_att_margin, above=0.0, reference="GPT-2 small: 9.9, 9.6, 10.0", heads=[head_label(*h) for h in NM],
    attn_IO=round(nm_io, 3), attn_S=round(nm_s, 3),
)
neg_idx = [direct.index(h) for h in NEG]
check_class(
    "Negative name movers write against IO: their summed DLA is below 0 (per prompt)",
    NEG, mean_ci(sum(dla.heads.at(layer=l, head=h) for l, h in NEG)) if NEG else None, below=0.0,
    reference="GPT-2 small: 10.7, 11.10", heads={head_label(*h): dla.heads.estimate(layer=h[0], head=h[1]).to_dict() for h in NEG},
)
check_class(
    "Negative name movers attend from END to IO more than to S (S1 + S2), per prompt",
    NEG, mean_ci((att.per_prompt[:, neg_idx, 0] - att.per_prompt[:, neg_idx, 1] - att.per_prompt[:, neg_idx, 2]).mean(1)) if NEG else None,
    above=0.0, reference="GPT-2 small: 10.7, 11.10", heads=[head_label(*h) for h in NEG],
)
check_class(
    "S-inhibition-like heads act through the name movers' queries: path patching the class into those queries alone "
    "carries more than 10% of the effect",
    SINH, sinh_effect, above=0.1, reference="GPT-2 small: 7.3, 7.9, 8.6, 8.10", heads=[head_label(*h) for h in SINH],
)
check_class(
    "S-inhibition-like heads' path carries over 2x the effect of the strongest of 3 random same-layer head sets "
    "(per prompt: effect minus 2x control, above 0)",
    SINH, sinh_margin, above=0.0, reference="GPT-2 small: 7.3, 7.9, 8.6, 8.10", p_value=sinh_p,
    random_controls=[mean_ci(effect_per_prompt(r)).to_dict() for r in ctrl_results],
)
upstream_heads = IND + DUP
s2_sum = {h: s2.at(head=head_label(*h), key="S1") + s2.at(head=head_label(*h), key="S1+1") for h in upstream_heads}
weakest = min(upstream_heads, key=lambda h: float(s2_sum[h].mean())) if upstream_heads else None
check_class(
    "Upstream of the S-inhibition heads sit heads that attend from S2 to S1+1 (induction) or S1 (duplicate token): "
    "the weakest of them puts more than 0.2 of its attention on S1 + S1+1",
    upstream_heads, mean_ci(s2_sum[weakest]) if weakest else None, above=0.2,
    reference="GPT-2 small: induction 5.5, 6.9; duplicate-token 0.1, 3.0",
    induction=[head_label(*h) for h in IND], duplicate=[head_label(*h) for h in DUP],
    previous_token=[head_label(*h) for h in PREV], weakest=head_label(*weakest) if weakest else None,
    routes={k: r.ci().to_dict() for k, r in routes.items()},
)
faith_details = dict(
    # everything needed to re-check the claim elsewhere: every head of the circuit, by class
    circuit=[head_label(*h) for h in CIRCUIT],
    classes={name: [head_label(*h) for h in hs] for name, (hs, _, _) in CLASSES.items()},
    without_name_movers=no_nm.faithfulness_ci().to_dict(), n_prompts=N_HELD_OUT, n_heads=len(CIRCUIT),
)
record.check(
    "The circuit alone keeps more than 40% of the logit diff when every other head is mean-ablated (ABC means per template)",
    circ.faithfulness_ci(), above=0.4, reference="GPT-2 small: 87% of the logit diff kept by 26 heads", source=src,
    **faith_details,
)
record.check(
    f"Random circuits of the same size keep far less: circuit minus the mean of {N_RANDOM} random circuits above 0.3 (per prompt)",
    faith_vs_mean, above=0.3, reference="GPT-2 small: 87% with 26 heads", source=src,
    p_value=faith_p, rank_p_value=rank_p, random=[round(r, 3) for r in rand],
)
record.check(
    "The circuit keeps more than the best random circuit of the same size (per prompt)",
    faith_vs_best, above=0.0, reference="GPT-2 small: 87% with 26 heads", source=src, rank_p_value=rank_p,
)
record.check(
    "Attribution patching approximates exact activation patching on the head grid: correlation above 0.6 (bootstrap over prompts)",
    cmp.correlation_ci(), above=0.6, reference="good for head outputs on GPT-2 small (Nanda 2023)", source="Nanda 2023",
    cells=cmp.n,
)
record.conclude()
