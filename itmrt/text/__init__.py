"""Vocabulary and tokenizer: captions to token ids as the released models expect.

Imports only the standard library and numpy (the runtime uses it; no nltk).
"""

from __future__ import annotations

from itmrt.text.sentences import ABBREVIATIONS, split_sentences
from itmrt.text.tokenize import treebank_tokenize, word_tokenize
from itmrt.text.vocab import SPECIAL_TOKENS, CaptionTooLongError, Vocabulary, tokenize_caption

__all__ = [
    "ABBREVIATIONS",
    "SPECIAL_TOKENS",
    "CaptionTooLongError",
    "Vocabulary",
    "split_sentences",
    "tokenize_caption",
    "treebank_tokenize",
    "word_tokenize",
]
