"""itmrt.text.sentences: the documented splitting rules, and nltk's punkt algorithm as reference.

punkt's trained English parameters are not installed, so the reference is
nltk's ``PunktSentenceTokenizer`` given the same abbreviation list as itmrt
and nothing else (no orthographic context, collocations or sentence
starters): it checks that the decision procedure is punkt's, while the
module docstring documents where the missing trained data can make the real
model decide otherwise.
"""

from __future__ import annotations

import random

import pytest

from itmrt.text import ABBREVIATIONS, split_sentences
from itmrt.text.sentences import sentence_spans


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a dog runs. a cat sits.", ["a dog runs.", "a cat sits."]),
        ("A dog runs. A cat sits", ["A dog runs.", "A cat sits"]),
        ("a dog!  a cat? a cow", ["a dog!", "a cat?", "a cow"]),
        # abbreviations, also after a hyphen, in any case
        ("mr. smith walks down st. mark st. with dr. who", ["mr. smith walks down st. mark st. with dr. who"]),
        ("Mr. Smith and the ex-gov. Brown", ["Mr. Smith and the ex-gov. Brown"]),
        ("made in the u.s. during the war", ["made in the u.s. during the war"]),
        # numbers: no period after them unless whitespace follows; a lower-case word continues
        ("a 3.5 inch screen. it is on", ["a 3.5 inch screen.", "it is on"]),
        ("he is no. 5. the best", ["he is no.", "5. the best"]),
        ("chapter 5. the end", ["chapter 5. the end"]),
        ("chapter 5. The end", ["chapter 5.", "The end"]),
        ("chapter 5. 6 dogs", ["chapter 5.", "6 dogs"]),
        # initials
        ("j. smith is here", ["j. smith is here"]),
        ("J. Smith is here", ["J. Smith is here"]),
        ("the letter j. (again)", ["the letter j.", "(again)"]),
        # ellipses never end a sentence here
        ("wait... the dog. ok", ["wait... the dog.", "ok"]),
        ("wait ... The dog", ["wait ... The dog"]),
        # closing quotes and brackets stay with the sentence they close
        ('he said "go." then left', ['he said "go."', "then left"]),
        ("a dog (it runs.) a cat", ["a dog (it runs.)", "a cat"]),
        ("what?! a cat", ["what?!", "a cat"]),
        ("so 'good.' ok", ["so 'good.'", "ok"]),
        # no whitespace after the period: no boundary
        ("see www.example.com or e.g.x for more", ["see www.example.com or e.g.x for more"]),
        # whitespace between sentences and at the end is dropped; leading kept
        ("  one.\t\ttwo.  ", ["  one.", "two."]),
        ("one.\ntwo", ["one.", "two"]),
        ("", []),
        ("   ", []),
    ],
)
def test_documented_splits(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_abbreviation_list_is_lower_case_without_final_period() -> None:
    assert {"mr", "mrs", "dr", "st", "ave", "u.s"} <= ABBREVIATIONS
    assert all(a == a.lower() and not a.endswith(".") for a in ABBREVIATIONS)
    assert "etc" not in ABBREVIATIONS


_PIECES = [
    "a", "dog", "The", "cat", "runs", "mr.", "Dr.", "st.", "ave.", "u.s.", "etc.", "no.", "j.", "J.",
    "5.", "3.5", "1,000.", "-2.", "...", "..", "wait...", ".", "!", "?", "?!", "!!!", "(", ")",
    "(it.)", '"go."', "'so.'", "“yes.”", "«non.»", "[x.]", "end.", "End.", "end.)", "end.--",
    "e.g.", "i.e.", "a.m.", "p.m.", "ex-gov.", "Smith.", ",", ";", ":", "...The", ". .", "x.y",
    "café.", "Über.", "12.", "iPhone.", "3.",
]
_GAPS = [" ", " ", " ", "  ", "\t", "\n", " \n ", "\n\n", ""]


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        text = ""
        for _ in range(rng.randint(1, 16)):
            text += rng.choice(_PIECES) + rng.choice(_GAPS)
        texts.append(text)
    return texts


@pytest.mark.parametrize("lower", [False, True])
def test_spans_match_nltk_punkt_algorithm(lower: bool) -> None:
    pytest.importorskip("nltk")
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    parameters = PunktParameters()
    parameters.abbrev_types = set(ABBREVIATIONS)
    reference = PunktSentenceTokenizer(parameters)
    texts = _random_texts(3000, seed=7)
    mismatches = []
    multi = 0
    for text in texts:
        text = text.lower() if lower else text
        expected = list(reference.span_tokenize(text))
        multi += len(expected) > 1
        if sentence_spans(text) != expected:
            mismatches.append((text, sentence_spans(text), expected))
    assert multi > 1000  # the texts exercise real splitting
    assert not mismatches, mismatches[:5]
