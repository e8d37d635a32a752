"""The embedded synthetic corpus: exact entropy, seeding and the shape of the generated text."""

from __future__ import annotations

import math
import re

import pytest

from lmforge.data.sources import EmbeddedCorpus
from lmforge.data.synthetic import CONTENT, GRAMMAR, SEPARATORS, START, START_CONTEXT, WORDS, SyntheticGrammar

CATEGORY_OF = {word: cat for cat, words in WORDS.items() for word in words}
SENTENCE = re.compile(r"([^.]+)\.([ \n])")


def parse_nll_bits(grammar: SyntheticGrammar, text: str) -> float:
    """Re-derive the NLL of ``text`` (bits) by parsing it with the grammar; fails on any off-grammar word."""
    pos, nll = 0, 0.0
    separators = dict(SEPARATORS)
    while pos < len(text):
        match = SENTENCE.match(text, pos)
        assert match is not None, f"not a sentence at offset {pos}: {text[pos : pos + 60]!r}"
        words = match.group(1).split(" ")
        assert words[0][:1].isupper() and words[0] == words[0].lower().capitalize(), words
        words[0] = words[0].lower()
        state, ctx = START, START_CONTEXT
        for i, word in enumerate(words):
            assert word in CATEGORY_OF, f"{word!r} is not a grammar word"
            cat, nexts = GRAMMAR[state]
            assert CATEGORY_OF[word] == cat, (word, state)
            choices, probs = grammar.choices(ctx, cat)
            assert word in choices, f"{word!r} is not a favourite after {ctx!r}"
            nll -= math.log2(probs[choices.index(word)])
            if cat in CONTENT:
                ctx = word
            following = CATEGORY_OF[words[i + 1]] if i + 1 < len(words) else None
            matching = [(nxt, p) for nxt, p in nexts if (GRAMMAR[nxt][0] if nxt != "end" else None) == following]
            assert len(matching) == 1, (state, following)
            state, p_next = matching[0]
            nll -= math.log2(p_next)
        assert state == "end"
        nll -= math.log2(separators[match.group(2)])
        pos = match.end()
    return nll


def test_word_categories_are_disjoint():
    # The entropy formula relies on the text being uniquely decodable into choices.
    assert len(CATEGORY_OF) == sum(len(words) for words in WORDS.values())


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_sample_nll_matches_analytic_entropy(seed):
    grammar = SyntheticGrammar(seed=seed)
    text, nll = grammar.generate(300_000)
    per_byte = nll / len(text.encode("utf-8"))
    assert per_byte == pytest.approx(grammar.entropy_bits_per_byte(), rel=0.02)


def test_generated_nll_is_the_nll_of_the_text():
    grammar = SyntheticGrammar(seed=3)
    text, nll = grammar.generate(20_000)
    assert parse_nll_bits(grammar, text) == pytest.approx(nll, rel=1e-9)


def test_same_seed_same_text_different_seed_different_text():
    a, nll_a = SyntheticGrammar(seed=5).generate(5_000)
    b, nll_b = SyntheticGrammar(seed=5).generate(5_000)
    assert a == b and nll_a == nll_b
    assert SyntheticGrammar(seed=6).generate(5_000)[0] != a
    # An explicit text seed changes the text but not the grammar.
    c, _ = SyntheticGrammar(seed=5).generate(5_000, seed=123)
    assert c != a
    assert c == SyntheticGrammar(seed=5).generate(5_000, seed=123)[0]
    assert SyntheticGrammar(seed=5).entropy_bits_per_byte() == SyntheticGrammar(seed=5).entropy_bits_per_byte()


def test_generate_returns_whole_sentences_of_at_least_the_requested_size():
    text, _ = SyntheticGrammar().generate(10_000)
    assert len(text) >= 10_000
    assert len(text) < 10_000 + 200  # at most one sentence more
    assert text.endswith((". ", ".\n"))


def test_entropy_range_and_units():
    grammar = SyntheticGrammar()
    bits = grammar.entropy_bits_per_byte()
    assert 0.2 < bits < 2.0
    assert grammar.entropy_nats_per_byte() == pytest.approx(bits * math.log(2), rel=1e-12)


def test_more_branching_more_entropy():
    low = SyntheticGrammar(seed=0, branching=1).entropy_bits_per_byte()
    high = SyntheticGrammar(seed=0, branching=6).entropy_bits_per_byte()
    assert 0 < low < high
    # With one favourite per context only the grammar's structural choices carry information.
    text, nll = SyntheticGrammar(seed=0, branching=1).generate(100_000)
    assert nll / len(text) == pytest.approx(low, rel=0.02)


def test_branching_must_be_positive():
    with pytest.raises(ValueError, match="branching=0"):
        SyntheticGrammar(branching=0)


def test_choice_tables_are_distributions():
    grammar = SyntheticGrammar(seed=2, branching=4)
    for ctx in (START_CONTEXT, "fox", "sees", "near"):
        for cat in WORDS:
            words, probs = grammar.choices(ctx, cat)
            assert len(words) == len(set(words)) == 4
            assert set(words) <= set(WORDS[cat])
            assert sum(probs) == pytest.approx(1.0) and min(probs) > 0


def test_text_uses_only_grammar_words_and_sentence_punctuation():
    text, _ = SyntheticGrammar(seed=4).generate(30_000)
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .\n")
    assert "  " not in text and ".." not in text
    sentences = [s for s in re.split(r"\.[ \n]", text) if s]
    assert len(sentences) > 300
    for sentence in sentences:
        first, *rest = sentence.split(" ")
        assert first[0].isupper() and first[1:].islower()
        assert first.lower() in WORDS["DET"]  # every sentence starts with a determiner
        assert all(w in CATEGORY_OF for w in rest), sentence
    # Both separators occur: new paragraphs as well as running text.
    assert ".\n" in text and ". " in text


def test_embedded_corpus_is_the_grammar_text_with_its_entropy():
    corpus = EmbeddedCorpus(size_bytes=100_000, seed=2, branching=3)
    grammar = SyntheticGrammar(seed=2, branching=3)
    (text,) = corpus.documents()
    expected, nll = grammar.generate(100_000)
    assert text == expected
    assert corpus.entropy_nats_per_byte() == grammar.entropy_nats_per_byte()
    # the entropy is what the text's NLL says (in nats here)
    assert nll * math.log(2) / len(text.encode("utf-8")) == pytest.approx(corpus.entropy_nats_per_byte(), rel=0.03)
