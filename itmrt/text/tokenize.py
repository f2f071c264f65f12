"""Word tokenisation equal to ``nltk.word_tokenize`` without importing nltk.

The released NAAF/SCAN code turns a caption into tokens with
``nltk.word_tokenize(caption.lower())``. That function does two things:

1. split the text into sentences with punkt (see :mod:`itmrt.text.sentences`
   for how itmrt does that offline and where it may differ from punkt);
2. run NLTK's improved Treebank word tokenizer (``NLTKWordTokenizer``) on
   each sentence and concatenate the tokens.

This module implements step 2 as an ordered list of regular-expression
rewrites; each rewrite pads something with spaces (or rewrites a quote), and
the final string is split on whitespace. The rules and their order are those
of ``NLTKWordTokenizer.tokenize`` (checked against nltk 3.10,
``convert_parentheses`` off); ``tests/test_text_tokenize.py`` checks the two agree on thousands of
generated captions. The rules are written for the standard :mod:`re` module;
nltk compiles its patterns with the third-party ``regex`` module, whose
Unicode classes (``\\w``, ``\\b``) disagree with :mod:`re` on rare
characters. Combining diacritics (U+0300-U+036F, decomposed accents) are
handled like nltk in the quote rule; known remaining differences, next to a
single quote or inside "cannot"/"gonna"-like words only: other combining
marks, digits such as superscripts that :mod:`re` counts as word characters
and ``regex`` does not, and letters such as circled letters that ``regex``
counts and :mod:`re` does not.

The consequence that matters for captions: only the period that ends the
*sentence* given to the word tokenizer is split from its word, so "a dog.
a cat." gives ``a dog . a cat .`` only because punkt split it into two
sentences first.
"""

from __future__ import annotations

import re
from re import Pattern

from itmrt.text.sentences import split_sentences

__all__ = ["control_character", "word_tokenize", "treebank_tokenize"]

_Rule = tuple[Pattern[str], str]

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
"""Unicode's control characters (category Cc) but the tab, which is whitespace between words."""


def control_character(caption: str) -> str | None:
    """The first control character in ``caption`` as ``U+XXXX``, or None. A NUL, an escape sequence or a line
    break inside a caption is no word: the tokenizer made unknown words of it, and a caption holding a line break
    cannot be one line of a captions file or of results.jsonl read as text."""
    found = _CONTROL.search(caption)
    return None if found is None else f"U+{ord(found.group()):04X}"


def _rule(pattern: str, replacement: str) -> _Rule:
    return re.compile(pattern), replacement


# ``\w`` of the ``regex`` module (which nltk uses) counts combining marks as
# word characters, ``\w`` of :mod:`re` does not; adding the combining
# diacritics block keeps decomposed accents ("e" + U+0301) on nltk's side.
_WORD_CHARS = r"\w\u0300-\u036f"

# Stage 1: opening quotes. Unicode opening quotes and backtick runs stand
# alone; a straight double quote (or two single quotes) opening the text or
# following a space/bracket becomes ``; a single quote glued to the front of
# a word is split from it unless the word is a clitic ('s, 're, 'll, ...).
_OPENING_QUOTES: list[_Rule] = [
    _rule(r"([«“‘„]|`+)", r" \1 "),
    _rule(r'^"', "``"),
    _rule(r"(``)", r" \1 "),
    _rule(r"""([ (\[{<])("|'')""", r"\1 `` "),
    _rule(
        r"(?i)(?<![" + _WORD_CHARS + r"])(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=[" + _WORD_CHARS + r"])",
        r"\1 ",
    ),
]

# Characters that may trail the sentence-final period (closing brackets and
# quotes); the first period rule also lets spaces trail.
_CLOSERS = r"\])}>\"'"

# Stage 2: punctuation. Order matters: the two "final period" rules run at
# different points and see different text (the first one before ellipses and
# question marks are padded).
_PUNCTUATION: list[_Rule] = [
    # nltk writes this run of closers possessively ("*+", Python 3.11+); the
    # greedy form gives the same match (only the longest run can reach "$").
    _rule(r"([^.])(\.)([" + _CLOSERS + r"»”’ ]*)\s*$", r"\1 \2 \3 "),
    # A comma or colon is split off unless a digit follows (1,000 and 3:30).
    _rule(r"([:,])([^\d])", r" \1 \2"),
    _rule(r"([:,])$", r" \1 "),
    _rule(r"\.{2,}", r" \g<0> "),
    _rule(r"[;@#$%&]", r" \g<0> "),
    # figure dash, en dash, em dash, horizontal bar
    _rule(r"[\u2012-\u2015]", r" \g<0> "),
    _rule(r"([^.])(\.)([" + _CLOSERS + r"]*)\s*$", r"\1 \2\3 "),
    _rule(r"[?!]", r" \g<0> "),
    _rule(r"([^'])' ", r"\1 ' "),
    _rule(r"[*]", r" \g<0> "),
]

_BRACKETS: _Rule = _rule(r"[\]\[(){}<>]", r" \g<0> ")
_DOUBLE_DASH: _Rule = _rule(r"--", r" -- ")

# Stage 3 (on the text padded with a space at both ends): closing quotes and
# clitics. Remaining straight double quotes close a quotation and become ''.
_CLOSING_QUOTES: list[_Rule] = [
    _rule(r"([»”’])", r" \1 "),
    _rule(r"''", " '' "),
    _rule(r'"', " '' "),
    _rule(r"\s+", " "),
    _rule(r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    _rule(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
]

# Stage 4: words written as one that the Penn Treebank splits in two
# (cannot -> can not, gonna -> gon na, 'tis -> 't is, ...).
_SPLIT_WORDS: list[Pattern[str]] = [
    re.compile(pattern)
    for pattern in (
        r"(?i)\b(can)(not)\b",
        r"(?i)\b(d)('ye)\b",
        r"(?i)\b(gim)(me)\b",
        r"(?i)\b(gon)(na)\b",
        r"(?i)\b(got)(ta)\b",
        r"(?i)\b(lem)(me)\b",
        r"(?i)\b(more)('n)\b",
        r"(?i)\b(wan)(na)(?=\s)",
        r"(?i) ('t)(is)\b",
        r"(?i) ('t)(was)\b",
    )
]


def _apply(rules: list[_Rule], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def treebank_tokenize(sentence: str) -> list[str]:
    """Tokenise one sentence like ``nltk.tokenize.NLTKWordTokenizer().tokenize``."""
    text = _apply(_OPENING_QUOTES, sentence)
    text = _apply(_PUNCTUATION, text)
    text = _apply([_BRACKETS, _DOUBLE_DASH], text)
    text = _apply(_CLOSING_QUOTES, " " + text + " ")
    for pattern in _SPLIT_WORDS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` as ``nltk.word_tokenize(text)`` gives them.

    The text is split into sentences (:func:`itmrt.text.sentences.split_sentences`)
    and each sentence is tokenised with :func:`treebank_tokenize`. Callers that
    follow the released models lower-case the caption first.
    """
    return [token for sentence in split_sentences(text) for token in treebank_tokenize(sentence)]
