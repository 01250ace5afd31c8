"""The BM25 analyzer: lower-case words and identifiers (whole and in parts), Porter stems, no stop words.

The retriever analyzes text itself and hands Milvus the result as space-separated terms, so BM25 ranks
stems ("indexing", "indexes" and "index" are one term) on Milvus Lite, whose analyzer has no stemmer,
exactly as on a Milvus server. Documents and queries go through the same function.

Technical text names things by identifiers (`array_like`, `max_workers`, `__init__`): an identifier
gives its parts as terms ("array", "like"), so prose that says "array-like" or "maximum workers" finds
it, and the whole identifier once more, written and stemmed as one word ("arraylik", as `ArrayLike` and
"arraylike" give), so a query that names it exactly ranks it first. Terms never contain an underscore:
Milvus Lite's tokenizer keeps runs of word characters whole, a server's standard tokenizer may split
them at underscores; an alphanumeric term is one token to both. Numbers of one or two digits (example
data, list indices, section numbers) are dropped: they lengthen chunks that show examples and match
nothing a reader means; longer ones (RFC 2822, 8080) are kept.

The stemmer is M. F. Porter's 1980 algorithm ("An algorithm for suffix stripping", Program 14(3)), the
one textbook IR systems use; `tests/test_analysis.py` checks it against the examples of the paper.
"""

from __future__ import annotations

import re
from functools import lru_cache

_WORD = re.compile(r"\w+")
_MAX_TERM_CHARS = 40
"""Longer "words" (hashes, base64) are dropped rather than indexed."""
_MAX_DROPPED_NUMBER_DIGITS = 2

# Lucene's English stop set plus the question words and auxiliaries that carry no topic in a query.
STOP_WORDS = frozenset(
    """
    a an and are as at be but by for if in into is it no not of on or such that the their then there these
    they this to was will with what which who whom whose when where why how do does did done doing have has
    had having can could should would may might must shall i you he she we me my your our its his her them
    us been being am were from than so also any each some all other more most only own same too very just
    """.split()  # noqa: SIM905 - a word list reads better as prose than as 100 quoted strings
)

_VOWELS = frozenset("aeiou")


def _is_consonant(word: str, i: int) -> bool:
    char = word[i]
    if char in _VOWELS:
        return False
    if char == "y":
        return i == 0 or not _is_consonant(word, i - 1)
    return True


def _measure(stem: str) -> int:
    """m in [C](VC)^m[V]: the number of vowel-consonant sequences."""
    m, previous_vowel = 0, False
    for i in range(len(stem)):
        consonant = _is_consonant(stem, i)
        if consonant and previous_vowel:
            m += 1
        previous_vowel = not consonant
    return m


def _has_vowel(stem: str) -> bool:
    return any(not _is_consonant(stem, i) for i in range(len(stem)))


def _ends_double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _is_consonant(word, len(word) - 1)


def _ends_cvc(word: str) -> bool:
    """consonant-vowel-consonant, the last not w, x or y (e.g. -hop, -fil)."""
    if len(word) < 3:
        return False
    i = len(word) - 1
    return (
        _is_consonant(word, i - 2)
        and not _is_consonant(word, i - 1)
        and _is_consonant(word, i)
        and word[i] not in "wxy"
    )


def _replace(word: str, rules: tuple[tuple[str, str], ...], min_measure: int) -> str:
    """Apply the first rule whose suffix ends `word`; it rewrites only when the stem's measure is enough."""
    for suffix, replacement in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if _measure(stem) > min_measure else word
    return word


_STEP2: tuple[tuple[str, str], ...] = (
    ("ational", "ate"),
    ("tional", "tion"),
    ("enci", "ence"),
    ("anci", "ance"),
    ("izer", "ize"),
    ("abli", "able"),
    ("alli", "al"),
    ("entli", "ent"),
    ("eli", "e"),
    ("ousli", "ous"),
    ("ization", "ize"),
    ("ation", "ate"),
    ("ator", "ate"),
    ("alism", "al"),
    ("iveness", "ive"),
    ("fulness", "ful"),
    ("ousness", "ous"),
    ("aliti", "al"),
    ("iviti", "ive"),
    ("biliti", "ble"),
)
_STEP3: tuple[tuple[str, str], ...] = (
    ("icate", "ic"),
    ("ative", ""),
    ("alize", "al"),
    ("iciti", "ic"),
    ("ical", "ic"),
    ("ful", ""),
    ("ness", ""),
)
# Each step applies only the rule with the longest matching suffix, so every table is sorted longest first.
_STEP4: tuple[str, ...] = (
    "al",
    "ance",
    "ence",
    "er",
    "ic",
    "able",
    "ible",
    "ant",
    "ement",
    "ment",
    "ent",
    "ion",
    "ou",
    "ism",
    "ate",
    "iti",
    "ous",
    "ive",
    "ize",
)
_STEP2 = tuple(sorted(_STEP2, key=lambda rule: -len(rule[0])))
_STEP3 = tuple(sorted(_STEP3, key=lambda rule: -len(rule[0])))
_STEP4 = tuple(sorted(_STEP4, key=len, reverse=True))


def _step1(word: str) -> str:
    if word.endswith(("sses", "ies")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[: -len(suffix)]):
            word = word[: -len(suffix)]
            if word.endswith(("at", "bl", "iz")):
                return word + "e"
            if _ends_double_consonant(word) and word[-1] not in "lsz":
                return word[:-1]
            if _measure(word) == 1 and _ends_cvc(word):
                return word + "e"
            return word
    return word


def _step4(word: str) -> str:
    for suffix in _STEP4:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            if suffix == "ion" and not stem.endswith(("s", "t")):
                return word
            return stem if _measure(stem) > 1 else word
    return word


@lru_cache(maxsize=65_536)
def porter_stem(word: str) -> str:
    """The Porter stem of a lower-case word (words of one or two letters are their own stem)."""
    if len(word) <= 2 or not word.isalpha():
        return word
    word = _step1(word)
    if word.endswith("y") and _has_vowel(word[:-1]):
        word = word[:-1] + "i"
    word = _replace(word, _STEP2, 0)
    word = _replace(word, _STEP3, 0)
    word = _step4(word)
    if word.endswith("e"):
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            word = stem
    if _measure(word) > 1 and _ends_double_consonant(word) and word.endswith("l"):
        word = word[:-1]
    return word


def _word_term(word: str) -> str | None:
    if word in STOP_WORDS or (word.isdigit() and len(word) <= _MAX_DROPPED_NUMBER_DIGITS):
        return None
    return porter_stem(word)


def analyze(text: str) -> list[str]:
    """The BM25 terms of `text`, in order: lower-cased words minus stop words and short numbers, stemmed.

    An identifier of several parts gives the parts joined (its name) and then each part as a word.
    """
    terms: list[str] = []
    for word in _WORD.findall(text.lower()):
        if len(word) > _MAX_TERM_CHARS:
            continue
        parts = [part for part in word.split("_") if part]
        if len(parts) > 1:
            terms.append(porter_stem("".join(parts)))
        terms.extend(term for part in parts if (term := _word_term(part)) is not None)
    return terms


def analyzed_text(text: str) -> str:
    """`analyze(text)` joined by spaces: what the index's whitespace-separated BM25 field stores."""
    return " ".join(analyze(text))
