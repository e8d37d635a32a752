"""Write the example acceptability data in this folder (seeded: the same files every run).

    python configs/data/make_acceptability.py [--out DIR]

A CoLA-like sentence-acceptability task on the embedded corpus's grammar (lmforge/data/synthetic.py, seed 0, the
corpus configs/distilbert-tiny-mlm.yaml pretrains on): columns ``text,label``; ``ok`` for a sentence the grammar
generates, ``bad`` for the words of one in another order (shuffled until the order differs; capitalised and
ended with a full stop as the ``ok`` ones, so only the word order tells them apart). Balanced, sentences of at
least 4 words, none in both files:

- acceptability-train.csv (400), acceptability-val.csv (200).

Telling them apart takes knowing the corpus' word order, which masked-LM pretraining teaches: an encoder fine-tuned
from configs/data/distilbert-tiny/ learns it in far fewer steps than one from random weights
(tests/test_encoder_classify.py).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from make_examples import write_csv  # this folder's other generator (run as a script, its folder is on sys.path)

from lmforge.data.synthetic import SyntheticGrammar

SEED = 0
TRAIN, VAL = 400, 200
MIN_WORDS = 4


def sentences(n: int, seed: int, exclude: set[str]) -> list[str]:
    """``n`` distinct grammar sentences of at least MIN_WORDS words, none in ``exclude``."""
    grammar = SyntheticGrammar(seed=0)
    seen: dict[str, None] = {}
    while len(seen) < n:
        text, _ = grammar.generate(1, seed=seed)  # one sentence; seeds apart from the corpus's own
        text = text.strip()
        if len(text.split()) >= MIN_WORDS and text not in exclude:
            seen.setdefault(text, None)
        seed += 1
    return list(seen)


def shuffled(rng: random.Random, sentence: str) -> str:
    words = sentence.rstrip(".").lower().split()
    order = words[:]
    while order == words:
        rng.shuffle(order)
    return " ".join(order).capitalize() + "."


def rows(rng: random.Random, texts: list[str]) -> list[tuple[str, str]]:
    """Half the sentences as they are (ok), half shuffled (bad), in a random order."""
    bad = set(rng.sample(range(len(texts)), len(texts) // 2))
    return [(shuffled(rng, t), "bad") if i in bad else (t, "ok") for i, t in enumerate(texts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder to write (default: this one)")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    train = sentences(TRAIN, 2_000_000, set())
    val = sentences(VAL, 3_000_000, set(train))
    for name, texts in (("acceptability-train.csv", train), ("acceptability-val.csv", val)):
        write_csv(out / name, rows(rng, texts))
        print(f"{out / name}: {(out / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
