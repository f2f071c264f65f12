"""itmrt.text.tokenize against nltk's word tokenizer on generated captions.

nltk (a dev dependency) is the reference; its punkt data files are not
installed, so ``nltk.word_tokenize`` itself cannot run. For single-sentence
captions it equals ``NLTKWordTokenizer().tokenize`` (what word_tokenize applies
to each sentence) and ``nltk.word_tokenize(c, preserve_line=True)`` (which skips
the sentence splitter); both are compared here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from itmrt.text import ABBREVIATIONS, Vocabulary, treebank_tokenize, word_tokenize

NOUNS = [
    "dog", "cat", "man", "woman", "child", "bus", "street", "table", "pizza", "frisbee",
    "T-shirt", "surfboard", "Giraffe", "skateboarder", "kitchen", "train", "umbrella",
    "café", "jalapeño", "crème", "brûlée", "Zürich", "São", "naïve", "smörgåsbord",
    "straße", "façade", "piñata", "Ελλάδα", "NYC", "iPhone", "McDonald", "o'clock",
    "rock'n'roll", "ma'am", "y'all", "well-known", "black-and-white", "3-year-old",
    "cafe\u0301", "nai\u0308ve", "Cafe\u0301's",
]
VERBS = [
    "runs", "is sitting", "are playing", "holds", "rides", "jumps", "eats", "looks at",
    "can't see", "won't eat", "don't like", "cannot reach", "isn't", "wasn't", "is gonna eat",
    "wanna play", "gotta go", "lemme see", "gimme", "'s", "'ve got", "'re holding", "'ll ride",
    "'d like", "'m standing",
]
SUBJECTS = [
    "a", "the", "two", "some", "A", "The", "it's", "I'm", "they'll", "we've", "you're",
    "he'd", "dogs'", "the dog's", "James'", "'tis", "'twas",
]
ADJECTIVES = ["large", "small", "red", "Old", "brand-new", "half-eaten", "über-cool", "très", "blue-ish"]
NUMBERS = [
    "3.5", "1,000", "$5", "10%", "3:30", "2nd", "1990s", "-5", "#1", "50/50", "1/2", "0.75",
    "12,345.67", "£20", "€3", "100km", "4x4", "A4",
]
URLISH = [
    "http://www.example.com/a.b?c=1&d=2", "www.site.org", "user@mail.com", "e.g.x",
    "foo.bar", "u.s.a", "v1.2.3", "C++", "a/b", "AT&T", "R&B", "Q&A", "@home", "#tag",
]
OPEN_CLOSE = [("(", ")"), ("[", "]"), ("{", "}"), ("<", ">"), ('"', '"'), ("'", "'"),
              ("``", "''"), ("`", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("„", "“")]
INNER_PUNCT = [",", ";", ":", " ,", " ;", " :", " -- ", "--", " - ", " – ", " — ", "*", " & ",
               "...", " ...", "..", "....", " … ", "…", "'", '"', "''", " ' "]
ENDINGS = ["", ".", " .", "!", "?", "?!", "!!", "...", '."', ".'", ".)", ".]", '!"', "?)",
           ". ", ".  ", ".\t", ":", ",", ";", "'", '"', ".’", ".”", ".»", "'.", '".', ").",
           "..", ". . .", ".*", "?'"]
SPACES = [" ", " ", " ", " ", "  ", "\t", " \t ", "\u00a0"]


def _word(rng: random.Random) -> str:
    group = rng.choice([NOUNS, NOUNS, VERBS, SUBJECTS, ADJECTIVES, NUMBERS, URLISH])
    word = rng.choice(group)
    roll = rng.random()
    if roll < 0.08:
        opening, closing = rng.choice(OPEN_CLOSE)
        word = opening + word + closing
    elif roll < 0.12:
        word = word.upper()
    elif roll < 0.16:
        word = word.capitalize()
    return word


def make_captions(count: int, seed: int = 0) -> list[str]:
    """Random captions; ``.?!`` appear inside words and at the end (a few still split, see below)."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(1, 14)):
            pieces.append(_word(rng))
            if rng.random() < 0.25:
                pieces.append(rng.choice(INNER_PUNCT))
        caption = ""
        for piece in pieces:
            caption += piece if (not caption or rng.random() < 0.1) else rng.choice(SPACES) + piece
        caption += rng.choice(ENDINGS)
        if rng.random() < 0.15:
            caption = rng.choice(SPACES) + caption
        if rng.random() < 0.15:
            caption += rng.choice(SPACES)
        captions.append(caption)
    return captions


CAPTIONS = make_captions(1500)


def _reference():
    """nltk's tokenizers: the word tokenizer, and punkt given itmrt's abbreviations only."""
    nltk = pytest.importorskip("nltk")
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    parameters = PunktParameters()
    parameters.abbrev_types = set(ABBREVIATIONS)
    return nltk, nltk.tokenize.NLTKWordTokenizer(), PunktSentenceTokenizer(parameters)


def test_generated_captions_are_varied() -> None:
    # Guards the generator itself: the comparisons below are only as good as it is.
    text = "\n".join(CAPTIONS)
    for needle in ["can't", "gonna", "3.5", "1,000", "$5", "10%", "(", "[", '"', "`", "...", "\t",
                   "  ", "é", "\u0301", "http://", "&", "?", "!", ";", ":"]:
        assert needle in text, needle
    assert len(set(CAPTIONS)) > 1400


@pytest.mark.parametrize("lower", [False, True])
def test_treebank_rules_match_nltk_word_tokenizer(lower: bool) -> None:
    _, words, _ = _reference()
    mismatches = []
    for caption in CAPTIONS:
        text = caption.lower() if lower else caption
        if treebank_tokenize(text) != words.tokenize(text):
            mismatches.append((text, treebank_tokenize(text), words.tokenize(text)))
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("lower", [False, True])
def test_word_tokenize_matches_nltk_on_single_sentences(lower: bool) -> None:
    """Where punkt sees one sentence, nltk.word_tokenize is the word tokenizer on the whole caption."""
    nltk, words, sentences = _reference()
    compared, mismatches = 0, []
    for caption in CAPTIONS:
        text = caption.lower() if lower else caption
        if len(sentences.tokenize(text)) != 1:
            continue
        compared += 1
        ours = word_tokenize(text)
        if ours != words.tokenize(text) or ours != nltk.word_tokenize(text, preserve_line=True):
            mismatches.append((text, ours, words.tokenize(text)))
    assert compared >= 1000
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("lower", [False, True])
def test_word_tokenize_matches_nltk_pipeline(lower: bool) -> None:
    """All captions, split or not: punkt (same abbreviations) then the word tokenizer per sentence."""
    _, words, sentences = _reference()
    mismatches = []
    for caption in CAPTIONS:
        text = caption.lower() if lower else caption
        expected = [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]
        if word_tokenize(text) != expected:
            mismatches.append((text, word_tokenize(text), expected))
    assert not mismatches, mismatches[:5]


def test_multi_sentence_captions_split_inner_periods() -> None:
    """Sentences joined after a period/!/? are tokenised one by one, as punkt + nltk do."""
    _, reference, _ = _reference()
    rng = random.Random(1)
    plain_endings = [".", "!", "?", ".'", '."', ".)", "!)"]
    mismatches = []
    for _ in range(400):
        sentences = []
        for _ in range(rng.randint(2, 4)):
            words = " ".join(rng.choice(NOUNS + ["a", "the", "is", "on", "with"]).lower()
                             for _ in range(rng.randint(1, 6)))
            # the sentence ends with an ordinary word: not an abbreviation, initial or number
            sentences.append(words + " " + rng.choice(["dog", "table", "street", "frisbee"])
                             + rng.choice(plain_endings))
        text = rng.choice([" ", "  ", "\t", "\n"]).join(sentences)
        expected = [token for sentence in sentences for token in reference.tokenize(sentence)]
        if word_tokenize(text) != expected:
            mismatches.append((text, word_tokenize(text), expected))
    assert not mismatches, mismatches[:5]


def test_known_tokenisations() -> None:
    """A few cases written out, so the rules are checked even without nltk."""
    assert word_tokenize("a dog runs. a cat sits.") == ["a", "dog", "runs", ".", "a", "cat", "sits", "."]
    assert word_tokenize("A man can't see; he's gonna fall.") == [
        "A", "man", "ca", "n't", "see", ";", "he", "'s", "gon", "na", "fall", "."]
    assert word_tokenize('he said "hi" (twice) for $5, 10% off 1,000 things...') == [
        "he", "said", "``", "hi", "''", "(", "twice", ")", "for", "$", "5", ",", "10", "%",
        "off", "1,000", "things", "..."]
    assert word_tokenize("the dogs' toys cost 3.5 each.") == [
        "the", "dogs", "'", "toys", "cost", "3.5", "each", "."]
    assert word_tokenize("mr. smith is on st. mark st. now") == [
        "mr.", "smith", "is", "on", "st.", "mark", "st.", "now"]
    assert word_tokenize("   ") == []
    assert word_tokenize("") == []


def test_ids_match_nltk_with_released_vocabularies(vocab_dir: Path) -> None:
    _, words_reference, sentences_reference = _reference()
    texts = [caption.lower() for caption in CAPTIONS[:500]]
    reference_tokens = [
        [token for sentence in sentences_reference.tokenize(text) for token in words_reference.tokenize(sentence)]
        for text in texts
    ]
    for path in sorted(vocab_dir.glob("*.json")):
        vocabulary = Vocabulary.from_json(path)
        words = vocabulary.word2idx
        unk = words["<unk>"]
        known = 0
        for caption, tokens in zip(CAPTIONS[:500], reference_tokens):
            expected = [words["<start>"], *(words.get(t, unk) for t in tokens), words["<end>"]]
            assert vocabulary.encode(caption) == expected, (path.name, caption)
            known += sum(t in words for t in tokens)
        assert known > 1000  # most generated words are in the released vocabularies
