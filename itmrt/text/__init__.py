"""Vocabulary and tokenizer: captions to token ids as the released models expect.

Imports only the standard library and numpy (the runtime uses it; no nltk).
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "ABBREVIATIONS": "itmrt.text.sentences",
    "split_sentences": "itmrt.text.sentences",
    "treebank_tokenize": "itmrt.text.tokenize",
    "word_tokenize": "itmrt.text.tokenize",
    "SPECIAL_TOKENS": "itmrt.text.vocab",
    "CaptionTooLongError": "itmrt.text.vocab",
    "UnknownWords": "itmrt.text.vocab",
    "Vocabulary": "itmrt.text.vocab",
    "count_unknown_words": "itmrt.text.vocab",
    "tokenize_caption": "itmrt.text.vocab",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
