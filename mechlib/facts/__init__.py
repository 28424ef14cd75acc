"""Factual-recall prompts and subject-token bookkeeping for causal tracing (ROME).

Meng et al. (2022, "Locating and Editing Factual Associations in GPT", arXiv 2202.05262) trace
where a model recalls a fact such as *(Eiffel Tower, located in city, Paris)* by corrupting the
subject's tokens and restoring single hidden states. This module supplies everything that trace
needs apart from the patching itself:

* a dataset of facts written for mechlib (``mechlib/data/facts.json``), loaded by
  :func:`load_facts` as :class:`Fact` objects;
* the token positions of the subject inside a prompt (:func:`subject_token_span`), found from the
  tokenizer's character offsets, so a subject whose first token has merged with the preceding
  space (``" Eiffel"``) is found correctly;
* the token *roles* that ROME's figures average over (:data:`TOKEN_ROLES`, :func:`token_roles`,
  :func:`role_positions`, :func:`average_by_role`);
* :func:`known_facts`, which keeps the facts whose top-1 prediction is the attribute, batched;
* :func:`noise_scale`, the standard deviation of the subject tokens' embeddings, which sets the
  size of the corrupting noise (ROME adds Gaussian noise of 3 x this value).

Example:
    >>> from mechlib.facts import load_facts, tokenize_fact, known_facts, noise_scale
    >>> facts = load_facts(["landmark_city"])
    >>> facts[0].prompt
    'The Eiffel Tower is a famous landmark in the city of'
    >>> import mechlib
    >>> model = mechlib.load_model("smollm2-135m")                  # doctest: +SKIP
    >>> tf = tokenize_fact(model, facts[0])                           # doctest: +SKIP
    >>> tf.str_tokens[tf.subject_start:tf.subject_end]                # doctest: +SKIP
    [' E', 'iffel', ' Tower']
    >>> tf.roles                                                      # doctest: +SKIP
    ['before subject', 'first subject token', 'middle subject tokens', 'last subject token',
     'first subsequent token', 'further tokens', ..., 'last token']
    >>> known = known_facts(model, facts)                             # doctest: +SKIP
    >>> noise_scale(model, [k.fact for k in known]).std               # doctest: +SKIP

Layout (every name is importable from ``mechlib.facts``): :mod:`mechlib.facts.dataset` (the
facts and their loader), :mod:`mechlib.facts.tokens` (subject and attribute tokens),
:mod:`mechlib.facts.roles` (ROME's token roles), :mod:`mechlib.facts.known` (which facts the
model predicts), :mod:`mechlib.facts.noise` (the noise scale).
"""

from mechlib.facts.dataset import Fact, list_relations, load_facts
from mechlib.facts.known import FactScore, KnownFact, known_facts, score_facts
from mechlib.facts.noise import NoiseScale, block0_outputs, embedding_std, embedding_vectors, noise_scale
from mechlib.facts.roles import BEFORE_SUBJECT, TOKEN_ROLES, role_means, role_positions, token_roles
from mechlib.facts.tokens import TokenizedFact, attribute_token, prompt_tokens, subject_token_span, tokenize_fact

#: The old name of :func:`role_means`, kept so existing code runs; it is not the same function as
#: :func:`mechlib.causal_tracing.average_by_role` (which averages whole traces).
average_by_role = role_means

__all__ = [
    "BEFORE_SUBJECT",
    "TOKEN_ROLES",
    "Fact",
    "FactScore",
    "KnownFact",
    "NoiseScale",
    "TokenizedFact",
    "attribute_token",
    "block0_outputs",
    "embedding_std",
    "embedding_vectors",
    "known_facts",
    "list_relations",
    "load_facts",
    "noise_scale",
    "prompt_tokens",
    "role_means",
    "role_positions",
    "score_facts",
    "subject_token_span",
    "tokenize_fact",
    "token_roles",
]
