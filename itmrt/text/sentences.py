"""Sentence splitting that follows punkt's decisions on captions, offline.

``nltk.word_tokenize`` first splits its text into sentences with punkt
(``PunktSentenceTokenizer`` loaded with the trained ``english`` model). The
word tokenizer only splits off the period that ends the text it is given, so
the split matters: in "a dog runs. a cat sits." the inner period becomes its
own token ``.`` only because punkt ended a sentence there.

itmrt runs without nltk and without punkt's trained data files, so this
module re-implements punkt's *decision procedure* (candidate boundaries,
first-pass and second-pass token annotation, boundary realignment) and
replaces the trained model by fixed rules:

* **Abbreviations**: a curated list (:data:`ABBREVIATIONS`) stands in for
  the ~150 abbreviation types the English model learned. A word in the list
  followed by a period never ends a sentence here. The list contains the
  forms that the released COCO/Flickr30K vocabularies show punkt kept whole
  (``mr.``, ``mrs.``, ``dr.``, ``st.``, ``ave.``, ``u.s.``) and other common
  titles, street words, company suffixes and month names. Difference from
  punkt: an abbreviation the English model knows but the list lacks is
  treated as an ordinary word, so its period ends a sentence and is split
  off (and the reverse for a listed word the model does not know). ``etc``
  and ``no`` are deliberately not listed.
* **Orthographic context** (which words the model saw capitalised, or in
  lower case at a sentence start) is empty. Consequences, all identical to
  punkt for lower-cased captions, which is how the released models tokenise:

  - after an initial ("j.") or a number ("5.", "3.5."), a following word that
    starts in lower case (or is one of ``; : , . ! ?``) continues the
    sentence; punkt gives the same answer except for the rare words its
    model saw in lower case at a sentence start and never capitalised;
  - after an initial, a capitalised word continues the sentence (punkt: the
    same unless the model saw that word in lower case too);
  - after a number, a capitalised word or any other token (a digit, a
    bracket) starts a new sentence (punkt: the same unless the model's
    context says otherwise);
  - after an abbreviation or an ellipsis ("..."), the sentence never ends
    (punkt may end it when the next word is capitalised and known as a
    frequent sentence starter or as a lower-case word elsewhere; this cannot
    happen in lower-cased text).
* **Collocations** (pairs such as a number followed by a month, which punkt
  refuses to split) are not used: such a pair is decided by the rules above.

Everything else follows punkt exactly: a candidate boundary is ``.``, ``?``
or ``!`` followed by whitespace and a token, or directly by one of
``) " ; } ] * : @ ' ( { [ ? !`` and the curly quotes/guillemets; a word
ending in a period that is not an abbreviation, not an ellipsis and does not
end in ".." ends a sentence; ``?`` and ``!`` always do; "3.5" and "e.g.x"
never do (no whitespace after the period); closing quotes and brackets after
the boundary stay with the sentence they close; the text between sentences
is dropped, as is trailing whitespace of the last sentence.
``tests/test_text_sentences.py`` checks this splitter against nltk's own
``PunktSentenceTokenizer`` given the same abbreviation list and no other
trained data.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

__all__ = ["ABBREVIATIONS", "split_sentences", "sentence_spans"]

ABBREVIATIONS: frozenset[str] = frozenset(
    """
    mr mrs ms messrs dr prof rev fr sr jr gen col lt sgt capt cmdr gov sen rep pres
    st ave blvd rd mt ft hwy
    inc corp co ltd bros dept
    vs u.s u.k u.n e.g i.e a.m p.m
    jan feb mar apr jun jul aug sep sept oct nov dec
    """.split()
)
"""Lower-case abbreviation types (without the final period) that never end a sentence."""

_SENTENCE_END_CHARS = ".?!"
# Characters that cannot be part of a word; one of them directly after ".?!"
# also makes a candidate boundary.
_NON_WORD = r"[)\";}\]*:@'({\[‘’“”«»?!]"
_MULTI_CHAR_PUNCT = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_WORD_START = r"[^(\"`{\[:;&#*@)}\]\-,]"

_CANDIDATE = re.compile(r"[.?!](?=(?P<after>" + _NON_WORD + r"|\s+(?P<next>\S+)))")

# punkt's own (coarse) word segmentation, used only to classify the words
# around a candidate boundary.
_PUNKT_WORD = re.compile(
    _MULTI_CHAR_PUNCT
    + r"|(?="
    + _WORD_START
    + r")\S+?(?=\s|$|"
    + _NON_WORD
    + "|"
    + _MULTI_CHAR_PUNCT
    + r"|,(?=$|\s|"
    + _NON_WORD
    + "|"
    + _MULTI_CHAR_PUNCT
    + r"))|\S"
)

_ELLIPSIS = re.compile(r"\.\.+$")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.\-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
# Closing punctuation at the start of the next sentence that belongs to the
# previous one.
_REALIGN = re.compile(r"[\"')\]}‘’“”«»]+?(?:\s+|(?=--)|$)", re.MULTILINE)
# Tokens that cannot start a sentence.
_INNER_PUNCTUATION = frozenset(";:,.!?")


@dataclass
class _Word:
    """One punkt word with the decisions taken about it."""

    text: str
    sentence_break: bool = False
    abbreviation: bool = False
    ellipsis: bool = False
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        lowered = self.text.lower()
        self.kind = "##number##" if _NUMBER.match(lowered) else lowered

    @property
    def kind_without_period(self) -> str:
        if len(self.kind) > 1 and self.kind.endswith("."):
            return self.kind[:-1]
        return self.kind


def _punkt_words(text: str) -> list[_Word]:
    words: list[_Word] = []
    for line in text.split("\n"):
        if line.strip():
            words.extend(_Word(token) for token in _PUNKT_WORD.findall(line))
    return words


def _classify_alone(word: _Word) -> None:
    """Decide from the word itself: sentence-end mark, ellipsis, abbreviation or break."""
    token = word.text
    if token in _SENTENCE_END_CHARS:
        word.sentence_break = True
    elif _ELLIPSIS.match(token):
        word.ellipsis = True
    elif token.endswith(".") and not token.endswith(".."):
        stem = token[:-1].lower()
        if stem in ABBREVIATIONS or stem.split("-")[-1] in ABBREVIATIONS:
            word.abbreviation = True
        else:
            word.sentence_break = True


def _cannot_start_sentence(word: _Word) -> bool:
    """Orthographic evidence with no trained context: punctuation or a lower-case start."""
    return word.text in _INNER_PUNCTUATION or word.text[0].islower()


def _classify_with_next(word: _Word, following: _Word) -> None:
    """Revisit an initial or a number ending in a period in the light of the next word.

    With no orthographic context, abbreviations and ellipses are never turned
    into breaks, so only initials and numbers can change here.
    """
    if not word.text.endswith("."):
        return
    is_initial = _INITIAL.match(word.text) is not None
    if not (is_initial or word.kind_without_period == "##number##"):
        return
    if _cannot_start_sentence(following):
        word.sentence_break = False
        word.abbreviation = True
    elif is_initial and following.text[0].isupper():
        word.sentence_break = False
        word.abbreviation = True


def _has_break_inside(context: str) -> bool:
    """True when a word of ``context`` other than its last one ends a sentence."""
    words = _punkt_words(context)
    for word in words:
        _classify_alone(word)
    for word, following in zip(words, words[1:]):
        _classify_with_next(word, following)
        if word.sentence_break:
            return True
    return False


def _last_whitespace(text: str) -> int:
    """Index of the last ASCII whitespace character of ``text``, 0 when there is none."""
    for index in range(len(text) - 1, -1, -1):
        if text[index] in string.whitespace:
            return index
    return 0


def _candidates_with_context(text: str) -> list[tuple[re.Match[str], str]]:
    """Candidate boundaries with the text punkt judges them by.

    The context of a candidate is the word before it, the mark itself and
    what follows it (a non-word character, or whitespace and the next
    token). A run such as "!!!" yields only its last mark, with the whole run
    in its context.
    """
    found: list[tuple[re.Match[str], str]] = []
    previous: re.Match[str] | None = None
    previous_word = (0, 0)
    for match in _CANDIDATE.finditer(text):
        before = text[previous_word[1] : match.start()]
        space = _last_whitespace(before)
        # punkt treats whitespace at index 0 like no whitespace at all.
        word_start = previous_word[1] + space + 1 if space else previous_word[0]
        if previous is not None and previous_word[1] <= word_start:
            found.append((previous, _context(text, previous_word, previous)))
        previous = match
        previous_word = (word_start, match.start())
    if previous is not None:
        found.append((previous, _context(text, previous_word, previous)))
    return found


def _context(text: str, word: tuple[int, int], match: re.Match[str]) -> str:
    return text[word[0] : word[1]] + match.group() + match.group("after")


def _raw_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for match, context in _candidates_with_context(text):
        if _has_break_inside(context):
            spans.append((start, match.end()))
            start = match.start("next") if match.group("next") else match.end()
    spans.append((start, len(text.rstrip())))
    return spans


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``.

    Closing quotes and brackets right after a boundary are moved onto the
    sentence they close; empty sentences are dropped.
    """
    raw = _raw_spans(text)
    spans: list[tuple[int, int]] = []
    shift = 0
    for index, (start, end) in enumerate(raw):
        start += shift
        if index + 1 == len(raw):
            if end > start:
                spans.append((start, end))
            break
        next_start, next_end = raw[index + 1]
        # Matched against the next sentence alone, so "$" is that sentence's end.
        closing = _REALIGN.match(text[next_start:next_end])
        if closing:
            spans.append((start, next_start + len(closing.group().rstrip())))
            shift = closing.end()
        else:
            shift = 0
            if end > start:
                spans.append((start, end))
    return spans


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` as punkt would split them (see the module notes)."""
    return [text[start:end] for start, end in sentence_spans(text)]
