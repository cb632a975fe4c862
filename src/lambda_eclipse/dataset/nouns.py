"""Stage ``nouns``: the caption's subject nouns (spaCy), each with the noun phrase the detector will look for.

The subject *word* is a single noun token of the caption (what the λ binding replaces); its *phrase* is the noun
chunk around it when the pipeline has a parser ("a brown dog" -> word "dog", phrase "brown dog"), else the word.
"""

from __future__ import annotations

from typing import Sequence

from ..conditioning import normalize_subject_word
from ..errors import UserError

DEFAULT_SPACY_MODEL = "en_core_web_sm"


def load_spacy(name: str = DEFAULT_SPACY_MODEL):
    """Load a spaCy pipeline by package name or path; a missing one is a one-line error with the install command."""
    try:
        import spacy
    except ImportError:
        raise UserError('the nouns stage needs spaCy; run `pip install "lambda-eclipse[dataset]"`') from None
    try:
        return spacy.load(name)
    except OSError:
        raise UserError(f"spaCy model {name!r} is not installed; run `python -m spacy download {name}`") from None


def subject_nouns(nlp, captions: Sequence[str], max_nouns: int = 8) -> list[dict[str, str]]:
    """For each caption, ``{word: phrase}`` of its nouns in caption order (unique words, at most ``max_nouns``).

    Uses the tagger's ``NOUN`` part of speech; with a dependency parser, the phrase is the noun chunk whose root is
    the word, without leading determiners.
    """
    results = []
    for doc in nlp.pipe(list(captions)):
        chunks = {}
        if doc.has_annotation("DEP"):
            for chunk in doc.noun_chunks:
                words = [t for t in chunk if t.pos_ not in ("DET", "PRON")]
                if words:
                    chunks[chunk.root.i] = " ".join(t.text for t in words)
        found: dict[str, str] = {}
        for token in doc:
            if token.pos_ != "NOUN":
                continue
            word = normalize_subject_word(token.text)
            if word and word not in found and len(found) < max_nouns:
                found[word] = normalize_subject_word(chunks.get(token.i, token.text)) or word
        results.append(found)
    return results
