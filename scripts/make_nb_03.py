"""Write notebooks/03_factual_recall_causal_tracing.ipynb (without outputs). Run: python scripts/make_nb_03.py"""

from nbgen import Cells

cells = Cells()
md, code = cells.md, cells.code

md(r"""
# 03 · Where facts are recalled: causal tracing (ROME)

**Finding.** When GPT-2 XL completes *"The Eiffel Tower is located in the city of"* with
*" Paris"*, the fact is recalled at two sites. Corrupting the subject's token embeddings with
noise destroys the prediction; restoring a **single clean hidden state** brings it back only at
a few places:

* an **early site**: the **last subject token** in the **early-to-middle layers**, where the
  **MLP** outputs carry the effect (restoring MLP outputs there helps; attention outputs barely);
* a **late site**: the **last token** in the **late layers**, reached through **attention**
  (attention outputs at the last token restore the prediction, MLPs there much less).

Severing the MLPs (holding them at their corrupted values) while restoring the hidden state at
the last subject token removes most of the early-layer effect; severing attention does not.
This led ROME to the picture of mid-layer MLPs at the subject as the fact's key-value store,
which it then edits.

We reproduce the measurement on SmolLM2-135M (30 layers), over the facts the model knows, and
set the results beside the paper's GPT-2 XL numbers.

*Source:* Meng, Bau, Andonian & Belinkov 2022, "Locating and Editing Factual Associations in
GPT" (ROME, NeurIPS; arXiv 2202.05262), Figs. 1-3 and §2.
""")

code(r"""
import mechlib.reports

MODEL = "smollm2-135m"   # or "gpt2-small" where the Hugging Face hub is reachable
SEED = 0
QUICK = mechlib.reports.quick()

N_FACTS = 8 if QUICK else 30           # known facts traced and averaged (ROME: 1,000)
SAMPLES = 3 if QUICK else 10           # noise samples per fact (ROME: 10)
NOISE_MULTIPLIER = 3.0                 # noise std = 3 x std of subject-token embeddings (ROME)
WINDOW = 10                            # layers restored together for MLP / attention (ROME: 10)
CANDIDATE_STRIDE = 3 if QUICK else 1   # score every n-th fact of the dataset for "known"
""")
cells[-1].metadata["tags"] = ["parameters"]

code(r"""
import random
import time

import matplotlib.pyplot as plt
import torch

import mechlib
from mechlib.causal_tracing import average_by_role, trace_facts
from mechlib.facts import known_facts, load_facts, noise_scale
from mechlib.reports import FindingsRecord

mechlib.set_threads()
torch.manual_seed(SEED)
model = mechlib.load_model(MODEL)
n_layers = model.cfg.n_layers
print(MODEL, f"{n_layers} layers")
""")

md(r"""
## The facts the model knows

ROME traces only facts the model gets right: its top-1 next token after the prompt is the
attribute. mechlib's dataset (`mechlib/data/facts.json`) holds cloze prompts over 14 relations
(capitals, landmarks, languages, authors, ...). Attributes that are several tokens for this
tokenizer are skipped (causal tracing measures one next token).
""")

code(r"""
t0 = time.perf_counter()
candidates = load_facts()[::CANDIDATE_STRIDE]
known = [k.fact for k in known_facts(model, candidates, progress=False)]
print(f"kept {len(known)} known facts of {len(candidates)} candidates "
      f"({len(known) / len(candidates):.0%}) [{time.perf_counter() - t0:.0f} s]")
scale = noise_scale(model, known)
print(f"noise std = {NOISE_MULTIPLIER:g} x {scale.std:.4f} = {scale.noise(NOISE_MULTIPLIER):.4f}, measured on {scale.measured_on}")

# A seeded sample of known facts; the Eiffel Tower first when the model knows it (it is our example).
rng = random.Random(SEED)
sample = rng.sample(known, min(N_FACTS, len(known)))
eiffel = [f for f in known if f.subject == "Eiffel Tower"]
if eiffel and eiffel[0] not in sample:
    sample = [eiffel[0]] + sample[:-1]
sample.sort(key=lambda f: f.subject != "Eiffel Tower")
for f in sample:
    print(f"  {f.prompt!r} -> {f.attribute!r}")
""")

md(r"""
## Tracing: every fact, every kind, with the MLPs severed

For each fact: the clean run, `SAMPLES` corrupted runs (noise on the subject's token embeddings),
and for every (layer, token) the corrupted runs with one clean state restored: the hidden state
after that layer (`blocks.L.hook_resid_post`), or the MLP / attention outputs of a window of
`WINDOW` layers centred on `L`. The severed trace restores the hidden state at the last subject
token while the MLP (or attention) outputs at that token in all later layers stay at their
corrupted values. `mechlib.causal_tracing` runs all of a fact's restorations in a few batched
engine calls, each reusing the corrupted run below the restored layer and before the restored
token.
""")

code(r"""
t0 = time.perf_counter()
traces = trace_facts(model, sample, samples=SAMPLES, noise=scale.noise(NOISE_MULTIPLIER), window=WINDOW,
                     seed=SEED, severed=("mlp", "attn"))
trace_seconds = time.perf_counter() - t0
print(f"traced {len(traces)} facts in {trace_seconds:.0f} s ({trace_seconds / len(traces):.1f} s per fact)")
""")

md(r"""
### One fact in full

ROME's Fig. 1: each row is a token (subject tokens starred), each column the layer restored; the
colour is the probability of the attribute after restoring that state (white = the corrupted
run's probability).
""")

code(r"""
example = traces[0]
print(example)
fig = example.plot(model_name=MODEL)
plt.show()
""")

md(r"""
## Averaged over the known facts, by token role

ROME's Fig. 2 averages the indirect effect (restored minus corrupted probability) over facts,
grouping tokens by their role: first / middle / last subject token, first token after the
subject, further tokens, last token.
""")

code(r"""
avg = average_by_role(traces)
print(avg)
print(f"average clean p = {avg.clean_prob:.3f}, corrupted p = {avg.corrupted_prob:.3f}, "
      f"average total effect = {avg.total_effect:.3f}")
peaks = {kind: avg.peak(kind) for kind in avg.kinds}
for kind, p in peaks.items():
    print(f"  peak {kind:5s}: layer {p.layer:2d}, {p.label:24s} {p.value:.3f}")
fig = avg.plot(model_name=MODEL)
plt.show()
""")

md(r"""
Where the effects sit, role by role (the layer of each role's largest effect, and its value):
""")

code(r"""
for kind in avg.kinds:
    g = avg.effect(kind)
    cells_ = []
    for r, role in enumerate(g.labels["role"]):
        col = torch.nan_to_num(g.values[:, r], nan=float("-inf"))
        cells_.append(f"{role}: L{int(col.argmax())} {float(col.max()):.2f}" if avg.role_counts[role] else f"{role}: n/a")
    print(f"{kind:5s} | " + " | ".join(cells_))

first_half = slice(0, n_layers // 2)
last_subj = avg.at("resid", "last subject token").values
last_tok = avg.at("resid", "last token").values
after_subj = torch.stack([avg.at("resid", r).values for r in ("first subsequent token", "further tokens")])
SUBJECT_ROLES = ("first subject token", "middle subject tokens", "last subject token")
subject_roles = torch.nan_to_num(torch.stack([avg.at("resid", r).values for r in SUBJECT_ROLES]), nan=0.0)
sr = subject_roles[:, first_half]
subj_role, subj_layer = (int(i) for i in (sr == sr.max()).nonzero()[0])
subj_profile = subject_roles.max(0).values  # per layer, the strongest subject role
handover = next((l for l in range(n_layers) if last_tok[l] > subj_profile[l]), n_layers)
print(f"hidden state: last subject token max {last_subj[first_half].max():.3f} at L{int(last_subj[first_half].argmax())} "
      f"(first half); tokens after the subject max {torch.nan_to_num(after_subj[:, first_half], nan=0).max():.3f}; "
      f"the last token overtakes the subject tokens at layer {handover} of {n_layers}")
""")

md(r"""
## Severing the MLPs (ROME Fig. 3)

The hidden state at the last subject token is restored at layer `L`; in the severed runs the
MLP (green) or attention (red) outputs at that token in every layer above `L` are held at their
corrupted values. If the restored state works *through* the MLPs above it, severing them removes
the effect. Early layers are the test: from the middle layers on, the MLPs have done their work.
""")

code(r"""
fig = avg.plot_severed()
plt.show()
early = slice(0, n_layers // 3)
sev = avg.severed
none_e, mlp_e, attn_e = (float(sev.values[early, i].mean()) for i in range(3))
print(f"mean indirect effect at the last subject token, layers 0-{n_layers // 3 - 1}: "
      f"nothing severed {none_e:.3f}, MLPs severed {mlp_e:.3f}, attention severed {attn_e:.3f}")
""")

md(r"""
## Beside the paper (GPT-2 XL, 48 layers; ROME §2 and Figs. 1-3)

| measurement | GPT-2 XL (ROME) | this model |
|---|---|---|
| facts averaged | 1,000 known facts | printed below |
| clean / corrupted p | 27.0% / 8.47% | printed below |
| average total effect | 18.6% | printed below |
| hidden-state peak | last subject token, layer 15 of 48 (8.7%) | printed below |
| MLP peak | last subject token, window centred on layer 17 (6.6%) | printed below |
| attention | last token, late layers; last subject token only 1.6% | printed below |
| severing MLPs | early-layer effect at the last subject token collapses | printed below |

**Where SmolLM2 differs.** The picture has the same two sites, but (i) the corruption removes far
more here (SmolLM2 knows its facts with high confidence and a 135M model has little redundancy),
so every effect is larger in absolute terms; (ii) the MLP effect at the subject is concentrated
in the **first** layers: every window that contains MLP 0 restores most of it, and windows
centred above layer `WINDOW // 2` (which leave MLP 0 out) restore much less, so the MLP peak is
at the first windows rather than in the middle of the network (in many small models MLP 0 acts as
an extended embedding); (iii) the first subject token carries almost as much as the last
(nearly half of the known facts have one-token subjects, where the two roles are the same token,
and for multi-token subjects the first token's clean state still restores much of the fact);
(iv) the handover to the last token is abrupt, a few layers around three quarters of the depth.
""")

code(r"""
mlp_last_subj = avg.at("mlp", "last subject token").values
no_mlp0 = slice(WINDOW // 2 + 1, n_layers)
rows = [
    ("facts averaged", "1,000", f"{avg.n_facts} of {len(known)} known"),
    ("clean / corrupted p", "27.0% / 8.47%", f"{avg.clean_prob:.1%} / {avg.corrupted_prob:.1%}"),
    ("average total effect", "18.6%", f"{avg.total_effect:.1%}"),
    ("hidden-state peak (subject roles)", "last subject token, L15/48, 8.7%",
     f"{SUBJECT_ROLES[subj_role]}, L{subj_layer}/{n_layers}, {sr.max():.1%}"),
    ("hidden-state peak (all)", "", f"{peaks['resid'].label}, L{peaks['resid'].layer}, {peaks['resid'].value:.1%}"),
    ("MLP peak", "last subject token, L17/48, 6.6%", f"{peaks['mlp'].label}, L{peaks['mlp'].layer}, {peaks['mlp'].value:.1%}"),
    ("MLP at last subject token, windows without MLP 0", "",
     f"max {mlp_last_subj[no_mlp0].max():.1%} at L{int(mlp_last_subj[no_mlp0].argmax()) + no_mlp0.start}"),
    ("attention peak", "last token, late layers", f"{peaks['attn'].label}, L{peaks['attn'].layer}, {peaks['attn'].value:.1%}"),
    ("attention at last subject token", "1.6%", f"{avg.at('attn', 'last subject token').values.max():.1%}"),
    ("early-layer effect at last subject token: none / MLP / attn severed", "MLP-severed collapses",
     f"{none_e:.1%} / {mlp_e:.1%} / {attn_e:.1%}"),
]
for name, ref, ours in rows:
    print(f"{name:70s} | {ref:34s} | {ours}")
""")

md(r"""
## Findings

Each claim is tested on this run's own measurements, with margins a random model (whose
clean probabilities are near zero) or a broken tracer (no effect anywhere, or effects in the
wrong place) would fail.
""")

code(r"""
record = FindingsRecord("03_factual_recall_causal_tracing", model=MODEL)
record.parameters = dict(n_facts=len(traces), samples=SAMPLES, noise=scale.noise(NOISE_MULTIPLIER),
                         noise_multiplier=NOISE_MULTIPLIER, window=WINDOW, seed=SEED, candidates=len(candidates))
src = "Meng et al. 2022 (ROME), §2, Figs. 1-3"
record.add(
    "The model knows many of the facts (top-1 = attribute), enough to average over",
    {"known": len(known), "candidates": len(candidates)},
    holds=len(known) >= N_FACTS and len(known) >= 0.2 * len(candidates),
    reference="GPT-2 XL: 1,000 known facts used", source=src,
)
record.add(
    "Corrupting the subject destroys the prediction: average total effect > 0.2",
    {"total_effect": avg.total_effect, "clean": avg.clean_prob, "corrupted": avg.corrupted_prob},
    holds=avg.total_effect > 0.2 and avg.corrupted_prob < 0.5 * avg.clean_prob,
    reference="GPT-2 XL: 18.6% (clean 27.0%, corrupted 8.47%)", source=src,
)
subj_max = float(sr.max())
after_max = float(torch.nan_to_num(after_subj[:, first_half], nan=0).max())
record.add(
    "Early site: the hidden-state effect over the subject peaks at a subject token in the first half of the layers "
    "(> 0.2 and > 30% of the total effect); the last subject token carries > 0.15 there; tokens after the subject < 25% of it",
    {"subject_peak": subj_max, "last_subject_peak": float(last_subj[first_half].max()), "after_subject_peak": after_max},
    holds=subj_max > 0.2 and subj_max > 0.3 * avg.total_effect and float(last_subj[first_half].max()) > 0.15
    and after_max < 0.25 * float(last_subj[first_half].max()),
    reference="GPT-2 XL: last subject token, layer 15 of 48, 8.7%", source=src,
)
late = float(last_tok[3 * n_layers // 4:].mean())
record.add(
    "Late site: the hidden state at the last token restores > half the total effect in the last quarter of the layers, "
    "~nothing at layer 0, and overtakes the subject tokens only in the second half",
    {"last_token_late_mean": late, "last_token_layer0": float(last_tok[0]), "handover_layer": handover},
    holds=late > 0.5 * avg.total_effect and float(last_tok[0]) < 0.1 * avg.total_effect and n_layers // 2 <= handover < n_layers,
    reference="GPT-2 XL: last token, late layers", source=src,
)
record.add(
    "MLP: the indirect effect peaks at a subject token (first or last) in the first third of the layers, > 0.15, "
    "and there exceeds the last token's MLP effect",
    {"peak": repr(peaks["mlp"]), "last_token_mlp_early_max": float(avg.at("mlp", "last token").values[early].max())},
    holds=peaks["mlp"].label in ("first subject token", "last subject token") and peaks["mlp"].layer < n_layers // 3
    and peaks["mlp"].value > 0.15 and peaks["mlp"].value > 2 * float(avg.at("mlp", "last token").values[early].max()),
    reference="GPT-2 XL: last subject token, window centred on layer 17 of 48, 6.6%", source=src,
)
attn_subj = float(avg.at("attn", "last subject token").values.max())
record.add(
    "Attention: the indirect effect peaks at the last token in the second half of the layers (> 0.2); "
    "at the last subject token it stays below 20% of that peak",
    {"peak": repr(peaks["attn"]), "last_subject_token_max": attn_subj},
    holds=peaks["attn"].label == "last token" and peaks["attn"].layer >= n_layers // 2 and peaks["attn"].value > 0.2
    and attn_subj < 0.2 * peaks["attn"].value,
    reference="GPT-2 XL: last token, late layers; 1.6% at the last subject token", source=src,
)
record.add(
    "Severing the MLPs lowers the early-layer effect at the last subject token (to < 70%), and by more than twice "
    "what severing attention does",
    {"none": none_e, "mlp_severed": mlp_e, "attn_severed": attn_e},
    holds=none_e > 0.1 and mlp_e < 0.7 * none_e and (none_e - attn_e) < 0.5 * (none_e - mlp_e),
    reference="GPT-2 XL: the MLP-severed effect collapses in early layers; attention-severed barely changes", source=src + " Fig. 3",
)
record.conclude()
""")

cells.write("03_factual_recall_causal_tracing.ipynb")
