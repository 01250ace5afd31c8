"""The BM25 analyzer: Porter's stemmer as his paper defines it, and what the index is given to rank."""

from __future__ import annotations

import pytest
from agentbus.retriever.analysis import STOP_WORDS, analyze, analyzed_text, porter_stem

# Examples printed in M. F. Porter, "An algorithm for suffix stripping" (1980), taken through every step.
PORTER_EXAMPLES = {
    "caresses": "caress",
    "ponies": "poni",
    "ties": "ti",
    "caress": "caress",
    "cats": "cat",
    "feed": "feed",
    "agreed": "agre",
    "plastered": "plaster",
    "bled": "bled",
    "motoring": "motor",
    "sing": "sing",
    "conflated": "conflat",
    "troubled": "troubl",
    "sized": "size",
    "hopping": "hop",
    "tanned": "tan",
    "falling": "fall",
    "hissing": "hiss",
    "fizzed": "fizz",
    "failing": "fail",
    "filing": "file",
    "happy": "happi",
    "sky": "sky",
    "relational": "relat",
    "conditional": "condit",
    "rational": "ration",
    "digitizer": "digit",
    "vietnamization": "vietnam",
    "predication": "predic",
    "operator": "oper",
    "feudalism": "feudal",
    "decisiveness": "decis",
    "hopefulness": "hope",
    "callousness": "callous",
    "sensitiviti": "sensit",
    "triplicate": "triplic",
    "formative": "form",
    "electrical": "electr",
    "goodness": "good",
    "revival": "reviv",
    "allowance": "allow",
    "inference": "infer",
    "airliner": "airlin",
    "adjustable": "adjust",
    "defensible": "defens",
    "irritant": "irrit",
    "replacement": "replac",
    "adjustment": "adjust",
    "dependent": "depend",
    "adoption": "adopt",
    "communism": "commun",
    "activate": "activ",
    "angulariti": "angular",
    "homologous": "homolog",
    "effective": "effect",
    "bowdlerize": "bowdler",
    "probate": "probat",
    "rate": "rate",
    "cease": "ceas",
    "controll": "control",
    "roll": "roll",
    "generalizations": "gener",
    "oscillators": "oscil",
}


@pytest.mark.parametrize(("word", "stem"), PORTER_EXAMPLES.items())
def test_porter_stems_match_the_paper(word: str, stem: str) -> None:
    assert porter_stem(word) == stem


def test_inflections_of_a_word_share_one_term() -> None:
    assert len({porter_stem(w) for w in ("index", "indexes", "indexed", "indexing")}) == 1
    assert porter_stem("connections") == porter_stem("connected") == porter_stem("connect")


def test_analysis_lowercases_drops_stop_words_and_short_numbers() -> None:
    assert analyze("How do I Reset the PASSWORDS of user 42 in 2024?") == ["reset", "password", "user", "2024"]
    assert analyze("axis 0 or 1, RFC 2822, port 8080") == ["axi", "rfc", "2822", "port", "8080"]
    assert analyze("what is the") == []
    assert {"the", "what", "how", "is"} <= STOP_WORDS
    assert analyzed_text("Résumé files, résumés") == "résumé file résumé"
    assert analyze("x" * 41 + " kept") == ["kept"]


def test_an_identifier_is_found_by_its_parts_and_by_its_whole_name() -> None:
    assert analyze("x : array_like") == ["x", "arraylik", "arrai", "like"]
    assert analyze("the max_workers of __init__") == ["maxwork", "max", "worker", "init"]
    assert set(analyze("an array-like value")) >= set(analyze("array_like")) - {"arraylik"}
    assert analyze("ArrayLike") == analyze("arraylike") == ["arraylik"]


def test_terms_never_contain_underscores_so_every_tokenizer_reads_them_alike() -> None:
    text = "np.linalg.norm(x_1, ord=None) __array_function__ _private a__b user_42 ___"
    terms = analyze(text)
    assert all(term.isalnum() for term in terms), terms
    assert analyze("np.linalg.norm") == ["np", "linalg", "norm"]
