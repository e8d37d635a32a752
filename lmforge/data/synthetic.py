"""The embedded default corpus: seeded English-like text whose entropy is computed exactly.

Sentences follow a small grammar (determiner, adjectives, subject, verb, object, prepositional
phrase, adverb). Each word is drawn from a few favourites that depend on the last *content* word
(noun, verb or preposition) before it, so a model must look back past determiners and adjectives
to predict well: real structure, not random tokens. Because sentences are independent and the
text is a uniquely decodable function of the choices made, the entropy rate of the byte stream
is exactly E[bits per sentence] / E[bytes per sentence], computed by dynamic programming over the
grammar. A model's loss in nats per byte can be compared with it directly: no model can beat it.

Example output: ``Every quiet fox follows the lantern beyond the river. One mountain sees my owl.``
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from lmforge.errors import UserError

WORDS: dict[str, tuple[str, ...]] = {
    "DET": ("the", "one", "every", "some", "this", "that", "no", "my"),
    "ADJ": (
        "small",
        "bright",
        "quiet",
        "ancient",
        "hungry",
        "golden",
        "silver",
        "curious",
        "gentle",
        "brave",
        "tired",
        "wild",
        "hidden",
        "frozen",
        "tall",
        "clever",
        "lonely",
        "busy",
        "careful",
        "distant",
        "heavy",
        "sleepy",
        "proud",
        "eager",
    ),
    "NOUN": (
        "fox",
        "river",
        "king",
        "garden",
        "robot",
        "sailor",
        "mountain",
        "lantern",
        "teacher",
        "forest",
        "engine",
        "child",
        "castle",
        "whale",
        "doctor",
        "baker",
        "island",
        "painter",
        "storm",
        "village",
        "dragon",
        "letter",
        "owl",
        "bridge",
        "farmer",
        "comet",
        "library",
        "wizard",
        "harbor",
        "mirror",
        "tiger",
        "violin",
    ),
    "VERB": (
        "sees",
        "finds",
        "builds",
        "carries",
        "follows",
        "paints",
        "guards",
        "visits",
        "watches",
        "remembers",
        "chases",
        "greets",
        "repairs",
        "crosses",
        "opens",
        "loves",
        "fears",
        "counts",
        "hides",
        "helps",
        "climbs",
        "praises",
        "questions",
        "forgets",
    ),
    "PREP": ("near", "under", "beside", "behind", "above", "across", "inside", "beyond", "toward", "around"),
    "ADV": ("slowly", "quietly", "again", "today", "together", "gladly", "softly", "often", "suddenly", "twice"),
}
CONTENT = ("NOUN", "VERB", "PREP")  # categories whose word becomes the context of the next choices

# Grammar states in topological order: (category emitted, [(next state, probability), ...]).
GRAMMAR: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {
    "det_s": ("DET", (("adj_s1", 0.4), ("noun_s", 0.6))),
    "adj_s1": ("ADJ", (("adj_s2", 0.25), ("noun_s", 0.75))),
    "adj_s2": ("ADJ", (("noun_s", 1.0),)),
    "noun_s": ("NOUN", (("verb", 1.0),)),
    "verb": ("VERB", (("det_o", 0.55), ("prep", 0.25), ("adv", 0.1), ("end", 0.1))),
    "det_o": ("DET", (("adj_o", 0.3), ("noun_o", 0.7))),
    "adj_o": ("ADJ", (("noun_o", 1.0),)),
    "noun_o": ("NOUN", (("prep", 0.3), ("adv", 0.15), ("end", 0.55))),
    "prep": ("PREP", (("det_p", 1.0),)),
    "det_p": ("DET", (("noun_p", 1.0),)),
    "noun_p": ("NOUN", (("adv", 0.2), ("end", 0.8))),
    "adv": ("ADV", (("end", 1.0),)),
}
START = "det_s"
SEPARATORS = ((" ", 0.85), ("\n", 0.15))  # after the full stop: same paragraph or a new one
START_CONTEXT = "<start>"


def _entropy_bits(probs) -> float:
    return -sum(p * math.log2(p) for p in probs if p > 0)


@dataclass(frozen=True)
class SyntheticGrammar:
    """A seeded instance of the grammar: which words follow which, with what probability."""

    seed: int = 0
    branching: int = 6
    """How many favourite words each context allows in each category."""

    def __post_init__(self) -> None:
        if self.branching < 1:
            raise UserError(f"synthetic corpus: branching={self.branching} must be at least 1")
        rng = random.Random(self.seed)
        contexts = [START_CONTEXT] + [w for cat in CONTENT for w in WORDS[cat]]
        table: dict[tuple[str, str], tuple[tuple[str, ...], tuple[float, ...]]] = {}
        for ctx in contexts:
            for cat, words in WORDS.items():
                chosen = rng.sample(words, min(self.branching, len(words)))
                weights = [rng.gammavariate(1.0, 1.0) + 0.05 for _ in chosen]  # Dirichlet(1), kept off zero
                total = sum(weights)
                table[(ctx, cat)] = (tuple(chosen), tuple(w / total for w in weights))
        object.__setattr__(self, "_table", table)

    def choices(self, ctx: str, cat: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
        return self._table[(ctx, cat)]

    def _sentence_expectations(self) -> tuple[float, float]:
        """(expected bits, expected bytes) of one sentence including its full stop and separator."""
        reach: dict[str, dict[str, float]] = {state: {} for state in GRAMMAR}
        reach[START][START_CONTEXT] = 1.0
        bits = _entropy_bits(p for _, p in SEPARATORS)
        nbytes = 2.0  # "." and the separator
        end_mass = 0.0
        for state, (cat, nexts) in GRAMMAR.items():  # insertion order is topological
            first = state == START
            for ctx, p_state in reach[state].items():
                words, probs = self.choices(ctx, cat)
                bits += p_state * (_entropy_bits(probs) + _entropy_bits(p for _, p in nexts))
                nbytes += p_state * sum(p * (len(w) + (0 if first else 1)) for w, p in zip(words, probs))
                for word, p_word in zip(words, probs):
                    new_ctx = word if cat in CONTENT else ctx
                    for nxt, p_next in nexts:
                        if nxt == "end":
                            end_mass += p_state * p_word * p_next
                        else:
                            reach[nxt][new_ctx] = reach[nxt].get(new_ctx, 0.0) + p_state * p_word * p_next
        assert abs(end_mass - 1.0) < 1e-9, end_mass
        return bits, nbytes

    def entropy_bits_per_byte(self) -> float:
        """Exact entropy rate of the generated byte stream, in bits per byte."""
        bits, nbytes = self._sentence_expectations()
        return bits / nbytes

    def entropy_nats_per_byte(self) -> float:
        """The same in nats, the unit of a cross-entropy loss on byte tokens."""
        return self.entropy_bits_per_byte() * math.log(2)

    def generate(self, n_bytes: int, seed: int | None = None) -> tuple[str, float]:
        """At least ``n_bytes`` of text (whole sentences) and its total negative log-likelihood in bits."""
        rng = random.Random(self.seed * 1_000_003 + 1 if seed is None else seed)
        parts: list[str] = []
        size, nll = 0, 0.0
        while size < n_bytes:
            state, ctx = START, START_CONTEXT
            while state != "end":
                cat, nexts = GRAMMAR[state]
                words, probs = self.choices(ctx, cat)
                i = rng.choices(range(len(words)), weights=probs)[0]
                word = words[i]
                piece = word.capitalize() if state == START else " " + word
                nll -= math.log2(probs[i])
                if cat in CONTENT:
                    ctx = word
                j = rng.choices(range(len(nexts)), weights=[p for _, p in nexts])[0]
                nll -= math.log2(nexts[j][1])
                state = nexts[j][0]
                parts.append(piece)
                size += len(piece)
            k = rng.choices(range(len(SEPARATORS)), weights=[p for _, p in SEPARATORS])[0]
            nll -= math.log2(SEPARATORS[k][1])
            parts.append("." + SEPARATORS[k][0])
            size += 2
        return "".join(parts), nll
